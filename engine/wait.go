package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"rendezvous/hub"
	"rendezvous/models"
	"rendezvous/storage"
)

// WaitParams are the inputs of Wait.
type WaitParams struct {
	EventID string
	// RunID: the waiter belongs to the run, consumes its lookback events
	// and is resolved by targeted notifies too.
	RunID *string
	// StepName (with RunID): a durable step, kept in the database until it
	// ends whether or not anybody is connected.
	StepName *string
	Timeout  *time.Duration
}

// Wait is one registered waitForEvent. Call Watch exactly once.
//
// A live wait owns no goroutine: the hub calls it when its waiter ends, a
// timer when its deadline passes, the context when its subscriber leaves,
// and only then does a short-lived goroutine do database work. Tens of
// thousands of idle subscriptions cost memory for their state, not stacks.
type Wait struct {
	e       *Engine
	waiter  *models.Waiter // nil when the result was known at once
	result  *models.WaitResult
	durable bool
	// fresh: this registration inserted the waiter and listened on the hub
	// before committing, so no end can have slipped by unseen; a waiter
	// found (a durable step attached to) may have ended before the listener
	// was there, so Watch looks in the database first.
	fresh    bool
	listener *hub.Listener
	// endedAt is when the waiter ended, once known (zero for a durable
	// step that had ended before this subscriber came).
	endedAt time.Time

	mu        sync.Mutex
	ctx       context.Context
	deliver   func(*models.WaitResult, error) // set by Watch
	done      bool                            // deliver has been claimed
	early     *hub.Wake                       // a final wake that came before Watch
	lookEarly bool                            // a "look" wake that came before Watch
	timer     *time.Timer                     // the deadline, then expire retries
	stopCtx   func() bool
	looking   bool // a lookup goroutine runs
	lookAgain bool // a wake came while it ran
	failures  int  // database errors in a row, for the retry delay
}

// Wait registers a waiter, or attaches to the waiter of a durable step, or
// hands over a stored lookback event at once. A waiter it inserts is
// listened for before the registration commits; one it attaches to (a
// durable step) is listened for after, and Watch then reads it once, so an
// end that commits between the two is not missed.
func (e *Engine) Wait(ctx context.Context, p WaitParams) (*Wait, error) {
	// Counted from before the registration, so that a shutdown cannot close
	// the database between our commit and our cleanup.
	if !e.beginWait() {
		return nil, errorf(CodeUnavailable, "the service is shutting down; try again")
	}
	w, err := e.register(ctx, p)
	if err != nil || w.waiter == nil {
		e.endWait() // no Watch will follow that needs the count
	}
	return w, err
}

func (e *Engine) register(ctx context.Context, p WaitParams) (*Wait, error) {
	if err := e.checkEventID(p.EventID); err != nil {
		return nil, err
	}
	timeout, err := e.timeout(p.Timeout)
	if err != nil {
		return nil, err
	}
	var runID, stepName *string
	if p.RunID != nil {
		id, err := e.normalizeRunID(*p.RunID)
		if err != nil {
			return nil, err
		}
		runID = &id
	}
	if p.StepName != nil {
		if runID == nil {
			return nil, errorf(CodeBadUserInput, "stepName needs workflowRunId: a durable step belongs to a run")
		}
		if err := e.checkText("stepName", *p.StepName, true); err != nil {
			return nil, err
		}
		stepName = p.StepName
	}

	var owner string
	if stepName == nil {
		// This waiter lives as long as this process's subscription; the
		// lease lets other replicas tell when the process is gone.
		if err := e.holdLease(ctx, false); err != nil {
			return nil, err
		}
		owner = e.replicaID
	}
	var (
		live, ended *models.Waiter
		endedNow    bool // ended by this registration, not before it
		t           tally
	)
	w := &Wait{e: e, durable: stepName != nil}
	// A waiter this registration inserts is listened for before the
	// transaction commits: nobody can end it before then, so every wake for
	// it reaches w and Watch need not look in the database.
	unlisten := func() {
		if w.listener != nil {
			e.hub.Unlisten(w.listener)
			w.listener = nil
		}
	}
	err = e.store.InTx(ctx, func(tx storage.Executor) error {
		unlisten() // a retried attempt inserts another waiter
		live, ended, endedNow, t, w.fresh = nil, nil, false, tally{}, false
		now := e.now()
		if runID != nil {
			run, err := e.lockRun(ctx, tx, *runID)
			if err != nil {
				return err
			}
			if stepName != nil {
				step, err := e.attachStep(ctx, tx, *runID, *stepName, p.EventID, now, &t)
				if err != nil {
					return err
				}
				if step != nil {
					if step.State == models.WaiterWaiting {
						live = step
					} else {
						ended = step
					}
					return nil
				}
			}
			if run.State != models.RunStarted {
				return errorf(CodeRunNotActive, "workflow run %s is %s", *runID, run.State)
			}
			ev, err := tx.LookbackEventConsume(ctx, *runID, p.EventID, now)
			if err != nil {
				return err
			}
			if ev != nil {
				// The event arrived first: this waiter is born notified.
				born := &models.Waiter{
					EventID: p.EventID, WorkflowRunID: runID, StepName: stepName,
					State: models.WaiterNotified, Deadline: now.Add(timeout), CreatedAt: now,
					EndedAt: &now, MessageID: &ev.MessageID, EventData: ev.EventData,
				}
				if err := e.insertWaiter(ctx, tx, born); err != nil {
					return err
				}
				ended, endedNow = born, true
				t.consumed, t.notified = 1, 1
				return nil
			}
		}
		nw := &models.Waiter{
			EventID: p.EventID, WorkflowRunID: runID, StepName: stepName,
			State: models.WaiterWaiting, Deadline: now.Add(timeout), CreatedAt: now, Owner: owner,
		}
		if err := e.insertWaiter(ctx, tx, nw); err != nil {
			return err
		}
		live, w.fresh = nw, true
		w.listener = e.hub.Listen(nw.ID, w.onWake)
		return nil
	})
	if err != nil {
		unlisten()
		if errors.Is(err, storage.ErrCommitUnknown) && live != nil && w.fresh && !w.durable {
			// The waiter may exist, with nobody left to receive its event.
			e.retryRelease(live.ID)
		}
		return nil, storageErr("wait for "+p.EventID, err)
	}
	e.record(t)
	if ended != nil {
		res, err := resultOf(ended)
		if err != nil {
			return nil, err
		}
		w.result = res
		if endedNow && ended.EndedAt != nil {
			w.endedAt = *ended.EndedAt
		}
		return w, nil
	}
	w.waiter = live
	if !w.fresh {
		w.listener = e.hub.Listen(live.ID, w.onWake)
	}
	return w, nil
}

// attachStep finds the waiter of an existing durable step, ending it
// TIMED_OUT first if its deadline passed while nobody watched. nil: no such step.
func (e *Engine) attachStep(ctx context.Context, tx storage.Executor, runID, stepName, eventID string, now time.Time, t *tally) (*models.Waiter, error) {
	rec, err := tx.StepGet(ctx, runID, stepName)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if rec.Type != models.StepWaitForEvent {
		return nil, errorf(CodeBadUserInput, "step %q of run %s is a %s step, not a waitForEvent step", stepName, runID, rec.Type)
	}
	if rec.EventID != eventID {
		return nil, errorf(CodeBadUserInput, "step %q of run %s waits for event %q, not %q", stepName, runID, rec.EventID, eventID)
	}
	w, err := tx.WaiterGet(ctx, rec.WaiterID)
	if err != nil {
		return nil, fmt.Errorf("waiter of step %s/%s: %w", runID, stepName, err)
	}
	if eff := effective(w, now); eff.State != w.State {
		ended, err := tx.WaiterEnd(ctx, &storage.WaiterEndParams{WaiterIDs: []string{w.ID}, State: models.WaiterTimedOut, EndedAt: now})
		if err != nil {
			return nil, err
		}
		t.timedOut += len(ended)
		return eff, nil
	}
	return w, nil
}

func (e *Engine) insertWaiter(ctx context.Context, tx storage.Executor, w *models.Waiter) error {
	if err := tx.WaiterInsert(ctx, w); err != nil {
		return err
	}
	if w.StepName == nil {
		return nil
	}
	return tx.StepInsert(ctx, &storage.StepRecord{
		RunID: *w.WorkflowRunID, StepName: *w.StepName, Type: models.StepWaitForEvent,
		EventID: w.EventID, WaiterID: w.ID, CreatedAt: w.CreatedAt,
	})
}

// EndedAt is when the waiter ended, known once the result was delivered;
// zero when it is not known or not meaningful (a durable step that had
// ended before this subscriber came).
func (w *Wait) EndedAt() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.endedAt
}

// WaiterID is the id of the waiter this wait is for.
func (w *Wait) WaiterID() string {
	if w.waiter != nil {
		return w.waiter.ID
	}
	return w.result.WaiterID
}

// Watch calls deliver exactly once, when the waiter ends (notified, timed
// out, or canceled with its run, which is an error with CodeRunNotActive)
// or ctx ends first (with ctx's error, after a waiter without a step was
// removed; a durable one stays). deliver runs on some goroutine that is not
// the caller's, or on the caller's before Watch returns when the result was
// known at once; it may block only briefly. Database trouble while waiting
// is retried, not delivered: the subscriber keeps waiting and gets its
// result once the database is back.
func (w *Wait) Watch(ctx context.Context, deliver func(*models.WaitResult, error)) {
	if w.waiter == nil {
		deliver(w.result, nil)
		return
	}
	w.mu.Lock()
	w.ctx, w.deliver = ctx, deliver
	early, look := w.early, w.lookEarly || !w.fresh
	w.timer = time.AfterFunc(w.waiter.Deadline.Sub(w.e.now()), w.onDeadline)
	w.stopCtx = context.AfterFunc(ctx, w.onLeave)
	w.mu.Unlock()
	switch {
	case early != nil:
		w.finish(early.Result, early.Err, early.EndedAt)
	case look:
		w.look()
	}
}

// onWake is the hub's call: the waiter ended (with its result when it
// ended in this process) or may have ("look in the database"). It runs on
// the publisher's goroutine, so it hands the work to another.
func (w *Wait) onWake(wk hub.Wake) {
	final := wk.Result != nil || wk.Err != nil
	w.mu.Lock()
	if w.done {
		w.mu.Unlock()
		return
	}
	if w.deliver == nil { // before Watch: keep it for Watch
		if final {
			w.early = &wk
		} else {
			w.lookEarly = true
		}
		w.mu.Unlock()
		return
	}
	w.mu.Unlock()
	if final {
		go w.finish(wk.Result, wk.Err, wk.EndedAt)
		return
	}
	w.look()
}

// look reads the waiter in a goroutine, one at a time; a wake while it
// runs makes it read once more.
func (w *Wait) look() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return
	}
	if w.looking {
		w.lookAgain = true
		return
	}
	w.looking = true
	go w.lookLoop()
}

func (w *Wait) lookLoop() {
	for {
		res, endedAt, err, done := w.lookup(w.ctx)
		if done {
			w.finish(res, err, endedAt)
			return
		}
		w.mu.Lock()
		if err != nil && w.ctx.Err() == nil {
			w.failures++
			w.e.log.WarnContext(w.ctx, "read waiter, will retry", "waiter", w.waiter.ID, "err", err)
			time.AfterFunc(retryDelay(w.failures), w.look)
			w.looking, w.lookAgain = false, false
			w.mu.Unlock()
			return
		}
		if err == nil {
			w.failures = 0
		}
		if !w.lookAgain || w.done {
			w.looking = false
			w.mu.Unlock()
			return
		}
		w.lookAgain = false
		w.mu.Unlock()
	}
}

// onDeadline is the deadline timer's call: it ends the waiter TIMED_OUT
// unless something else ended it first.
func (w *Wait) onDeadline() {
	w.mu.Lock()
	done := w.done
	w.mu.Unlock()
	if done {
		return
	}
	res, endedAt, err, ok := w.expire(w.ctx)
	if ok {
		w.finish(res, err, endedAt)
		return
	}
	if w.ctx.Err() != nil {
		return // onLeave ends it
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.failures++
	w.e.log.WarnContext(w.ctx, "time out waiter, will retry", "waiter", w.waiter.ID, "err", err)
	if !w.done {
		w.timer.Reset(retryDelay(w.failures))
	}
}

// onLeave is the context's call when the subscriber left first.
func (w *Wait) onLeave() {
	if !w.claim() {
		return
	}
	deliver := func() {
		w.e.endWait()
		w.deliver(nil, w.ctx.Err())
	}
	if w.durable {
		deliver()
		return
	}
	// The removal is a compare-and-set: a waiter that ended meanwhile stays.
	w.e.releaseWaiter(w.waiter.ID, deliver)
}

// finish delivers an end, unless another end was delivered first.
func (w *Wait) finish(res *models.WaitResult, err error, endedAt time.Time) {
	if !w.claim() {
		return
	}
	w.mu.Lock()
	w.endedAt = endedAt
	w.mu.Unlock()
	w.e.endWait()
	w.deliver(res, err)
}

// claim makes the caller the one that delivers, stopping the timer, the
// context watch and the hub listener; false if another came first.
func (w *Wait) claim() bool {
	w.mu.Lock()
	if w.done {
		w.mu.Unlock()
		return false
	}
	w.done = true
	w.timer.Stop()
	w.stopCtx()
	w.mu.Unlock()
	w.e.hub.Unlisten(w.listener)
	return true
}

func retryDelay(failures int) time.Duration {
	return min(100*time.Millisecond<<min(failures, 6), 5*time.Second)
}

// lookup reads the waiter; done is true when it has ended.
func (w *Wait) lookup(ctx context.Context) (res *models.WaitResult, endedAt time.Time, err error, done bool) {
	cur, err := w.e.store.WaiterGet(ctx, w.waiter.ID)
	if errors.Is(err, storage.ErrNotFound) {
		// Reaped: this replica lost its lease (cut off from the database
		// for longer than LeaseTTL), so other replicas took it for dead.
		return nil, time.Time{}, errorf(CodeUnavailable, "this subscription's waiter was dropped while the server was cut off from the database; subscribe again"), true
	}
	if err != nil {
		return nil, time.Time{}, err, false
	}
	if cur.State == models.WaiterWaiting {
		if !cur.Deadline.After(w.e.now()) {
			return w.expire(ctx)
		}
		return nil, time.Time{}, nil, false
	}
	if cur.EndedAt != nil {
		endedAt = *cur.EndedAt
	}
	res, err = resultOf(cur)
	return res, endedAt, err, true
}

// expire ends the waiter TIMED_OUT, unless something else ended it first, in
// which case the winner's result is returned.
func (w *Wait) expire(ctx context.Context) (*models.WaitResult, time.Time, error, bool) {
	e := w.e
	now := e.now()
	ended, err := e.store.WaiterEnd(ctx, &storage.WaiterEndParams{
		WaiterIDs: []string{w.waiter.ID}, State: models.WaiterTimedOut, EndedAt: now,
	})
	if err != nil {
		return nil, time.Time{}, err, false
	}
	if len(ended) == 1 {
		e.record(tally{timedOut: 1})
		wk := wakeEnded(w.waiter, models.WaiterTimedOut, now)
		e.wake(ctx, map[string]hub.Wake{w.waiter.ID: wk}) // other subscribers of the same step
		return wk.Result, now, nil, true
	}
	cur, err := e.store.WaiterGet(ctx, w.waiter.ID)
	if err != nil {
		return nil, time.Time{}, err, false
	}
	if cur.State == models.WaiterWaiting {
		return nil, time.Time{}, fmt.Errorf("waiter %s: timeout lost to nobody", cur.ID), false
	}
	var endedAt time.Time
	if cur.EndedAt != nil {
		endedAt = *cur.EndedAt
	}
	res, err := resultOf(cur)
	return res, endedAt, err, true
}

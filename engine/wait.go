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

	// callback (WaitCallback): the waiter's callback, written with a waiter
	// this registration inserts; nobody listens on the hub for it.
	callback *storage.OutboxRecord
}

// Wait is one registered waitForEvent. Call Watch exactly once.
//
// A live wait owns no goroutine: the hub calls it when its waiter ends, a
// timer when its deadline passes, the context when its subscriber leaves,
// the catch-up poll when the database says its waiter is no longer
// waiting, and only then does a short-lived goroutine do database work.
// Tens of thousands of idle subscriptions cost memory for their state, not
// stacks.
//
// Every one of those causes only notes what happened and pokes the wait;
// one function, settle, decides from all that was noted what the outcome
// is, so there is one route to "has my waiter ended, and how", whichever
// cause came first or came together (as river's producer feeds its
// notifications and its poll into one trigger).
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

	mu       sync.Mutex
	ctx      context.Context
	deliver  func(*models.WaitResult, error) // set by Watch
	done     bool                            // deliver has been claimed
	noted    causes                          // what happened since settle last looked
	settling bool                            // a settle goroutine runs
	alarm    *time.Timer                     // the deadline, or the next retry after a database error
	stopCtx  func() bool
	failures int // database errors in a row, for the retry delay
}

// causes are what can end a wait. Each cause sets its field; settle takes
// them all at once.
type causes struct {
	// final: this process ended the waiter and had its result at hand.
	final *hub.Wake
	// look: it may have ended or be gone (a wake-up from another replica,
	// the catch-up poll): read it.
	look bool
	// alarm: the deadline timer, or a retry after a database error.
	alarm bool
	// left: the subscriber is gone (its context ended).
	left bool
}

func (c *causes) add(o causes) {
	if o.final != nil && c.final == nil {
		c.final = o.final
	}
	c.look = c.look || o.look
	c.alarm = c.alarm || o.alarm
	c.left = c.left || o.left
}

func (c causes) any() bool { return c.final != nil || c.look || c.alarm || c.left }

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
		if p.callback != nil {
			p.callback.WaiterID = "" // set when this attempt writes it
		}
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
				if err := e.insertCallback(ctx, tx, p.callback, born, now); err != nil {
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
		if p.callback != nil {
			return e.insertCallback(ctx, tx, p.callback, nw, now)
		}
		w.listener = e.hub.Listen(nw.ID, w.onWake)
		return nil
	})
	if err != nil {
		unlisten()
		if errors.Is(err, storage.ErrCommitUnknown) {
			err = e.readBackRegistration(ctx, w, live, ended, endedNow, err)
		}
		if err != nil {
			if errors.Is(err, storage.ErrCommitUnknown) && live != nil && w.fresh && !w.durable {
				// The waiter may exist, with nobody left to receive its event.
				e.retryRelease(live.ID)
			}
			return nil, storageErr("wait for "+p.EventID, err)
		}
		if w.result == nil && w.waiter == nil {
			return nil, storageErr("wait for "+p.EventID, fmt.Errorf("bug: registration read back without a waiter"))
		}
		e.record(t)
		return w, nil
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

// readBackTimeout bounds how long a registration whose COMMIT failed keeps
// asking the database whether it landed.
const readBackTimeout = 15 * time.Second

// readBackRegistration settles a registration whose COMMIT failed (err):
// it may have landed. Its waiter's id is known (the INSERT returned it), so
// the waiter is read back, retrying while the database cannot be reached.
// Found: the registration happened, and w is set up to go on with it (a
// waiter born notified delivers the lookback event it consumed; a live one
// is watched, read first like an attached one). Without this, a lookback
// event consumed by a registration whose answer was lost would be
// delivered to nobody. Not found, or no answer in time: err, as before.
//
// Not found is taken as "did not land", which holds unless the COMMIT is
// still on its way on the old connection; the server's wait_timeout ends
// that connection, and with it any such doubt, within seconds.
func (e *Engine) readBackRegistration(ctx context.Context, w *Wait, live, ended *models.Waiter, endedNow bool, err error) error {
	var id string
	switch {
	case ended != nil && endedNow && ended.ID != "":
		id = ended.ID
	case live != nil && w.fresh && live.ID != "":
		id = live.ID
	default:
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, readBackTimeout)
	defer cancel()
	var cur *models.Waiter
	for attempt := 1; cur == nil; attempt++ {
		got, gerr := e.store.WaiterGet(ctx, id)
		switch {
		case gerr == nil:
			cur = got
		case errors.Is(gerr, storage.ErrNotFound) || ctx.Err() != nil:
			return err
		default:
			select {
			case <-time.After(retryDelay(attempt)):
			case <-ctx.Done():
				return err
			}
		}
	}
	e.log.InfoContext(ctx, "a registration whose commit failed had landed; going on with it", "waiter", id)
	if live != nil && id == live.ID {
		w.waiter, w.fresh = live, false
		w.listener = e.hub.Listen(live.ID, w.onWake)
		return nil
	}
	res, rerr := resultOf(cur)
	if rerr != nil {
		return rerr
	}
	w.result = res
	if cur.EndedAt != nil {
		w.endedAt = *cur.EndedAt
	}
	return nil
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
// out, or canceled with its run, which is an error with CodeRunNotActive),
// when it is found gone (an error with CodeWaiterLost), or when ctx ends
// first (with ctx's error, after a waiter without a step was removed; a
// durable one stays). deliver runs on some goroutine that is not the
// caller's, or on the caller's before Watch returns when the result was
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
	if !w.fresh {
		w.noted.look = true
	}
	w.alarm = time.AfterFunc(w.waiter.Deadline.Sub(w.e.now()), func() { w.poke(causes{alarm: true}) })
	w.stopCtx = context.AfterFunc(ctx, func() { w.poke(causes{left: true}) })
	start := w.noted.any() && !w.settling
	w.settling = w.settling || start
	w.mu.Unlock()
	if start {
		go w.settle()
	}
}

// onWake is the hub's call: the waiter ended (with its result when it
// ended in this process) or may have ("look in the database"). It runs on
// the publisher's goroutine, so it only notes it.
func (w *Wait) onWake(wk hub.Wake) {
	if wk.Result != nil || wk.Err != nil {
		w.poke(causes{final: &wk})
		return
	}
	w.poke(causes{look: true})
}

// poke notes a cause and makes sure settle runs (after Watch: a cause
// noted before Watch is settled when Watch comes).
func (w *Wait) poke(c causes) {
	w.mu.Lock()
	if w.done {
		w.mu.Unlock()
		return
	}
	w.noted.add(c)
	if w.deliver == nil || w.settling {
		w.mu.Unlock()
		return
	}
	w.settling = true
	w.mu.Unlock()
	go w.settle()
}

// settle takes what was noted and decides, until nothing new was noted or
// the wait has delivered. Only one runs at a time.
func (w *Wait) settle() {
	for {
		w.mu.Lock()
		c := w.noted
		w.noted = causes{}
		if w.done || !c.any() {
			w.settling = false
			w.mu.Unlock()
			return
		}
		w.mu.Unlock()
		if w.decide(c) {
			return
		}
	}
}

// decide is the one place a wait's outcome is decided: true when it
// delivered. In order:
//   - a result this process had at hand is delivered as it is;
//   - a subscriber that left ends the wait (removing a waiter without a step);
//   - past the deadline (on the database's clock), the waiter is ended
//     TIMED_OUT by compare-and-set, whatever woke the wait: the deadline
//     timer, or a wake that came late;
//   - otherwise the row says: ended (its result), gone (CodeWaiterLost) or
//     still waiting (wait on, the alarm set for the deadline).
//
// A database error is retried with backoff by the alarm, never delivered.
func (w *Wait) decide(c causes) bool {
	switch {
	case c.final != nil:
		w.finish(c.final.Result, c.final.Err, c.final.EndedAt)
		return true
	case c.left:
		w.leave()
		return true
	}
	// Bounded, like the batched reads: a statement on a connection the
	// network black-holed must not hold the wait for good; it retries.
	ctx, cancel := context.WithTimeout(w.ctx, readTimeout)
	defer cancel()
	if !w.waiter.Deadline.After(w.e.now()) {
		won, err := w.expire(ctx)
		if err != nil {
			w.retry("time out waiter", err)
			return false
		}
		if won {
			return true
		}
		// Something else ended it first (or it is gone): read what.
	}
	cur, err := w.e.readWaiter(ctx, w.waiter.ID)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		w.finish(nil, errWaiterLost(w.waiter), time.Time{})
		return true
	case err != nil:
		w.retry("read waiter", err)
		return false
	case cur.State != models.WaiterWaiting:
		var endedAt time.Time
		if cur.EndedAt != nil {
			endedAt = *cur.EndedAt
		}
		res, err := resultOf(cur)
		w.finish(res, err, endedAt)
		return true
	}
	// Still waiting: the alarm goes back to the deadline (a retry may have
	// moved it), and rings at once if the deadline passed meanwhile.
	w.mu.Lock()
	w.failures = 0
	if !w.done {
		w.alarm.Reset(w.waiter.Deadline.Sub(w.e.now()))
	}
	w.mu.Unlock()
	return false
}

// errWaiterLost is the outcome of a wait whose waiter is gone while it was
// waiting. That happens to a waiter without a step whose replica was cut
// off from the database for longer than its lease while another replica
// stayed up: the other took this one for dead and reaped its waiters.
//
// Why an error and not a new waiter registered in its place: from the
// moment the lease looked expired, notifies skipped this waiter. A
// targeted notify then stored a lookback event, which a new registration
// would consume; but a broadcast notify (which also resolves waiters of a
// run) resolved only the waiters it counted, so an event may have gone by
// that a silently re-registered waiter would never hear of. Only the
// client can tell whether that matters, so it is told: the subscription
// ends with CodeWaiterLost, and subscribing again consumes any lookback
// event stored meanwhile, as for any new subscription.
func errWaiterLost(w *models.Waiter) error {
	return errorf(CodeWaiterLost, "the waiter %s of this subscription was removed because this server's lease ran out (it was cut off from the database, or too busy to renew the lease in time); it received nothing: subscribe again (a targeted notify sent meanwhile was kept as a lookback event and is delivered then)", w.ID)
}

// retry notes a database error and sets the alarm for another try.
func (w *Wait) retry(what string, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done || w.ctx.Err() != nil {
		return // the subscriber left: its poke settles the wait
	}
	w.failures++
	w.e.log.WarnContext(w.ctx, what+", will retry", "waiter", w.waiter.ID, "err", err)
	w.alarm.Reset(retryDelay(w.failures))
}

// leave ends the wait of a subscriber that left first.
func (w *Wait) leave() {
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

// claim makes the caller the one that delivers, stopping the alarm, the
// context watch and the hub listener; false if another came first.
func (w *Wait) claim() bool {
	w.mu.Lock()
	if w.done {
		w.mu.Unlock()
		return false
	}
	w.done = true
	w.alarm.Stop()
	w.stopCtx()
	w.mu.Unlock()
	w.e.hub.Unlisten(w.listener)
	return true
}

func retryDelay(failures int) time.Duration {
	return min(100*time.Millisecond<<min(failures, 6), 5*time.Second)
}

// expire ends the waiter TIMED_OUT by compare-and-set and, when it won,
// delivers that; false when something else had ended it (or it is gone).
func (w *Wait) expire(ctx context.Context) (bool, error) {
	e := w.e
	now := e.now()
	// On the store: one statement for a waiter without a step; a durable
	// step's callback, if it has one, is made due in the same transaction.
	ended, err := e.store.WaiterEnd(ctx, &storage.WaiterEndParams{
		WaiterIDs: []string{w.waiter.ID}, State: models.WaiterTimedOut, EndedAt: now,
		NoCallbacks: w.waiter.StepName == nil,
	})
	if err != nil || len(ended) == 0 {
		return false, err
	}
	e.record(tally{timedOut: 1})
	wk := wakeEnded(w.waiter, models.WaiterTimedOut, now)
	e.wake(ctx, map[string]hub.Wake{w.waiter.ID: wk}) // other subscribers of the same step
	w.finish(wk.Result, wk.Err, now)
	return true, nil
}

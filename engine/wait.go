package engine

import (
	"context"
	"errors"
	"fmt"
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

// Wait is one registered waitForEvent. Call Result exactly once.
type Wait struct {
	e        *Engine
	waiter   *models.Waiter // nil when the result was known at once
	result   *models.WaitResult
	durable  bool
	listener *hub.Listener
	// endedAt is when the waiter ended, once Result knows it (zero for a
	// durable step that had ended before this subscriber came).
	endedAt time.Time
}

// Wait registers a waiter, or attaches to the waiter of a durable step, or
// hands over a stored lookback event at once. It listens on the hub right
// after the registration commits and Result then reads the database once,
// so an end that commits between the two is not missed.
func (e *Engine) Wait(ctx context.Context, p WaitParams) (*Wait, error) {
	// Counted from before the registration, so that a shutdown cannot close
	// the database between our commit and our cleanup.
	if !e.beginWait() {
		return nil, errorf(CodeUnavailable, "the service is shutting down; try again")
	}
	w, err := e.register(ctx, p)
	if err != nil || w.waiter == nil {
		e.endWait() // no Result will follow that needs the count
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
	err = e.store.InTx(ctx, func(tx storage.Executor) error {
		live, ended, endedNow, t = nil, nil, false, tally{}
		now := e.now()
		if runID != nil {
			run, err := e.lockRun(ctx, tx, *runID)
			if err != nil {
				return err
			}
			if stepName != nil {
				w, err := e.attachStep(ctx, tx, *runID, *stepName, p.EventID, now, &t)
				if err != nil {
					return err
				}
				if w != nil {
					if w.State == models.WaiterWaiting {
						live = w
					} else {
						ended = w
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
				w := &models.Waiter{
					EventID: p.EventID, WorkflowRunID: runID, StepName: stepName,
					State: models.WaiterNotified, Deadline: now.Add(timeout), CreatedAt: now,
					EndedAt: &now, MessageID: &ev.MessageID, EventData: ev.EventData,
				}
				if err := e.insertWaiter(ctx, tx, w); err != nil {
					return err
				}
				ended, endedNow = w, true
				t.consumed, t.notified = 1, 1
				return nil
			}
		}
		w := &models.Waiter{
			EventID: p.EventID, WorkflowRunID: runID, StepName: stepName,
			State: models.WaiterWaiting, Deadline: now.Add(timeout), CreatedAt: now, Owner: owner,
		}
		if err := e.insertWaiter(ctx, tx, w); err != nil {
			return err
		}
		live = w
		return nil
	})
	if err != nil {
		return nil, storageErr("wait for "+p.EventID, err)
	}
	e.record(t)
	if ended != nil {
		res, err := resultOf(ended)
		if err != nil {
			return nil, err
		}
		w := &Wait{e: e, result: res}
		if endedNow && ended.EndedAt != nil {
			w.endedAt = *ended.EndedAt
		}
		return w, nil
	}
	return &Wait{e: e, waiter: live, durable: stepName != nil, listener: e.hub.Listen(live.ID)}, nil
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

// EndedAt is when the waiter ended, known once Result has returned; zero
// when it is not known or not meaningful (a durable step that had ended
// before this subscriber came).
func (w *Wait) EndedAt() time.Time { return w.endedAt }

// WaiterID is the id of the waiter this wait is for.
func (w *Wait) WaiterID() string {
	if w.waiter != nil {
		return w.waiter.ID
	}
	return w.result.WaiterID
}

// Result blocks until the waiter ends (notified, timed out, or canceled with
// its run, which is an error with CodeRunNotActive) or ctx ends. When ctx
// ends first, a waiter without a step is removed; a durable one stays.
// Database trouble while waiting is retried, not returned: the subscriber
// keeps waiting and gets its result once the database is back.
func (w *Wait) Result(ctx context.Context) (*models.WaitResult, error) {
	if w.waiter == nil {
		return w.result, nil
	}
	e := w.e
	defer e.endWait()
	defer e.hub.Unlisten(w.listener)

	deadline := time.NewTimer(w.waiter.Deadline.Sub(e.now()))
	defer deadline.Stop()
	var retry <-chan time.Time
	failures := 0
	look := true // register, then read: the first look covers ends before Listen
	for {
		if look {
			look = false
			res, err, done := w.lookup(ctx)
			if done {
				return res, err
			}
			if err != nil && ctx.Err() == nil {
				failures++
				e.log.WarnContext(ctx, "read waiter, will retry", "waiter", w.waiter.ID, "err", err)
				retry = time.After(retryDelay(failures))
			}
		}
		select {
		case wk := <-w.listener.C:
			if wk.Result != nil || wk.Err != nil {
				w.endedAt = wk.EndedAt
				return wk.Result, wk.Err
			}
			look = true
		case <-deadline.C:
			res, err, done := w.expire(ctx)
			if done {
				return res, err
			}
			if ctx.Err() == nil {
				failures++
				e.log.WarnContext(ctx, "time out waiter, will retry", "waiter", w.waiter.ID, "err", err)
				deadline.Reset(retryDelay(failures))
			}
		case <-retry:
			look = true
		case <-ctx.Done():
			w.release()
			return nil, ctx.Err()
		}
	}
}

func retryDelay(failures int) time.Duration {
	return min(100*time.Millisecond<<min(failures, 6), 5*time.Second)
}

// lookup reads the waiter; done is true when it has ended.
func (w *Wait) lookup(ctx context.Context) (res *models.WaitResult, err error, done bool) {
	cur, err := w.e.store.WaiterGet(ctx, w.waiter.ID)
	if errors.Is(err, storage.ErrNotFound) {
		// Reaped: this replica lost its lease (cut off from the database
		// for longer than LeaseTTL), so other replicas took it for dead.
		return nil, errorf(CodeUnavailable, "this subscription's waiter was dropped while the server was cut off from the database; subscribe again"), true
	}
	if err != nil {
		return nil, err, false
	}
	if cur.State == models.WaiterWaiting {
		if !cur.Deadline.After(w.e.now()) {
			return w.expire(ctx)
		}
		return nil, nil, false
	}
	if cur.EndedAt != nil {
		w.endedAt = *cur.EndedAt
	}
	res, err = resultOf(cur)
	return res, err, true
}

// expire ends the waiter TIMED_OUT, unless something else ended it first, in
// which case the winner's result is returned.
func (w *Wait) expire(ctx context.Context) (*models.WaitResult, error, bool) {
	e := w.e
	now := e.now()
	ended, err := e.store.WaiterEnd(ctx, &storage.WaiterEndParams{
		WaiterIDs: []string{w.waiter.ID}, State: models.WaiterTimedOut, EndedAt: now,
	})
	if err != nil {
		return nil, err, false
	}
	if len(ended) == 1 {
		e.record(tally{timedOut: 1})
		wk := wakeEnded(w.waiter, models.WaiterTimedOut, now)
		w.endedAt = now
		e.wake(ctx, map[string]hub.Wake{w.waiter.ID: wk}) // other subscribers of the same step
		return wk.Result, nil, true
	}
	cur, err := e.store.WaiterGet(ctx, w.waiter.ID)
	if err != nil {
		return nil, err, false
	}
	if cur.State == models.WaiterWaiting {
		return nil, fmt.Errorf("waiter %s: timeout lost to nobody", cur.ID), false
	}
	if cur.EndedAt != nil {
		w.endedAt = *cur.EndedAt
	}
	res, err := resultOf(cur)
	return res, err, true
}

// release removes a waiter without a step when its subscriber leaves. The
// delete is a compare-and-set too: a waiter that ended meanwhile stays.
func (w *Wait) release() {
	if w.durable {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	removed, err := w.e.store.WaiterDeleteWaiting(ctx, w.waiter.ID)
	if err != nil {
		// Left WAITING it would count for notifies (its owner, this
		// replica, is alive): the sweep loop tries again until it is gone.
		w.e.log.Warn("remove waiter of a closed subscription, will retry", "waiter", w.waiter.ID, "err", err)
		w.e.retryRelease(w.waiter.ID)
	}
	if removed {
		w.e.record(tally{removed: 1})
	}
}

// retryRelease queues a waiter whose removal failed.
func (e *Engine) retryRelease(id string) {
	e.unreleasedMu.Lock()
	defer e.unreleasedMu.Unlock()
	if e.unreleased == nil {
		e.unreleased = map[string]struct{}{}
	}
	e.unreleased[id] = struct{}{}
}

// releaseRetries removes queued waiters, a bounded number per call.
func (e *Engine) releaseRetries(ctx context.Context) {
	const perRound = 2000
	e.unreleasedMu.Lock()
	ids := make([]string, 0, min(len(e.unreleased), perRound))
	for id := range e.unreleased {
		if len(ids) == perRound {
			break
		}
		ids = append(ids, id)
	}
	e.unreleasedMu.Unlock()
	for _, id := range ids {
		removed, err := e.store.WaiterDeleteWaiting(ctx, id)
		if err != nil {
			return // the database is still struggling; next round
		}
		if removed {
			e.record(tally{removed: 1})
		}
		e.unreleasedMu.Lock()
		delete(e.unreleased, id)
		e.unreleasedMu.Unlock()
	}
}

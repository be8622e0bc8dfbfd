package engine

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"rendezvous/hub"
	"rendezvous/models"
	"rendezvous/storage"
)

// TriggerParams are the inputs of Trigger.
type TriggerParams struct {
	RunID *string // nil: generate one
	Body  json.RawMessage
	Label *string
	// Dispatch, when set, POSTs the run to a URL instead of handing it to a
	// runsToStart worker (see outbox.go).
	Dispatch *models.DispatchInput
}

// Trigger creates a run in RUN_STARTED. With an id that exists it returns the
// existing run, unchanged, with Created false.
func (e *Engine) Trigger(ctx context.Context, p TriggerParams) (*models.TriggerResult, error) {
	id := newID(RunIDPrefix)
	if p.RunID != nil {
		var err error
		if id, err = e.normalizeRunID(*p.RunID); err != nil {
			return nil, err
		}
	}
	if err := e.checkPayload("body", p.Body); err != nil {
		return nil, err
	}
	if p.Label != nil {
		if err := e.checkText("label", *p.Label, false); err != nil {
			return nil, err
		}
	}
	var ob *storage.OutboxRecord
	var delay time.Duration
	if p.Dispatch != nil {
		var err error
		if ob, err = e.outboxFor(p.Dispatch); err != nil {
			return nil, err
		}
		if p.Dispatch.Delay != nil {
			delay = *p.Dispatch.Delay
		}
	}
	now := e.now()
	run := &models.WorkflowRun{
		WorkflowRunID: id,
		State:         models.RunStarted,
		Body:          nullJSON(p.Body),
		Label:         p.Label,
		CreatedAt:     now,
		UpdatedAt:     now,
	}
	err := e.insertRun(ctx, run, ob, delay)
	if errors.Is(err, storage.ErrDuplicate) {
		existing, err := e.store.RunGet(ctx, id, false)
		if err != nil {
			return nil, storageErr("trigger "+id, err)
		}
		e.rec.RunTriggered(false)
		return &models.TriggerResult{WorkflowRunID: id, Created: false, Run: existing}, nil
	}
	if err != nil {
		return nil, storageErr("trigger "+id, err)
	}
	e.rec.RunTriggered(true)
	return &models.TriggerResult{WorkflowRunID: id, Created: true, Run: run}, nil
}

// Cancel moves a started run to RUN_CANCELED, ends its waiters CANCELED and
// drops its pending lookback events.
func (e *Engine) Cancel(ctx context.Context, runID string) (*models.WorkflowRun, error) {
	return e.endRun(ctx, runID, models.RunCanceled, nil)
}

// FinishRun ends a started run with RUN_SUCCESS or RUN_FAILED and keeps
// result; its waiters end CANCELED and its lookback events are dropped.
func (e *Engine) FinishRun(ctx context.Context, runID string, state models.RunState, result json.RawMessage) (*models.WorkflowRun, error) {
	if state != models.RunSuccess && state != models.RunFailed {
		return nil, errorf(CodeBadUserInput, "finishRun state must be RUN_SUCCESS or RUN_FAILED, got %s", state)
	}
	if err := e.checkPayload("result", result); err != nil {
		return nil, err
	}
	return e.endRun(ctx, runID, state, nullJSON(result))
}

// also, if given, run inside the transaction after the run has ended.
func (e *Engine) endRun(ctx context.Context, rawID string, state models.RunState, result json.RawMessage, also ...func(tx storage.Executor, now time.Time) error) (*models.WorkflowRun, error) {
	id, err := e.normalizeRunID(rawID)
	if err != nil {
		return nil, err
	}
	var (
		run   *models.WorkflowRun
		wakes map[string]hub.Wake
		t     tally
	)
	err = e.store.InTx(ctx, func(tx storage.Executor) error {
		wakes, t = map[string]hub.Wake{}, tally{}
		now := e.now()
		var err error
		if run, err = e.lockActiveRun(ctx, tx, id); err != nil {
			return err
		}
		if err := tx.RunEnd(ctx, &storage.RunEndParams{RunID: id, State: state, Result: result, UpdatedAt: now}); err != nil {
			return err
		}
		run.State, run.Result, run.UpdatedAt = state, result, now
		for _, f := range also {
			if err := f(tx, now); err != nil {
				return err
			}
		}
		if err := e.endHandOvers(ctx, tx, id, now); err != nil {
			return err
		}

		// Only the waiters still WAITING, chosen by the database: a long
		// run's ended waiters stay where they are, outside the run's lock.
		waiters, err := tx.WaiterListWaitingByRun(ctx, id)
		if err != nil {
			return err
		}
		var live, expired []string
		byID := make(map[string]*models.Waiter, len(waiters))
		for _, w := range waiters {
			byID[w.ID] = w
			if w.Deadline.After(now) {
				live = append(live, w.ID)
			} else {
				expired = append(expired, w.ID)
			}
		}
		none := noCallbacks(waiters)
		canceled, err := tx.WaiterEnd(ctx, &storage.WaiterEndParams{WaiterIDs: live, State: models.WaiterCanceled, EndedAt: now, DeadlineAfter: &now, NoCallbacks: none})
		if err != nil {
			return err
		}
		timedOut, err := tx.WaiterEnd(ctx, &storage.WaiterEndParams{WaiterIDs: expired, State: models.WaiterTimedOut, EndedAt: now, NoCallbacks: none})
		if err != nil {
			return err
		}
		for _, wid := range canceled {
			wakes[wid] = wakeEnded(byID[wid], models.WaiterCanceled, now)
		}
		for _, wid := range timedOut {
			wakes[wid] = wakeEnded(byID[wid], models.WaiterTimedOut, now)
		}
		t.canceled, t.timedOut = len(canceled), len(timedOut)
		dropped, err := tx.LookbackEventDeleteByRun(ctx, id)
		t.dropped = int(dropped)
		return err
	})
	if err != nil {
		return nil, storageErr(fmt.Sprintf("end run %s as %s", id, state), err)
	}
	e.record(t)
	e.wake(ctx, wakes)
	return run, nil
}

// lockActiveRun takes the run's row lock and checks that it is started.
func (e *Engine) lockActiveRun(ctx context.Context, tx storage.Executor, id string) (*models.WorkflowRun, error) {
	run, err := e.lockRun(ctx, tx, id)
	if err != nil {
		return nil, err
	}
	if run.State != models.RunStarted {
		return nil, errorf(CodeRunNotActive, "workflow run %s is %s", id, run.State)
	}
	return run, nil
}

func (e *Engine) lockRun(ctx context.Context, tx storage.Executor, id string) (*models.WorkflowRun, error) {
	run, err := tx.RunGet(ctx, id, true)
	if err != nil {
		return nil, runNotFound(id, err)
	}
	return run, nil
}

// runNotFound turns the store's ErrNotFound for run id into the caller's
// NOT_FOUND error; other errors pass unchanged.
func runNotFound(id string, err error) error {
	if errors.Is(err, storage.ErrNotFound) {
		return errorf(CodeNotFound, "workflow run %s not found", id)
	}
	return err
}

// Run returns the run, or nil if there is none.
func (e *Engine) Run(ctx context.Context, rawID string) (*models.WorkflowRun, error) {
	id, err := e.normalizeRunID(rawID)
	if err != nil {
		return nil, err
	}
	run, err := e.store.RunGet(ctx, id, false)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, nil
	}
	return run, storageErr("get run "+id, err)
}

// RunsParams filter and page Runs.
type RunsParams struct {
	State *models.RunState
	Label *string
	First int
	After *string // cursor from PageInfo.EndCursor
}

// MaxPageSize bounds Runs' First.
const MaxPageSize = 100

// Runs lists runs newest first.
func (e *Engine) Runs(ctx context.Context, p RunsParams) (*models.WorkflowRunConnection, error) {
	if p.First < 1 || p.First > MaxPageSize {
		return nil, errorf(CodeBadUserInput, "first must be between 1 and %d", MaxPageSize)
	}
	lp := &storage.RunListParams{State: p.State, Label: p.Label, Limit: p.First + 1}
	if p.After != nil && *p.After != "" {
		raw, err := base64.RawURLEncoding.DecodeString(*p.After)
		if err != nil || len(raw) == 0 {
			return nil, errorf(CodeBadUserInput, "after is not a cursor this service made")
		}
		lp.AfterRunID = string(raw)
	}
	runs, err := e.store.RunList(ctx, lp)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, errorf(CodeBadUserInput, "after is not a cursor this service made")
	}
	if err != nil {
		return nil, storageErr("list runs", err)
	}
	conn := &models.WorkflowRunConnection{PageInfo: &models.PageInfo{}}
	if len(runs) > p.First {
		runs = runs[:p.First]
		conn.PageInfo.HasNextPage = true
	}
	conn.Nodes = runs
	if len(runs) > 0 {
		c := base64.RawURLEncoding.EncodeToString([]byte(runs[len(runs)-1].WorkflowRunID))
		conn.PageInfo.EndCursor = &c
	}
	return conn, nil
}

// RunWaiters lists every waiter the run has had, oldest first, with
// deadlines applied.
func (e *Engine) RunWaiters(ctx context.Context, runID string) ([]*models.Waiter, error) {
	ws, err := e.store.WaiterListByRun(ctx, runID)
	if err != nil {
		return nil, storageErr("list waiters of "+runID, err)
	}
	now := e.now()
	for i, w := range ws {
		ws[i] = effective(w, now)
	}
	return ws, nil
}

// RunLookbackEvents lists the run's lookback events not yet consumed or expired.
func (e *Engine) RunLookbackEvents(ctx context.Context, runID string) ([]*models.LookbackEvent, error) {
	evs, err := e.store.LookbackEventListByRun(ctx, runID, e.now())
	return evs, storageErr("list lookback events of "+runID, err)
}

// RunSteps lists the run's durable steps in the order they were first run. A
// waitForEvent step completes when its waiter ends; the store reads each
// step's waiter with the step, not every waiter the run has had.
func (e *Engine) RunSteps(ctx context.Context, runID string) ([]*models.Step, error) {
	recs, err := e.store.StepListByRun(ctx, runID)
	if err != nil {
		return nil, storageErr("list steps of "+runID, err)
	}
	out := make([]*models.Step, len(recs))
	now := e.now()
	for i, r := range recs {
		s := &models.Step{StepName: r.StepName, Type: r.Type, EventID: r.EventID, CreatedAt: r.CreatedAt, CompletedAt: r.CompletedAt}
		if r.Type == models.StepWaitForEvent && r.Waiter != nil {
			w := &models.Waiter{State: r.Waiter.State, Deadline: r.Waiter.Deadline, EndedAt: r.Waiter.EndedAt}
			s.CompletedAt = effective(w, now).EndedAt
		}
		out[i] = s
	}
	return out, nil
}

// ActiveWaiters lists the waiters WAITING on the event id, oldest first.
func (e *Engine) ActiveWaiters(ctx context.Context, eventID string) ([]*models.Waiter, error) {
	if err := e.checkEventID(eventID); err != nil {
		return nil, err
	}
	ws, err := e.store.WaiterListWaiting(ctx, &storage.WaiterListWaitingParams{EventID: eventID, Now: e.now(), Self: e.replicaID})
	return ws, storageErr("list waiters on "+eventID, err)
}

package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"rendezvous/hub"
	"rendezvous/models"
	"rendezvous/storage"
)

// NotifyParams are the inputs of Notify.
type NotifyParams struct {
	EventID   string
	EventData json.RawMessage
	// RunID targets one run (lookback if it has no waiter); nil broadcasts.
	RunID *string
	// Step makes the notify a durable step of the notifying run.
	Step *models.StepRef
}

// Notify delivers an event.
//
// Broadcast (no RunID): every waiter WAITING on the event id when the
// transaction commits is resolved; with none, nothing is stored.
// Targeted: the run's waiting waiters on the event id are resolved; with
// none, one lookback event is stored. The run's row lock serialises this
// with waitForEvent registering on the same run, so the event is delivered
// exactly once whichever comes first.
// With Step: the first call does the above and records its result; a repeat
// returns that result, marked deduplicated, and notifies nobody.
// A targeted notify without a step may be committed together with others
// arriving at the same time (notifygroup.go), with the same outcome.
func (e *Engine) Notify(ctx context.Context, p NotifyParams) (res *models.NotifyResult, err error) {
	start := time.Now()
	defer func() { e.rec.NotifyDone(notifyKind(p), notifyOutcome(res, err), time.Since(start)) }()
	if err := e.checkEventID(p.EventID); err != nil {
		return nil, err
	}
	if err := e.checkPayload("eventData", p.EventData); err != nil {
		return nil, err
	}
	data := nullJSON(p.EventData)
	var target string
	if p.RunID != nil {
		var err error
		if target, err = e.normalizeRunID(*p.RunID); err != nil {
			return nil, err
		}
	}
	var step *models.StepRef
	if p.Step != nil {
		stepRun, err := e.normalizeRunID(p.Step.WorkflowRunID)
		if err != nil {
			return nil, errorf(CodeBadUserInput, "step.%s", err.Error())
		}
		if err := e.checkText("step.stepName", p.Step.StepName, true); err != nil {
			return nil, err
		}
		step = &models.StepRef{WorkflowRunID: stepRun, StepName: p.Step.StepName}
	}

	messageID := newID("msg_")
	if step == nil && target != "" {
		grouped, wakes, alone, err := e.notifyGrouped(ctx, target, p.EventID, data, messageID)
		if !alone {
			if err != nil {
				return nil, storageErr("notify "+p.EventID, err)
			}
			e.recordNotify(grouped)
			e.wake(ctx, wakes)
			return grouped, nil
		}
	}
	var (
		result *models.NotifyResult
		wakes  map[string]hub.Wake
	)
	err = e.store.InTx(ctx, func(tx storage.Executor) error {
		result, wakes = nil, map[string]hub.Wake{}
		now := e.now()

		// Lock every run involved in one order (by id), so two runs
		// notifying each other cannot deadlock. The target's lock comes
		// with its waiting waiters, in one statement: a targeted notify's
		// list is the run's, and holding the lock keeps new ones out.
		states := map[string]models.RunState{}
		var (
			lockIDs []string
			waiting []*models.Waiter
			lapsed  []string // waiters skipped for their owner's lapsed lease
		)
		if step != nil {
			lockIDs = append(lockIDs, step.WorkflowRunID)
		}
		if target != "" && (step == nil || target != step.WorkflowRunID) {
			lockIDs = append(lockIDs, target)
		}
		slices.Sort(lockIDs)
		for _, id := range lockIDs {
			if id == target {
				state, ws, err := tx.RunLockListWaiting(ctx, &storage.RunLockListWaitingParams{
					RunID: id, EventID: p.EventID, Self: e.replicaID, Now: now, Lapsed: &lapsed,
				})
				if err != nil {
					return runNotFound(id, err)
				}
				states[id], waiting = state, ws
				continue
			}
			run, err := e.lockRun(ctx, tx, id)
			if err != nil {
				return err
			}
			states[id] = run.State
		}

		if step != nil {
			rec, err := tx.StepGet(ctx, step.WorkflowRunID, step.StepName)
			switch {
			case err == nil:
				result, err = e.repeatNotifyStep(rec, p.EventID)
				return err
			case !errors.Is(err, storage.ErrNotFound):
				return err
			}
			if s := states[step.WorkflowRunID]; s != models.RunStarted {
				return errorf(CodeRunNotActive, "workflow run %s is %s", step.WorkflowRunID, s)
			}
		}
		if target != "" {
			if s := states[target]; s != models.RunStarted {
				return errorf(CodeRunNotActive, "workflow run %s is %s", target, s)
			}
		}

		if target == "" {
			var err error
			waiting, err = tx.WaiterListWaiting(ctx, &storage.WaiterListWaitingParams{EventID: p.EventID, Now: now, Self: e.replicaID, Lapsed: &lapsed})
			if err != nil {
				return err
			}
		}
		// Waiters whose replica's lease ran out do not count: that replica
		// may be dead. But it may only be cut off from the database, and
		// renew its lease when it is back; a waiter this notify skipped
		// must not then wait on as if nothing had gone by (rule 5: the
		// event would sit in a lookback event while its subscriber waits).
		// It is removed with this notify, and its subscriber, if alive,
		// told to subscribe again (CodeWaiterLost; see errWaiterLost).
		if len(lapsed) > 0 {
			if _, err := tx.WaiterDeleteWaiting(ctx, lapsed); err != nil {
				return err
			}
		}
		var err error
		// Without a step to record, a lookback event is the transaction's
		// last write and may commit with it.
		if result, err = e.resolve(ctx, tx, p.EventID, data, target, waiting, step == nil, messageID, now, wakes); err != nil {
			return err
		}
		if step != nil {
			encoded, err := encodeNotifyStepResult(result)
			if err != nil {
				return fmt.Errorf("encode step result: %w", err)
			}
			err = tx.StepInsert(ctx, &storage.StepRecord{
				RunID: step.WorkflowRunID, StepName: step.StepName, Type: models.StepNotify,
				EventID: p.EventID, Result: encoded, CreatedAt: now, CompletedAt: &now,
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, storageErr("notify "+p.EventID, err)
	}
	e.recordNotify(result)
	e.wake(ctx, wakes)
	return result, nil
}

// recordNotify counts what a notify did.
func (e *Engine) recordNotify(result *models.NotifyResult) {
	if !result.Deduplicated {
		t := tally{notified: len(result.NotifyResponse)}
		if result.Lookback != nil {
			t.stored = 1
		}
		e.record(t)
	}
}

func notifyKind(p NotifyParams) NotifyKind {
	switch {
	case p.Step != nil:
		return NotifyStep
	case p.RunID != nil:
		return NotifyTargeted
	}
	return NotifyBroadcast
}

func notifyOutcome(res *models.NotifyResult, err error) NotifyOutcome {
	switch {
	case err != nil || res == nil:
		return NotifyError
	case res.Deduplicated:
		return NotifyDeduplicated
	case len(res.NotifyResponse) > 0:
		return NotifyResolved
	case res.Lookback != nil:
		return NotifyLookback
	}
	return NotifyNone
}

// resolve ends the waiting waiters of the event id (of one run when target is
// set), listed by the caller, NOTIFIED and, for a targeted notify that ended
// none, stores a lookback event. Waiters past their deadline are not
// resolved: they have timed out. With last, the caller writes nothing after
// resolve and returns its error unchanged, so storing the lookback event
// may commit the transaction.
func (e *Engine) resolve(ctx context.Context, tx storage.Executor, eventID string, data json.RawMessage,
	target string, waiting []*models.Waiter, last bool, messageID string, now time.Time, wakes map[string]hub.Wake) (*models.NotifyResult, error) {
	ids := make([]string, len(waiting))
	for i, w := range waiting {
		ids[i] = w.ID
	}
	ended, err := tx.WaiterEnd(ctx, &storage.WaiterEndParams{
		WaiterIDs: ids, State: models.WaiterNotified, EndedAt: now, DeadlineAfter: &now,
		MessageID: &messageID, EventID: eventID, EventData: data, NoCallbacks: noCallbacks(waiting),
	})
	if err != nil {
		return nil, err
	}
	won := make(map[string]bool, len(ended))
	for _, id := range ended {
		won[id] = true
	}
	result := &models.NotifyResult{EventID: eventID, EventData: data, NotifyResponse: make([]*models.NotifyResponse, 0, len(ended))}
	for _, w := range waiting {
		if !won[w.ID] {
			continue // it ended another way between our read and our write
		}
		w.State, w.EndedAt, w.MessageID, w.EventData = models.WaiterNotified, &now, &messageID, data
		result.NotifyResponse = append(result.NotifyResponse, &models.NotifyResponse{
			Waiter: w, MessageID: messageID, WorkflowRunID: w.WorkflowRunID,
		})
		res, _ := resultOf(w)
		wakes[w.ID] = hub.Wake{Result: res, EndedAt: now}
	}
	if target != "" && len(result.NotifyResponse) == 0 {
		ev := &models.LookbackEvent{
			WorkflowRunID: target, EventID: eventID, EventData: data, MessageID: messageID,
			CreatedAt: now, ExpiresAt: now.Add(e.cfg.LookbackRetention),
		}
		insert := tx.LookbackEventInsert
		if last {
			insert = tx.LookbackEventInsertCommit
		}
		if err := insert(ctx, ev); err != nil {
			return nil, err
		}
		result.Lookback = ev
	}
	return result, nil
}

// repeatNotifyStep answers a notify step that already ran with its first
// result, every response marked deduplicated.
func (e *Engine) repeatNotifyStep(rec *storage.StepRecord, eventID string) (*models.NotifyResult, error) {
	if rec.Type != models.StepNotify {
		return nil, errorf(CodeBadUserInput, "step %q of run %s is a %s step, not a notify step", rec.StepName, rec.RunID, rec.Type)
	}
	if rec.EventID != eventID {
		return nil, errorf(CodeBadUserInput, "step %q of run %s already notified event %q, not %q", rec.StepName, rec.RunID, rec.EventID, eventID)
	}
	first, err := decodeNotifyStepResult(rec.Result)
	if err != nil {
		return nil, fmt.Errorf("decode result of step %s/%s: %w", rec.RunID, rec.StepName, err)
	}
	first.Deduplicated = true
	for _, r := range first.NotifyResponse {
		r.Deduplicated = true
	}
	return first, nil
}

package engine

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"rendezvous/hub"
	"rendezvous/models"
	"rendezvous/storage"
)

// Completion URLs: POST /hooks/<token> completes one durable waiter with
// the request's body as its event data. The token (checked by auth, read
// by the HTTP surface) is the whole credential, so every way it can fail
// (unknown waiter, a waiter that is not a durable step, a token made for
// another waiter, an expired one) is the same NOT_FOUND, saying nothing
// more.
//
// A completion is a notify addressed to one waiter: it ends it NOTIFIED
// through resolve, the same compare-and-set as every notify, so it races
// notify, timeout and cancel by the rules (rule 9: one wins, the others see
// its result), stores its data as a notification, and wakes the waiter's
// subscribers on this replica and, through the bus, on the others. It takes
// the run's lock first, in the order targeted notifies and cancel take
// theirs (run, then waiter). It never stores a lookback event: a waiter
// that ended is answered as such.

// CompleteParams are the inputs of Complete.
type CompleteParams struct {
	WaiterID string
	// Expires is when the credential stops working: from then on the
	// waiter is not found.
	Expires time.Time
	// Owns reports whether the credential was made for this waiter (its
	// run, step and deadline); false: not found.
	Owns      func(w *models.Waiter) bool
	EventData json.RawMessage
}

// CompleteResult is what Complete did.
type CompleteResult struct {
	// Won: this call ended the waiter. Otherwise the waiter had ended
	// before (Waiter.State, Waiter.MessageID say how) and nothing was done.
	Won bool
	// Waiter as it is after the call (without its event data).
	Waiter *models.Waiter
}

// errCompletionNotFound is every "no" of a completion URL: one message, so
// that a caller cannot tell which check failed.
func errCompletionNotFound() error { return errorf(CodeNotFound, "not found") }

// Complete ends the durable waiter NOTIFIED with p.EventData, once: the
// first call wins, later ones get the waiter as it ended (Won false). A run
// whose waiter is still WAITING is started (ending a run ends its waiters
// CANCELED in the same transaction); should that ever not hold, the answer
// is RUN_NOT_ACTIVE and nothing is done.
func (e *Engine) Complete(ctx context.Context, p CompleteParams) (res *CompleteResult, err error) {
	start := time.Now()
	defer func() {
		outcome := NotifyError
		switch {
		case err == nil && res.Won:
			outcome = NotifyResolved
		case err == nil:
			outcome = NotifyNone
		}
		e.rec.NotifyDone(NotifyCompletionURL, outcome, time.Since(start))
	}()
	if err := e.checkPayload("eventData", p.EventData); err != nil {
		return nil, err
	}
	data := nullJSON(p.EventData)
	if !e.now().Before(p.Expires) {
		return nil, errCompletionNotFound()
	}
	w, err := e.store.WaiterGet(ctx, p.WaiterID)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return nil, errCompletionNotFound()
	case err != nil:
		return nil, storageErr("read waiter for completion", err)
	case w.WorkflowRunID == nil || w.StepName == nil || p.Owns == nil || !p.Owns(w):
		return nil, errCompletionNotFound()
	}
	w.EventData = nil
	if eff := effective(w, e.now()); eff.State != models.WaiterWaiting {
		// A replay: answered from one read, no transaction.
		return &CompleteResult{Waiter: eff}, nil
	}

	messageID := newID("msg_")
	var (
		result *CompleteResult
		wakes  map[string]hub.Wake
	)
	err = e.store.InTx(ctx, func(tx storage.Executor) error {
		result, wakes = nil, map[string]hub.Wake{}
		now := e.now()
		run, err := e.lockRun(ctx, tx, *w.WorkflowRunID)
		if err != nil {
			if ErrorCode(err) == CodeNotFound {
				return errCompletionNotFound() // purged with its run meanwhile
			}
			return err
		}
		mine := *w
		if run.State == models.RunStarted {
			res, err := e.resolve(ctx, tx, w.EventID, data, "", []*models.Waiter{&mine}, false, messageID, now, wakes)
			if err != nil {
				return err
			}
			if len(res.NotifyResponse) == 1 {
				ended := *res.NotifyResponse[0].Waiter
				ended.EventData = nil
				result = &CompleteResult{Won: true, Waiter: &ended}
				return nil
			}
		}
		// It ended another way meanwhile (or its run did): say how.
		cur, err := tx.WaiterGet(ctx, w.ID)
		if errors.Is(err, storage.ErrNotFound) {
			return errCompletionNotFound()
		}
		if err != nil {
			return err
		}
		cur.EventData = nil
		cur = effective(cur, now)
		if cur.State == models.WaiterWaiting {
			return errorf(CodeRunNotActive, "workflow run %s is %s", run.WorkflowRunID, run.State)
		}
		result = &CompleteResult{Waiter: cur}
		return nil
	})
	if errors.Is(err, storage.ErrCommitUnknown) {
		return e.completeReadBack(ctx, w.ID, messageID, wakes, err)
	}
	if err != nil {
		return nil, storageErr("complete waiter "+w.ID, err)
	}
	if result.Won {
		e.record(tally{notified: 1})
	}
	e.wake(ctx, wakes)
	return result, nil
}

// completeReadBack settles a completion whose COMMIT outcome is unknown by
// reading its waiter back, so that the caller is not left to guess (a retry
// would get 409 and could not tell whether the win was its own). The
// message id is this call's alone: a waiter NOTIFIED with it is this call's
// win (its subscribers are woken, as after any commit), and a waiter ended
// another way means the commit did not land (a waiter ends once), answered
// as a replay. A waiter still WAITING proves nothing (the server finishes a
// COMMIT whose client went away, maybe after this read), nor does a failed
// read: both stay OUTCOME_UNKNOWN.
func (e *Engine) completeReadBack(ctx context.Context, waiterID, messageID string, wakes map[string]hub.Wake, commitErr error) (*CompleteResult, error) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), readTimeout)
	defer cancel()
	cur, err := e.store.WaiterGet(rctx, waiterID)
	if err != nil || cur.State == models.WaiterWaiting {
		return nil, storageErr("complete waiter "+waiterID, commitErr)
	}
	cur.EventData = nil
	if cur.MessageID != nil && *cur.MessageID == messageID {
		e.record(tally{notified: 1})
		e.wake(ctx, wakes)
		return &CompleteResult{Won: true, Waiter: cur}, nil
	}
	return &CompleteResult{Waiter: cur}, nil
}

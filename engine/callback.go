// Callback waiters (waitForEventCallback): a durable step whose result is
// POSTed to a URL when it ends, for workflows that cannot hold a
// connection open.
//
// The callback is an outbox row written with the waiter, HELD while the
// waiter waits. Whatever ends the waiter (a targeted or broadcast notify,
// the deadline, cancel or finishRun, a completion URL) ends it with
// storage's WaiterEnd, the one statement that moves a waiter out of
// WAITING; that statement makes the row PENDING and due, in the same
// transaction. A waiter born notified (a lookback event consumed at
// registration) has its row written PENDING at once. The delivery loop
// then POSTs it like a dispatch: signed, retried, at least once, with the
// same Rendezvous-Delivery-Id on every attempt. The body is built when an
// attempt is claimed, from the ended waiter, which never changes again.

package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"time"

	"rendezvous/models"
	"rendezvous/storage"
)

// WaitCallback registers a durable step waiter whose result is POSTed to
// cb.URL when it ends, and returns the waiter. The rules are waitForEvent's
// (DESIGN rules 4 to 11): the same (run, step) again returns that step's
// waiter, ended or not, and registers nothing (its callback, if it has one,
// is the first registration's); a lookback event waiting for the run is
// consumed at once and called back at once; a different event id for the
// step is BAD_USER_INPUT; a new step on a run that ended is RUN_NOT_ACTIVE.
func (e *Engine) WaitCallback(ctx context.Context, p WaitParams, cb *models.CallbackInput) (*models.Waiter, error) {
	if p.RunID == nil || p.StepName == nil {
		return nil, errorf(CodeBadUserInput, "waitForEventCallback needs workflowRunId and stepName: a callback waiter is a durable step")
	}
	if cb == nil {
		return nil, errorf(CodeBadUserInput, "callback is required")
	}
	rec, err := e.outboundRecord("callback", cb.URL, cb.Headers, cb.Retries)
	if err != nil {
		return nil, err
	}
	rec.Kind = storage.OutboxKindCallback
	p.callback = rec
	w, err := e.register(ctx, p)
	if err != nil {
		return nil, err
	}
	if w.listener != nil {
		// A registration whose commit failed and was read back listens:
		// nobody will watch this one.
		e.hub.Unlisten(w.listener)
		w.listener = nil
	}
	if rec.WaiterID != "" && rec.State == models.DispatchPending && e.cfg.Outbound.Written != nil {
		e.cfg.Outbound.Written() // born notified: called back at once
	}
	if w.waiter != nil && w.fresh {
		return w.waiter, nil
	}
	// Attached to an existing step, or born notified: as the database has it.
	got, err := e.store.WaiterGet(ctx, w.WaiterID())
	if err != nil {
		return nil, storageErr("read waiter "+w.WaiterID(), err)
	}
	got.EventData = nil // a Waiter does not show it
	return effective(got, e.now()), nil
}

// insertCallback writes the callback of a waiter this registration
// inserted: HELD while it waits, PENDING and due now when it was born
// ended. Nothing without a callback.
func (e *Engine) insertCallback(ctx context.Context, tx storage.Executor, rec *storage.OutboxRecord, w *models.Waiter, now time.Time) error {
	if rec == nil {
		return nil
	}
	rec.WaiterID, rec.RunID, rec.CreatedAt, rec.Body = w.ID, w.WorkflowRunID, now, []byte{}
	rec.State, rec.NextAttemptAt = storage.OutboxHeld, w.Deadline
	if w.State != models.WaiterWaiting {
		rec.State, rec.NextAttemptAt = models.DispatchPending, now
	}
	return tx.OutboxInsert(ctx, rec)
}

// noCallbacks says that none of the waiters can have a callback: none is
// a durable step (WaiterEndParams.NoCallbacks).
func noCallbacks(ws []*models.Waiter) bool {
	for _, w := range ws {
		if w.StepName != nil {
			return false
		}
	}
	return true
}

// WaiterCallback is where the waiter's callback stands; nil when it has
// none (a waiter registered by waitForEvent).
func (e *Engine) WaiterCallback(ctx context.Context, waiterID string) (*models.Dispatch, error) {
	rec, err := e.store.OutboxGetByWaiter(ctx, waiterID)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, storageErr("get callback of "+waiterID, err)
	}
	return dispatchOf(rec), nil
}

// callbackBody builds the body of a claimed callback from its ended
// waiter. false: the attempt is not made now (the waiter could not be
// read: given back, uncounted, for a later try; or it is gone: failed).
func (e *Engine) callbackBody(ctx context.Context, r *storage.OutboxRecord) ([]byte, bool) {
	w, err := e.store.WaiterGet(ctx, r.WaiterID)
	if err == nil && w.State == models.WaiterWaiting {
		err = errors.New("bug: a callback was due while its waiter waits")
	}
	if err == nil {
		return CallbackBody(r.ID, w), true
	}
	now := e.now()
	p := &storage.OutboxAttemptParams{ID: r.ID, Claim: r.Claim, Now: now}
	if errors.Is(err, storage.ErrNotFound) {
		msg := "the waiter is gone"
		p.State, p.LastError, p.NextAttemptAt = models.DispatchFailed, &msg, now
		e.log.Error("a callback's waiter is gone; the callback fails", "delivery_id", r.ID, "waiter", r.WaiterID)
	} else {
		p.State, p.Uncount, p.NextAttemptAt = models.DispatchPending, true, now.Add(retryDelay(3))
		e.log.Warn("read a callback's waiter; will retry", "delivery_id", r.ID, "waiter", r.WaiterID, "err", err)
	}
	if _, err := e.store.OutboxRecordAttempt(ctx, p); err != nil {
		e.log.Warn("give back a callback that was not sent", "delivery_id", r.ID, "err", err)
	}
	return nil, false
}

// CallbackBody is what a callback POSTs for the ended waiter w: the
// WaitResult's fields, plus what a receiver needs to route and deduplicate
// it, as one JSON object:
//
//	deliveryId     the Rendezvous-Delivery-Id header's value (the same on every attempt)
//	waiterId, workflowRunId, stepName, eventId
//	state          NOTIFIED, TIMED_OUT or CANCELED
//	timeout        true when the deadline passed first
//	eventData      the notification's data, the bytes the notifier sent (null unless NOTIFIED)
//	messageId      the notification that resolved it (null unless NOTIFIED)
//	notifiedAt     when it was notified (RFC 3339, microseconds, UTC; null unless NOTIFIED)
//	error          null, or for CANCELED {"message": …, "extensions": {"code": "RUN_NOT_ACTIVE"}},
//	               the error a subscriber of the step gets
func CallbackBody(deliveryID string, w *models.Waiter) []byte {
	res, werr := resultOf(w)
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	put := func(name string, v any) {
		if b.Len() == 0 {
			b.WriteByte('{')
		} else {
			b.WriteByte(',')
		}
		enc.Encode(name)
		b.Truncate(b.Len() - 1) // Encode's newline
		b.WriteByte(':')
		if raw, ok := v.(json.RawMessage); ok {
			if len(raw) == 0 {
				raw = json.RawMessage("null")
			}
			b.Write(raw) // verbatim: rule 13
			return
		}
		enc.Encode(v)
		b.Truncate(b.Len() - 1)
	}
	put("deliveryId", deliveryID)
	put("waiterId", w.ID)
	put("workflowRunId", w.WorkflowRunID)
	put("stepName", w.StepName)
	put("eventId", w.EventID)
	put("state", w.State)
	timeout, data, messageID := false, json.RawMessage(nil), (*string)(nil)
	var notifiedAt *string
	if res != nil {
		timeout, data, messageID = res.Timeout, res.EventData, res.MessageID
		if res.NotifiedAt != nil {
			t := res.NotifiedAt.UTC().Format("2006-01-02T15:04:05.000000Z07:00")
			notifiedAt = &t
		}
	}
	put("timeout", timeout)
	put("eventData", data)
	put("messageId", messageID)
	put("notifiedAt", notifiedAt)
	type callbackError struct {
		Message    string            `json:"message"`
		Extensions map[string]string `json:"extensions"`
	}
	var cerr *callbackError
	if werr != nil {
		cerr = &callbackError{Message: werr.Error(), Extensions: map[string]string{"code": string(ErrorCode(werr))}}
	}
	put("error", cerr)
	b.WriteByte('}')
	return b.Bytes()
}

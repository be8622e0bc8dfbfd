// The outbox: trigger(dispatch:) writes the run and its delivery in one
// transaction; the delivery package claims due deliveries through this
// file's methods (the engine is its delivery.Source), and the results come
// back here, where the rules are: retry with backoff, delivered, or failed
// (the run then ends RUN_FAILED, in the same transaction).

package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/textproto"
	"strings"
	"time"

	"rendezvous/delivery"
	"rendezvous/models"
	"rendezvous/storage"
)

// OutboundConfig is the outbox's side of the engine's configuration.
type OutboundConfig struct {
	// Allow is RENDEZVOUS_OUTBOUND_ALLOWED; empty: dispatch is refused.
	Allow *delivery.AllowList
	// RetryBase and RetryMax: the first retry's wait and the cap.
	RetryBase, RetryMax time.Duration
	// RunToken, when set, signs a run token for the dispatch body.
	RunToken func(runID string, now time.Time) (string, bool)
	// Written is called after a commit that wrote an outbox row (to wake
	// the delivery loop). It must not block.
	Written func()
}

// Defaults of the outbox.
const (
	DefaultRetryBase = time.Second
	DefaultRetryMax  = 10 * time.Minute
	DefaultRetries   = 3
	MaxRetries       = 20
	maxHeaders       = 32
	maxHeaderBytes   = 8 << 10
)

func (c OutboundConfig) withDefaults() OutboundConfig {
	if c.RetryBase <= 0 {
		c.RetryBase = DefaultRetryBase
	}
	if c.RetryMax <= 0 {
		c.RetryMax = DefaultRetryMax
	}
	if c.RetryMax < c.RetryBase {
		c.RetryMax = c.RetryBase
	}
	return c
}

var _ delivery.Source = (*Engine)(nil)

// dispatchBody is what a dispatch POSTs (DESIGN: {workflowRunId, body,
// label, createdAt, runToken}); the run token is added when the attempt is
// claimed, so that it is fresh on a late retry.
type dispatchBody struct {
	WorkflowRunID string          `json:"workflowRunId"`
	Body          json.RawMessage `json:"body"`
	Label         *string         `json:"label"`
	CreatedAt     string          `json:"createdAt"`
}

// headers a caller may not set: the transport's own, and ours.
var reservedHeaders = map[string]bool{
	"Host": true, "Content-Length": true, "Content-Type": true, "Transfer-Encoding": true,
	"Connection": true, "Upgrade": true, "Te": true, "Trailer": true, "Keep-Alive": true,
	"Proxy-Connection": true, "Expect": true,
}

// outboxFor validates a dispatch and returns its row (without run id and
// times), or a BAD_USER_INPUT error.
func (e *Engine) outboxFor(d *models.DispatchInput) (*storage.OutboxRecord, error) {
	rec, err := e.outboundRecord("dispatch", d.URL, d.Headers, d.Retries)
	if err != nil {
		return nil, err
	}
	if d.Delay != nil && (*d.Delay < 0 || *d.Delay > e.cfg.MaxTimeout) {
		return nil, errorf(CodeBadUserInput, "dispatch.delay must be between 0 and %s", e.cfg.MaxTimeout)
	}
	rec.Kind = storage.OutboxKindDispatch
	return rec, nil
}

// outboundRecord validates what every outbound call has (the URL against
// the allow-list, headers, retries; field names the argument in errors)
// and returns a PENDING row without kind, run, waiter, body or times.
func (e *Engine) outboundRecord(field, url string, rawHeaders json.RawMessage, retriesIn *int) (*storage.OutboxRecord, error) {
	out := e.cfg.Outbound
	if out.Allow.Empty() {
		return nil, errorf(CodeBadUserInput, "%s is refused: RENDEZVOUS_OUTBOUND_ALLOWED is empty (the operator must list the URL prefixes Rendezvous may call)", field)
	}
	if err := out.Allow.Check(url); err != nil {
		return nil, errorf(CodeBadUserInput, "%s.url: %v", field, err)
	}
	retries := DefaultRetries
	if retriesIn != nil {
		if *retriesIn < 0 || *retriesIn > MaxRetries {
			return nil, errorf(CodeBadUserInput, "%s.retries must be between 0 and %d, got %d", field, MaxRetries, *retriesIn)
		}
		retries = *retriesIn
	}
	rec := &storage.OutboxRecord{
		ID: newID("dlv_"), URL: url, State: models.DispatchPending, MaxAttempts: retries + 1,
	}
	if h := nullJSON(rawHeaders); len(h) > 0 {
		headers, err := checkHeaders(field+".headers", h)
		if err != nil {
			return nil, err
		}
		rec.Headers, _ = json.Marshal(headers)
	}
	return rec, nil
}

func checkHeaders(field string, raw json.RawMessage) (map[string]string, error) {
	if len(raw) > maxHeaderBytes {
		return nil, errorf(CodeBadUserInput, "%s is over %d bytes", field, maxHeaderBytes)
	}
	var h map[string]string
	if err := json.Unmarshal(raw, &h); err != nil {
		return nil, errorf(CodeBadUserInput, "%s must be a JSON object of strings", field)
	}
	if len(h) > maxHeaders {
		return nil, errorf(CodeBadUserInput, "%s has more than %d headers", field, maxHeaders)
	}
	out := make(map[string]string, len(h))
	for k, v := range h {
		if !validHeaderName(k) {
			return nil, errorf(CodeBadUserInput, "%s: %q is not a header name", field, k)
		}
		canon := textproto.CanonicalMIMEHeaderKey(k)
		if reservedHeaders[canon] || strings.HasPrefix(canon, "Rendezvous-") {
			return nil, errorf(CodeBadUserInput, "%s: %s is set by Rendezvous", field, canon)
		}
		if strings.ContainsAny(v, "\r\n\x00") {
			return nil, errorf(CodeBadUserInput, "%s: the value of %s has a line break or NUL", field, canon)
		}
		if _, dup := out[canon]; dup {
			return nil, errorf(CodeBadUserInput, "%s: %s is given twice", field, canon)
		}
		out[canon] = v
	}
	return out, nil
}

func validHeaderName(k string) bool {
	if k == "" || len(k) > 128 {
		return false
	}
	for _, r := range k {
		if r >= 0x7f || r <= ' ' || strings.ContainsRune(`"(),/:;<=>?@[\]{}`, r) {
			return false
		}
	}
	return true
}

// insertRun writes the run, and its delivery if it has one, in one
// transaction; ErrDuplicate when the run exists.
func (e *Engine) insertRun(ctx context.Context, run *models.WorkflowRun, ob *storage.OutboxRecord, delay time.Duration) error {
	if ob == nil {
		run.StartPending = true
		if err := e.store.RunInsert(ctx, run); err != nil {
			return err
		}
		e.wakeWorkers(ctx, run.Label)
		return nil
	}
	body, err := json.Marshal(dispatchBody{WorkflowRunID: run.WorkflowRunID, Body: run.Body, Label: run.Label,
		CreatedAt: run.CreatedAt.Format("2006-01-02T15:04:05.000000Z07:00")})
	if err != nil {
		return fmt.Errorf("encode dispatch body: %w", err)
	}
	id := run.WorkflowRunID
	ob.RunID, ob.Body, ob.CreatedAt, ob.NextAttemptAt = &id, body, run.CreatedAt, run.CreatedAt.Add(delay)
	err = e.store.InTx(ctx, func(tx storage.Executor) error {
		if err := tx.RunInsert(ctx, run); err != nil {
			return err
		}
		return tx.OutboxInsert(ctx, ob)
	})
	if err == nil && e.cfg.Outbound.Written != nil {
		e.cfg.Outbound.Written()
	}
	return err
}

// endHandOvers runs inside the transaction that ends a run: the run is
// never handed to a worker again, and its pending delivery is canceled.
func (e *Engine) endHandOvers(ctx context.Context, tx storage.Executor, runID string, now time.Time) error {
	if err := tx.RunStartEnd(ctx, runID); err != nil {
		return err
	}
	_, err := tx.OutboxCancelByRun(ctx, runID, now)
	return err
}

// RunDispatch is the run's delivery, or nil when it was triggered without
// dispatch.
func (e *Engine) RunDispatch(ctx context.Context, runID string) (*models.Dispatch, error) {
	rec, err := e.store.OutboxGetByRun(ctx, runID)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, storageErr("get dispatch of "+runID, err)
	}
	return dispatchOf(rec), nil
}

// dispatchOf is where a delivery stands, as the API shows it. A callback
// whose waiter is still waiting is PENDING with no next attempt.
func dispatchOf(rec *storage.OutboxRecord) *models.Dispatch {
	d := &models.Dispatch{State: rec.State, URL: rec.URL, Attempts: rec.Attempts, LastStatus: rec.LastStatus, LastError: rec.LastError}
	switch rec.State {
	case storage.OutboxHeld:
		d.State = models.DispatchPending
	case models.DispatchPending:
		t := rec.NextAttemptAt
		d.NextAttemptAt = &t
	case models.DispatchDelivered:
		d.DeliveredAt = rec.EndedAt
	}
	return d
}

// ClaimDeliveries implements delivery.Source: due deliveries, claimed
// for lease on the database's clock.
func (e *Engine) ClaimDeliveries(ctx context.Context, limit int, lease time.Duration) ([]delivery.Delivery, error) {
	claim := newID("clm_")
	var recs []*storage.OutboxRecord
	err := e.store.InTx(ctx, func(tx storage.Executor) error {
		now := e.now()
		var err error
		recs, err = tx.OutboxClaim(ctx, &storage.OutboxClaimParams{Now: now, LeaseUntil: now.Add(lease), Claim: claim, Limit: limit})
		return err
	})
	if err != nil {
		return nil, storageErr("claim deliveries", err)
	}
	out := make([]delivery.Delivery, 0, len(recs))
	for _, r := range recs {
		if r.Kind == storage.OutboxKindDispatch && r.Attempts > 1 && r.RunID != nil && e.runEnded(ctx, r) {
			continue
		}
		d := delivery.Delivery{ID: r.ID, Kind: r.Kind, URL: r.URL, Body: r.Body, Attempt: r.Attempts, MaxAttempts: r.MaxAttempts, Claim: r.Claim}
		if r.Kind == storage.OutboxKindCallback {
			body, ok := e.callbackBody(ctx, r)
			if !ok {
				continue
			}
			d.Body = body
		}
		if len(r.Headers) > 0 {
			if err := json.Unmarshal(r.Headers, &d.Headers); err != nil {
				e.log.Error("stored dispatch headers do not decode; sending without them", "delivery_id", r.ID, "err", err)
			}
		}
		if r.Kind == storage.OutboxKindDispatch && r.RunID != nil && e.cfg.Outbound.RunToken != nil {
			if tok, ok := e.cfg.Outbound.RunToken(*r.RunID, e.now()); ok {
				d.Body = withRunToken(r.Body, tok)
			}
		}
		out = append(out, d)
	}
	return out, nil
}

// runEnded cancels a claimed retry whose run has ended, and says so. Only
// a delivery that was in flight when its run ended gets here (ending a run
// cancels the others): its claimer died before recording the result.
func (e *Engine) runEnded(ctx context.Context, r *storage.OutboxRecord) bool {
	run, err := e.store.RunGet(ctx, *r.RunID, false)
	if err != nil || run.State == models.RunStarted {
		return false // send it: at least once
	}
	if _, err := e.store.OutboxRecordAttempt(ctx, &storage.OutboxAttemptParams{ID: r.ID, Claim: r.Claim,
		State: models.DispatchCanceled, LastStatus: r.LastStatus, LastError: r.LastError, NextAttemptAt: e.now(), Now: e.now()}); err != nil {
		e.log.Warn("cancel the delivery of an ended run", "delivery_id", r.ID, "err", err)
	}
	return true
}

// withRunToken adds "runToken" to a JSON object body.
func withRunToken(body []byte, token string) []byte {
	tok, _ := json.Marshal(token)
	n := len(body)
	if n < 2 || body[n-1] != '}' {
		return body
	}
	out := make([]byte, 0, n+len(tok)+13)
	out = append(out, body[:n-1]...)
	out = append(out, `,"runToken":`...)
	out = append(out, tok...)
	return append(out, '}')
}

// NextDeliveryDue implements delivery.Source, on the local clock.
func (e *Engine) NextDeliveryDue(ctx context.Context) (time.Time, bool, error) {
	t, err := e.store.OutboxNextDue(ctx)
	if err != nil || t == nil {
		return time.Time{}, false, storageErr("next delivery due", err)
	}
	// The stored time is on the database's clock.
	return time.Now().Add(t.Sub(e.now())), true, nil
}

// errClaimLost stops a transaction whose claim is no longer the row's.
var errClaimLost = errors.New("delivery claim lost")

// RecordDeliveries implements delivery.Source: the rules after attempts.
// Results that leave the run as it is (delivered, to be retried) are
// recorded together in one transaction; a delivery that failed for good
// ends its run, in a transaction of its own.
func (e *Engine) RecordDeliveries(ctx context.Context, rs []delivery.Result) error {
	var (
		together []delivery.Result
		errs     []error
	)
	for _, r := range rs {
		if r.Delivered || r.Interrupted || (!r.Refused && r.Attempt < r.MaxAttempts) {
			together = append(together, r)
		} else {
			errs = append(errs, e.recordDelivery(ctx, r))
		}
	}
	if len(together) == 0 {
		return errors.Join(errs...)
	}
	var lost []string
	retry := false
	err := e.store.InTx(ctx, func(tx storage.Executor) error {
		lost, retry = nil, false
		now := e.now()
		for _, r := range together {
			p := e.attemptParams(r, now)
			ok, err := tx.OutboxRecordAttempt(ctx, p)
			if err != nil {
				return err
			}
			if !ok {
				lost = append(lost, r.ID)
			}
			retry = retry || (ok && p.State == models.DispatchPending)
		}
		return nil
	})
	if err == nil && len(lost) > 0 {
		e.log.Info("delivery results not recorded: the claims are no longer ours", "delivery_ids", lost)
	}
	if err == nil && retry && e.cfg.Outbound.Written != nil {
		e.cfg.Outbound.Written()
	}
	return errors.Join(append(errs, storageErr("record deliveries", err))...)
}

// attemptParams is what a result that leaves its run as it is records.
func (e *Engine) attemptParams(r delivery.Result, now time.Time) *storage.OutboxAttemptParams {
	p := &storage.OutboxAttemptParams{ID: r.ID, Claim: r.Claim, Now: now, NextAttemptAt: now}
	if r.Status != 0 {
		s := r.Status
		p.LastStatus = &s
	}
	if r.Error != "" {
		s := r.Error
		p.LastError = &s
	}
	switch {
	case r.Delivered:
		p.State = models.DispatchDelivered
	case r.Interrupted:
		p.State, p.Uncount = models.DispatchPending, true
	default:
		o := e.cfg.Outbound
		p.State, p.NextAttemptAt = models.DispatchPending, now.Add(delivery.Backoff(o.RetryBase, o.RetryMax, r.Attempt))
	}
	return p
}

// recordDelivery records one result with the rules after an attempt.
func (e *Engine) recordDelivery(ctx context.Context, r delivery.Result) error {
	rec, err := e.store.OutboxGet(ctx, r.ID)
	if err != nil {
		return storageErr("get delivery "+r.ID, err)
	}
	var status *int
	if r.Status != 0 {
		s := r.Status
		status = &s
	}
	var lastErr *string
	if r.Error != "" {
		s := r.Error
		lastErr = &s
	}
	p := &storage.OutboxAttemptParams{ID: r.ID, Claim: r.Claim, LastStatus: status, LastError: lastErr}
	switch {
	case r.Delivered:
		p.State = models.DispatchDelivered
	case r.Interrupted:
		p.State, p.Uncount = models.DispatchPending, true
	case r.Refused || r.Attempt >= rec.MaxAttempts:
		p.State = models.DispatchFailed
	default:
		p.State = models.DispatchPending
	}
	record := func(tx storage.Executor, now time.Time) error {
		p.Now, p.NextAttemptAt = now, now
		if p.State == models.DispatchPending && !p.Uncount {
			o := e.cfg.Outbound
			p.NextAttemptAt = now.Add(delivery.Backoff(o.RetryBase, o.RetryMax, r.Attempt))
		}
		ok, err := tx.OutboxRecordAttempt(ctx, p)
		if err == nil && !ok {
			err = errClaimLost
		}
		return err
	}
	if p.State != models.DispatchFailed || rec.RunID == nil {
		err = e.store.InTx(ctx, func(tx storage.Executor) error { return record(tx, e.now()) })
	} else {
		err = e.failRun(ctx, *rec.RunID, rec, r, p, record)
	}
	if errors.Is(err, errClaimLost) {
		// Another replica claimed it after our lease passed, or the run
		// ended: its result is theirs to record.
		e.log.Info("delivery result not recorded: the claim is no longer ours", "delivery_id", r.ID, "attempt", r.Attempt)
		return nil
	}
	if p.State == models.DispatchPending && err == nil && e.cfg.Outbound.Written != nil {
		e.cfg.Outbound.Written()
	}
	return storageErr("record delivery "+r.ID, err)
}

// failRun records a delivery FAILED and ends its run RUN_FAILED with a
// result that says why, in one transaction. A run that ended while the
// delivery was in flight no longer wants its dispatch: that ends CANCELED.
// A callback the run did not get fails it the same way (the workflow
// would otherwise wait for good); once the run has ended, the callback is
// only recorded FAILED.
func (e *Engine) failRun(ctx context.Context, runID string, rec *storage.OutboxRecord, r delivery.Result, p0 *storage.OutboxAttemptParams, record func(storage.Executor, time.Time) error) error {
	why := map[string]any{
		"error":      rec.Kind + " failed",
		"deliveryId": rec.ID,
		"url":        rec.URL,
		"attempts":   r.Attempt,
		"lastError":  r.Error,
	}
	if r.Status != 0 {
		why["lastStatus"] = r.Status
	}
	if r.Refused {
		why["error"] = rec.Kind + " refused"
	}
	if rec.WaiterID != "" {
		why["waiterId"] = rec.WaiterID
	}
	result, _ := json.Marshal(why)
	_, err := e.endRun(ctx, runID, models.RunFailed, result, record)
	if (ErrorCode(err) == CodeRunNotActive || ErrorCode(err) == CodeNotFound) && rec.Kind == storage.OutboxKindCallback {
		return e.store.InTx(ctx, func(tx storage.Executor) error { return record(tx, e.now()) })
	}
	if ErrorCode(err) == CodeRunNotActive || ErrorCode(err) == CodeNotFound {
		// The run ended while this delivery was in flight: nothing to
		// fail, the delivery is no longer wanted.
		cancelParams := *p0
		cancelParams.State = models.DispatchCanceled
		return e.store.InTx(ctx, func(tx storage.Executor) error {
			cancelParams.Now, cancelParams.NextAttemptAt = e.now(), e.now()
			ok, err := tx.OutboxRecordAttempt(ctx, &cancelParams)
			if err == nil && !ok {
				err = errClaimLost
			}
			return err
		})
	}
	return err
}

// OutboxPending counts the deliveries PENDING in the whole database.
func (e *Engine) OutboxPending(ctx context.Context) (int64, error) {
	counts, err := e.store.OutboxCountByState(ctx)
	if err != nil {
		return 0, storageErr("count pending deliveries", err)
	}
	return counts[models.DispatchPending], nil
}

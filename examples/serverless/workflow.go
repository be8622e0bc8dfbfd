package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// workflow holds the two steps of the payment workflow, each an HTTP
// handler that Rendezvous calls.
type workflow struct {
	secret      string
	rendezvous  *client
	callbackURL string // where Rendezvous POSTs the payment step's result
	providerURL string
	timeout     string
	retries     int // of the callback
	seen        *deliveries
}

// order is the run's body, as given to trigger.
type order struct {
	Amount   int    `json:"amount"`
	Currency string `json:"currency"`
	// WebhookFormat asks the provider for "json" (default) or "form"
	// webhooks, as a provider's dashboard would.
	WebhookFormat string `json:"webhookFormat"`
	// Card: the fake provider declines "4000000000000002", and never
	// settles "4000000000003220" (test cards).
	Card string `json:"card"`
}

// dispatched is step 1: Rendezvous hands over a new run.
func (wf *workflow) dispatched(w http.ResponseWriter, r *http.Request) {
	body, id, ok := wf.receive(w, r)
	if !ok {
		return
	}
	processed := false
	defer func() { wf.seen.finish(id, processed) }()
	var run struct {
		WorkflowRunID string `json:"workflowRunId"`
		Body          order  `json:"body"`
	}
	if err := json.Unmarshal(body, &run); err != nil || run.WorkflowRunID == "" {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	if err := wf.startPayment(r.Context(), run.WorkflowRunID, run.Body); err != nil {
		// A 5xx makes Rendezvous deliver again later, with backoff; every
		// step above is safe to repeat.
		log.Printf("serverless: run %s: %v", run.WorkflowRunID, err)
		http.Error(w, "try again", http.StatusServiceUnavailable)
		return
	}
	processed = true
	w.WriteHeader(http.StatusNoContent)
}

// startPayment registers the callback wait and hands its completion URL to
// the payment provider.
func (wf *workflow) startPayment(ctx context.Context, run string, o order) error {
	// The server token: the run token of the dispatch allows
	// waitForEventCallback on this run too, but not reading completionUrl
	// (a credential that completes the step, and run tokens are also
	// handed to browsers); the function needs the server token for
	// finishRun anyway.
	var out struct {
		Waiter struct {
			ID            string `json:"id"`
			State         string `json:"state"`
			CompletionURL string `json:"completionUrl"`
		} `json:"waitForEventCallback"`
	}
	err := wf.rendezvous.do(ctx, wf.rendezvous.serverToken, `mutation($ev: String!, $run: ID!, $timeout: Duration, $cb: CallbackInput!) {
  waitForEventCallback(eventId: $ev, workflowRunId: $run, stepName: "payment", timeout: $timeout, callback: $cb) { id state completionUrl }
}`, map[string]any{"ev": "payment-" + run, "run": run, "timeout": wf.timeout,
		"cb": map[string]any{"url": wf.callbackURL, "retries": wf.retries}}, &out)
	var ge *gqlError
	if errors.As(err, &ge) && ge.Code == "RUN_NOT_ACTIVE" {
		log.Printf("serverless: run %s has ended already: nothing to do", run)
		return nil
	}
	if err != nil {
		return fmt.Errorf("waitForEventCallback: %w", err)
	}
	if out.Waiter.State != "WAITING" {
		// A repeated dispatch of a run whose payment step already ended:
		// its result is on its way to the callback URL.
		log.Printf("serverless: run %s: payment step already %s", run, out.Waiter.State)
		return nil
	}
	if out.Waiter.CompletionURL == "" {
		return errors.New("the waiter has no completionUrl")
	}
	// The completion URL is the provider's webhook URL for this charge.
	// Whoever holds it can complete the waiter (once): hand it only to the
	// party that is to call it.
	charge, err := wf.charge(ctx, run, o, out.Waiter.CompletionURL)
	if err != nil {
		return fmt.Errorf("charge: %w", err)
	}
	log.Printf("serverless: run %s: waiting for payment %s (waiter %s)", run, charge, out.Waiter.ID)
	return nil
}

// charge asks the payment provider to charge the order and to call
// webhookURL with the outcome. The Idempotency-Key makes a repeated call
// (a dispatch delivered twice) return the same charge.
func (wf *workflow) charge(ctx context.Context, run string, o order, webhookURL string) (string, error) {
	if o.Currency == "" {
		o.Currency = "eur"
	}
	req := map[string]any{"amount": o.Amount, "currency": o.Currency, "webhookUrl": webhookURL,
		"webhookFormat": o.WebhookFormat, "card": o.Card, "metadata": map[string]string{"workflowRunId": run}}
	var out struct {
		ID string `json:"id"`
	}
	status, raw, err := postJSON(ctx, wf.providerURL+"/charges", map[string]string{"Idempotency-Key": run + "/payment"}, req)
	if err != nil {
		return "", err
	}
	if status/100 != 2 {
		return "", fmt.Errorf("provider: HTTP %d: %.200s", status, raw)
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return "", fmt.Errorf("provider: %w", err)
	}
	return out.ID, nil
}

// callbackBody is what Rendezvous POSTs to the callback URL: the waiter's
// WaitResult fields, its state, and for a CANCELED waiter the error its
// subscriber would get ({message, extensions: {code: "RUN_NOT_ACTIVE"}}).
type callbackBody struct {
	DeliveryID    string          `json:"deliveryId"`
	WaiterID      string          `json:"waiterId"`
	WorkflowRunID string          `json:"workflowRunId"`
	StepName      string          `json:"stepName"`
	EventID       string          `json:"eventId"`
	State         string          `json:"state"` // NOTIFIED, TIMED_OUT or CANCELED
	Timeout       bool            `json:"timeout"`
	EventData     json.RawMessage `json:"eventData"`
	MessageID     *string         `json:"messageId"`
	NotifiedAt    *string         `json:"notifiedAt"`
	Error         *struct {
		Message    string `json:"message"`
		Extensions struct {
			Code string `json:"code"`
		} `json:"extensions"`
	} `json:"error"`
}

// payment is the provider's webhook as eventData: JSON
// ({type, data: {…}}) or a form ({type, charge_id, …} as strings).
type payment struct {
	Type string `json:"type"`
}

// resumed is step 2: the payment step ended.
func (wf *workflow) resumed(w http.ResponseWriter, r *http.Request) {
	body, id, ok := wf.receive(w, r)
	if !ok {
		return
	}
	processed := false
	defer func() { wf.seen.finish(id, processed) }()
	var res callbackBody
	if err := json.Unmarshal(body, &res); err != nil || res.WorkflowRunID == "" {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	var p payment
	json.Unmarshal(res.EventData, &p) // anything else: not a success
	var err error
	switch {
	case res.Error != nil:
		// CANCELED: the run ended (cancel, finishRun) while it waited.
		log.Printf("serverless: run %s: payment step canceled: %s (%s)", res.WorkflowRunID, res.Error.Message, res.Error.Extensions.Code)
	case res.Timeout:
		err = wf.rendezvous.finish(r.Context(), res.WorkflowRunID, "RUN_FAILED", map[string]any{"error": "no payment within " + wf.timeout})
	case p.Type == "charge.succeeded":
		err = wf.rendezvous.finish(r.Context(), res.WorkflowRunID, "RUN_SUCCESS", map[string]any{
			"payment": res.EventData, "messageId": res.MessageID, "paidAt": res.NotifiedAt})
	default:
		err = wf.rendezvous.finish(r.Context(), res.WorkflowRunID, "RUN_FAILED", map[string]any{
			"error": "payment failed", "payment": res.EventData, "messageId": res.MessageID})
	}
	if err != nil {
		log.Printf("serverless: run %s: finish: %v", res.WorkflowRunID, err)
		http.Error(w, "try again", http.StatusServiceUnavailable)
		return
	}
	processed = true
	log.Printf("serverless: resumed run %s (delivery %s, %s %s)", res.WorkflowRunID, id, res.State, p.Type)
	w.WriteHeader(http.StatusNoContent)
}

// receive reads a request from Rendezvous and checks it: its signature,
// its age, and whether its delivery was processed already (then it answers
// 200 itself). ok: the caller processes body, then calls
// wf.seen.finish(deliveryID, success).
func (wf *workflow) receive(w http.ResponseWriter, r *http.Request) (body []byte, deliveryID string, ok bool) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 4<<20))
	if err != nil {
		http.Error(w, "read body", http.StatusBadRequest)
		return nil, "", false
	}
	if err := verify(r.Header.Get("Rendezvous-Signature"), body, wf.secret, time.Now(), 5*time.Minute); err != nil {
		log.Printf("serverless: refused %s: %v", r.URL.Path, err)
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return nil, "", false
	}
	deliveryID = r.Header.Get("Rendezvous-Delivery-Id")
	if deliveryID == "" {
		http.Error(w, "no Rendezvous-Delivery-Id", http.StatusBadRequest)
		return nil, "", false
	}
	switch ok, done := wf.seen.claim(deliveryID); {
	case done:
		// Processed already (its answer was lost, or a replica died while
		// delivering): say so, or it is retried.
		log.Printf("serverless: duplicate delivery %s to %s ignored", deliveryID, r.URL.Path)
		w.WriteHeader(http.StatusOK)
		return nil, "", false
	case !ok:
		// Being processed by another request: Rendezvous retries later.
		log.Printf("serverless: delivery %s to %s is in progress; try again", deliveryID, r.URL.Path)
		http.Error(w, "in progress", http.StatusConflict)
		return nil, "", false
	}
	return body, deliveryID, true
}

// deliveries remembers the delivery ids processed, and those being
// processed: a delivery may arrive again while its first attempt is still
// at work (that attempt timed out on Rendezvous' side). A real function
// keeps them in its database (a unique key), in the transaction of its
// work.
type deliveries struct {
	mu  sync.Mutex
	ids map[string]bool // true: done; false: in progress
}

func newDeliveries() *deliveries { return &deliveries{ids: map[string]bool{}} }

// claim takes the delivery for processing; false with done: it was
// processed; false without: another request is processing it.
func (d *deliveries) claim(id string) (ok, done bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if done, seen := d.ids[id]; seen {
		return false, done
	}
	d.ids[id] = false
	return true, false
}

// finish records the claimed delivery as processed (ok) or gives it back
// for a later attempt.
func (d *deliveries) finish(id string, ok bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if ok {
		d.ids[id] = true
	} else {
		delete(d.ids, id)
	}
}

// verify checks a Rendezvous-Signature header: "t=<unix seconds>,v1=<hex>"
// with one v1 per signing secret of the server; one must equal
// hex(HMAC-SHA256(secret, "<t>.<raw body>")), and t must be within
// tolerance of now (against replays).
func verify(header string, body []byte, secret string, now time.Time, tolerance time.Duration) error {
	var t string
	var sigs []string
	for _, part := range strings.Split(header, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(part), "=")
		switch k {
		case "t":
			t = v
		case "v1":
			sigs = append(sigs, v)
		}
	}
	ts, err := strconv.ParseInt(t, 10, 64)
	if err != nil {
		return errors.New("no timestamp")
	}
	if d := now.Sub(time.Unix(ts, 0)); d > tolerance || d < -tolerance {
		return errors.New("timestamp too old or in the future")
	}
	mac := hmac.New(sha256.New, []byte(secret))
	fmt.Fprintf(mac, "%s.", t)
	mac.Write(body)
	want := mac.Sum(nil)
	for _, s := range sigs {
		if got, err := hex.DecodeString(s); err == nil && hmac.Equal(got, want) {
			return nil
		}
	}
	return errors.New("no signature matches")
}

// client calls Rendezvous' GraphQL endpoint over plain POSTs.
type client struct {
	endpoint    string
	serverToken string
}

type gqlError struct {
	Message string
	Code    string
}

func (e *gqlError) Error() string { return fmt.Sprintf("%s (%s)", e.Message, e.Code) }

// do runs a query or mutation with token ("": none, on an open server).
func (c *client) do(ctx context.Context, token, query string, vars map[string]any, data any) error {
	var out struct {
		Data   json.RawMessage `json:"data"`
		Errors []struct {
			Message    string `json:"message"`
			Extensions struct {
				Code string `json:"code"`
			} `json:"extensions"`
		} `json:"errors"`
	}
	hdr := map[string]string{}
	if token != "" {
		hdr["Authorization"] = "Bearer " + token
	}
	status, raw, err := postJSON(ctx, c.endpoint, hdr, map[string]any{"query": query, "variables": vars})
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return fmt.Errorf("rendezvous: HTTP %d: %.200s", status, raw)
	}
	if len(out.Errors) > 0 {
		return &gqlError{Message: out.Errors[0].Message, Code: out.Errors[0].Extensions.Code}
	}
	if status/100 != 2 {
		return fmt.Errorf("rendezvous: HTTP %d", status)
	}
	return json.Unmarshal(out.Data, data)
}

// finish ends the run. finishRun needs a server token.
func (c *client) finish(ctx context.Context, run, state string, result any) error {
	var out json.RawMessage
	err := c.do(ctx, c.serverToken, `mutation($id: ID!, $state: RunState!, $result: JSON) { finishRun(workflowRunId: $id, state: $state, result: $result) { state } }`,
		map[string]any{"id": run, "state": state, "result": result}, &out)
	var ge *gqlError
	if errors.As(err, &ge) && ge.Code == "RUN_NOT_ACTIVE" {
		return nil // finished by an earlier delivery whose answer was lost
	}
	return err
}

// postJSON POSTs v as JSON and returns the answer's status and body.
func postJSON(ctx context.Context, url string, headers map[string]string, v any) (int, []byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, raw, err
}

var httpClient = &http.Client{Timeout: 15 * time.Second}

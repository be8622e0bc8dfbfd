package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// provider is a fake payment provider, a third party that knows nothing of
// Rendezvous: POST /charges takes {amount, currency, webhookUrl,
// webhookFormat, metadata} and an Idempotency-Key, answers at once with the
// charge, and later POSTs the outcome to webhookUrl (retrying until a 2xx,
// as providers do; 409 means the URL was completed already, 404 that it is
// unknown or expired). Here the webhook URL is a Rendezvous completion URL.
type provider struct {
	ctx   context.Context
	delay time.Duration
	wg    sync.WaitGroup

	mu      sync.Mutex
	charges map[string]*charge // by idempotency key
}

type charge struct {
	ID            string            `json:"id"`
	Amount        int               `json:"amount"`
	Currency      string            `json:"currency"`
	Status        string            `json:"status"`
	Metadata      map[string]string `json:"metadata"`
	webhookURL    string
	webhookFormat string
	declined      bool
	abandoned     bool
}

// Test cards: the provider declines declinedCard; with abandonedCard the
// charge waits for the customer's 3-D Secure step, which this fake
// customer never takes: no webhook, and the workflow's wait times out.
const (
	declinedCard  = "4000000000000002"
	abandonedCard = "4000000000003220"
)

func newProvider(ctx context.Context, delay time.Duration) *provider {
	return &provider{ctx: ctx, delay: delay, charges: map[string]*charge{}}
}

// wait returns once every webhook in flight is sent or given up (they stop
// when ctx ends).
func (p *provider) wait() { p.wg.Wait() }

func (p *provider) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/charges" {
		http.NotFound(w, r)
		return
	}
	var req struct {
		Amount        int               `json:"amount"`
		Currency      string            `json:"currency"`
		WebhookURL    string            `json:"webhookUrl"`
		WebhookFormat string            `json:"webhookFormat"`
		Card          string            `json:"card"`
		Metadata      map[string]string `json:"metadata"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	u, err := url.Parse(req.WebhookURL)
	if req.Amount <= 0 || err != nil || (u.Scheme != "http" && u.Scheme != "https") {
		http.Error(w, "amount and webhookUrl are required", http.StatusUnprocessableEntity)
		return
	}
	key := r.Header.Get("Idempotency-Key")
	p.mu.Lock()
	c, seen := p.charges[key]
	if !seen || key == "" {
		c = &charge{ID: "ch_" + randomHex(8), Amount: req.Amount, Currency: req.Currency, Status: "pending",
			Metadata: req.Metadata, webhookURL: req.WebhookURL, webhookFormat: req.WebhookFormat,
			declined: req.Card == declinedCard, abandoned: req.Card == abandonedCard}
		if key != "" {
			p.charges[key] = c
		}
		p.wg.Add(1)
		go p.settle(c)
	}
	view := *c
	p.mu.Unlock()
	if seen {
		log.Printf("provider: charge %s requested again (Idempotency-Key %s): the same charge", c.ID, key)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	json.NewEncoder(w).Encode(view)
}

// settle charges the card (here: waits a little) and calls the webhook.
func (p *provider) settle(c *charge) {
	defer p.wg.Done()
	if !p.pause(p.delay) {
		return
	}
	if c.abandoned {
		p.mu.Lock()
		c.Status = "requires_action"
		p.mu.Unlock()
		log.Printf("provider: charge %s waits for the customer's authentication (which never comes)", c.ID)
		return
	}
	event := "charge.succeeded"
	p.mu.Lock()
	c.Status = "succeeded"
	if c.declined {
		event, c.Status = "charge.failed", "failed"
	}
	status := c.Status
	p.mu.Unlock()
	ctype, body := "application/json", []byte(nil)
	if c.webhookFormat == "form" {
		// Some providers (PayPal's IPN, Twilio) post forms: Rendezvous turns
		// the fields into a JSON object.
		f := url.Values{"type": {event}, "charge_id": {c.ID}, "amount": {strconv.Itoa(c.Amount)},
			"currency": {c.Currency}, "workflow_run_id": {c.Metadata["workflowRunId"]}}
		ctype, body = "application/x-www-form-urlencoded", []byte(f.Encode())
	} else {
		body, _ = json.Marshal(map[string]any{"type": event, "data": map[string]any{
			"id": c.ID, "amount": c.Amount, "currency": c.Currency, "status": status, "metadata": c.Metadata}})
	}
	backoff := 200 * time.Millisecond
	for attempt := 1; attempt <= 8; attempt++ {
		status, answer, err := p.post(c.webhookURL, ctype, body)
		switch {
		case err == nil && status/100 == 2:
			log.Printf("provider: webhook for %s delivered (HTTP %d, attempt %d)", c.ID, status, attempt)
			return
		case err == nil && status == http.StatusConflict:
			log.Printf("provider: webhook for %s: completed already (HTTP 409: %s)", c.ID, answer)
			return
		case err == nil && status/100 == 4 && status != http.StatusTooManyRequests:
			log.Printf("provider: webhook for %s refused (HTTP %d: %s); giving up", c.ID, status, answer)
			return
		}
		log.Printf("provider: webhook for %s, attempt %d: HTTP %d %v; retrying in %s", c.ID, attempt, status, err, backoff)
		if !p.pause(backoff) {
			return
		}
		backoff = min(2*backoff, 5*time.Second)
	}
	log.Printf("provider: webhook for %s: giving up", c.ID)
}

func (p *provider) post(target, ctype string, body []byte) (int, string, error) {
	req, err := http.NewRequestWithContext(p.ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", ctype)
	resp, err := httpClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

// pause waits d, or less when the process is stopping (then false).
func (p *provider) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-p.ctx.Done():
		return false
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand, Go 1.24+)
	return hex.EncodeToString(b)
}

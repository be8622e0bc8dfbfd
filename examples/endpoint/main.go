// Command endpoint is an example of a workflow served over HTTP (a
// serverless function): Rendezvous POSTs each run triggered with
// dispatch: {url: ".../workflow"} to it. The handler checks the signature,
// does each delivery once (Rendezvous delivers at least once), answers 2xx
// quickly, and finishes the run.
//
//	RENDEZVOUS_SIGNING_SECRET=... RENDEZVOUS_URL=http://localhost:8080/query PORT=3000 go run ./examples/endpoint
//
// What a receiver must check, in this order:
//  1. Rendezvous-Signature is "t=<unix seconds>,v1=<hex>[,v1=<hex>…]": one
//     v1 must equal hex(HMAC-SHA256(secret, "<t>.<raw body>")), compared in
//     constant time, over the raw bytes (before any JSON parsing).
//  2. t is recent (here: within 5 minutes), against replays.
//  3. Rendezvous-Delivery-Id has not been processed yet: retries and a
//     replica dying mid-delivery send the same delivery again.
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
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	secret := os.Getenv("RENDEZVOUS_SIGNING_SECRET")
	if secret == "" {
		log.Fatal("RENDEZVOUS_SIGNING_SECRET is required (the same as the server's)")
	}
	h := &handler{secret: secret, endpoint: envOr("RENDEZVOUS_URL", "http://localhost:8080/query"),
		token: os.Getenv("RENDEZVOUS_TOKEN"), done: map[string]bool{}}
	addr := "127.0.0.1:" + envOr("PORT", "3000")
	log.Printf("endpoint: listening on %s", addr)
	srv := &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.ListenAndServe())
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

type handler struct {
	secret, endpoint, token string

	mu   sync.Mutex
	done map[string]bool // delivery ids processed (use your database in production)
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 2<<20))
	if err != nil {
		http.Error(w, "read body", http.StatusBadRequest)
		return
	}
	if err := verify(r.Header.Get("Rendezvous-Signature"), body, h.secret, time.Now(), 5*time.Minute); err != nil {
		log.Printf("endpoint: refused: %v", err)
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	id := r.Header.Get("Rendezvous-Delivery-Id")
	h.mu.Lock()
	seen := h.done[id]
	h.mu.Unlock()
	if seen {
		w.WriteHeader(http.StatusOK) // already done: say so, or it is retried
		return
	}
	var run struct {
		WorkflowRunID string          `json:"workflowRunId"`
		Body          json.RawMessage `json:"body"`
		Label         *string         `json:"label"`
		RunToken      string          `json:"runToken"`
	}
	if err := json.Unmarshal(body, &run); err != nil {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	// The workflow's work goes here. Then finish the run. (A 5xx instead
	// would make Rendezvous retry the delivery with backoff.)
	err = h.finish(r.Context(), run.WorkflowRunID, map[string]any{"handledBy": "endpoint", "attempt": r.Header.Get("Rendezvous-Attempt"), "input": run.Body})
	if err != nil {
		log.Printf("endpoint: finish %s: %v", run.WorkflowRunID, err)
		http.Error(w, "try again", http.StatusServiceUnavailable)
		return
	}
	h.mu.Lock()
	h.done[id] = true
	h.mu.Unlock()
	log.Printf("endpoint: ran %s (delivery %s)", run.WorkflowRunID, id)
	w.WriteHeader(http.StatusNoContent)
}

// verify checks a Rendezvous-Signature header.
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

// finish ends the run. A server token is needed for finishRun (the run
// token in the body allows only waitForEvent, waitForEventCallback and
// workflowRun on the run).
func (h *handler) finish(ctx context.Context, run string, result any) error {
	q, _ := json.Marshal(map[string]any{
		"query":     `mutation($id: ID!, $result: JSON) { finishRun(workflowRunId: $id, state: RUN_SUCCESS, result: $result) { state } }`,
		"variables": map[string]any{"id": run, "result": result},
	})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.endpoint, bytes.NewReader(q))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if h.token != "" {
		req.Header.Set("Authorization", "Bearer "+h.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var out struct {
		Errors []struct {
			Message    string         `json:"message"`
			Extensions map[string]any `json:"extensions"`
		} `json:"errors"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return err
	}
	if len(out.Errors) > 0 && out.Errors[0].Extensions["code"] != "RUN_NOT_ACTIVE" {
		return errors.New(out.Errors[0].Message)
	}
	return nil // RUN_NOT_ACTIVE: finished by an earlier delivery whose answer was lost
}

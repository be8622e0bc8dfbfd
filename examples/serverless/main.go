// Command serverless is an example of a workflow written as plain HTTP
// handlers, with no long-lived connection anywhere: each step is one
// request in, a few requests out, and an answer. It could be deployed as
// serverless functions; here one process serves them all.
//
// The workflow takes a payment for an order:
//
//  1. POST /workflow: Rendezvous dispatches the run (trigger with
//     dispatch: {url: ".../workflow"}). The handler registers a callback wait,
//     waitForEventCallback(stepName: "payment", callback: {url: ".../workflow/callback"}),
//     reads the waiter's completionUrl, and gives it to the payment provider
//     as the charge's webhook URL. It answers at once: nothing waits.
//  2. The payment provider (a fake one, below, at /provider/) charges the
//     card and POSTs its webhook to the completion URL, JSON or form encoded.
//     It needs no Rendezvous token: the URL is the credential, and it
//     completes this one waiter only.
//  3. POST /workflow/callback: Rendezvous POSTs the waiter's result (the
//     provider's webhook as eventData, or timeout: true). The handler
//     finishes the run with the payment as its result.
//
// Run it beside a server that may call it and signs what it sends:
//
//	RENDEZVOUS_OUTBOUND_ALLOWED=http://127.0.0.1:3000/workflow RENDEZVOUS_SIGNING_SECRET=0123456789abcdef0123 \
//	RENDEZVOUS_TOKENS=server-token-0123456789 RENDEZVOUS_SECRET=run-token-secret-0123456789abcdef go run .
//
//	RENDEZVOUS_SIGNING_SECRET=0123456789abcdef0123 RENDEZVOUS_TOKEN=server-token-0123456789 \
//	RENDEZVOUS_URL=http://localhost:8080/query PORT=3000 go run ./examples/serverless
//
// then trigger a run:
//
//	mutation { trigger(workflowRunId: "order-1", body: {amount: 4200, currency: "eur"},
//	                   dispatch: {url: "http://127.0.0.1:3000/workflow"}) { workflowRunId } }
//
// Configuration (environment):
//
//	RENDEZVOUS_URL             the GraphQL endpoint (default http://localhost:8080/query)
//	RENDEZVOUS_SIGNING_SECRET  the server's signing secret: every request from Rendezvous is checked against it (required)
//	RENDEZVOUS_TOKEN           a server token, for waitForEventCallback (to read completionUrl) and finishRun
//	PORT                       where this process listens, on 127.0.0.1 (default 3000)
//	WORKFLOW_URL               where Rendezvous reaches this process (default http://127.0.0.1:$PORT)
//	PROVIDER_URL               the payment provider's API (default $WORKFLOW_URL/provider, the fake one here)
//	PAYMENT_TIMEOUT            how long the run waits for the payment (default 1h)
//	CALLBACK_RETRIES           how many times Rendezvous retries the callback while this function is down (default 10, at most 20)
//	PROVIDER_DELAY             how long the fake provider takes to charge (default 300ms)
//
// Every handler is safe to call twice with the same input, because
// Rendezvous delivers at least once: deliveries are deduplicated on
// Rendezvous-Delivery-Id, a repeated waitForEventCallback of the same
// (run, step) returns the same waiter, and the provider deduplicates
// charges on their Idempotency-Key.
package main

import (
	"context"
	"errors"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	secret := os.Getenv("RENDEZVOUS_SIGNING_SECRET")
	if secret == "" {
		log.Fatal("RENDEZVOUS_SIGNING_SECRET is required (the same as the server's)")
	}
	port := envOr("PORT", "3000")
	self := strings.TrimRight(envOr("WORKFLOW_URL", "http://127.0.0.1:"+port), "/")
	timeout := envOr("PAYMENT_TIMEOUT", "1h")
	delay, err := time.ParseDuration(envOr("PROVIDER_DELAY", "300ms"))
	if err != nil {
		log.Fatalf("PROVIDER_DELAY: %v", err)
	}
	retries, err := strconv.Atoi(envOr("CALLBACK_RETRIES", "10"))
	if err != nil || retries < 0 || retries > 20 {
		log.Fatalf("CALLBACK_RETRIES: want 0..20")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	provider := newProvider(ctx, delay)
	wf := &workflow{
		secret:      secret,
		rendezvous:  &client{endpoint: envOr("RENDEZVOUS_URL", "http://localhost:8080/query"), serverToken: os.Getenv("RENDEZVOUS_TOKEN")},
		callbackURL: self + "/workflow/callback",
		providerURL: strings.TrimRight(envOr("PROVIDER_URL", self+"/provider"), "/"),
		timeout:     timeout,
		retries:     retries,
		seen:        newDeliveries(),
	}

	mux := http.NewServeMux()
	mux.HandleFunc("POST /workflow", wf.dispatched)
	mux.HandleFunc("POST /workflow/callback", wf.resumed)
	mux.Handle("/provider/", http.StripPrefix("/provider", provider))

	addr := "127.0.0.1:" + port
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	log.Printf("serverless: listening on %s (callbacks to %s, provider at %s)", addr, wf.callbackURL, wf.providerURL)
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
	provider.wait() // webhooks in flight end with ctx
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

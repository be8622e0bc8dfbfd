// Package hooks serves completion URLs: POST /hooks/<token> completes the
// one durable waiter the token was signed for, with the request body as
// its event data. It is for parties that cannot send a GraphQL mutation (a
// payment provider's webhook, a person clicking a link in an email): the
// token is the whole credential, so no Authorization header is asked for,
// and no cookie is read or set.
//
// It parses HTTP, checks the token (auth), calls the engine and shapes the
// answer; the rules (who wins, what a completion does) are the engine's
// (engine/complete.go). It never touches storage.
package hooks

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"rendezvous/auth"
	"rendezvous/engine"
	"rendezvous/graph"
	"rendezvous/internal/requestid"
	"rendezvous/models"
)

// Pattern is where completion URLs are served.
const Pattern = "/hooks/"

// Sibling mounts completion URLs on the GraphQL handler's mux
// (graph.HandlerConfig.Siblings), behind its request ids, client addresses
// and origin checks (CORS only for RENDEZVOUS_ALLOWED_ORIGINS).
func Sibling(eng *engine.Engine, signer *auth.HookSigner) graph.Sibling {
	return graph.Sibling{Pattern: Pattern, Build: func(g *graph.Gate) http.Handler {
		return &handler{eng: eng, signer: signer, gate: g, log: g.Logger()}
	}}
}

type handler struct {
	eng    *engine.Engine
	signer *auth.HookSigner
	gate   *graph.Gate
	log    *slog.Logger
}

// Codes of the answers made here (the engine's are its own), counted with
// GraphQL's errors.
const (
	codeNotFound         = "NOT_FOUND"
	codeConflict         = "CONFLICT"
	codeMethodNotAllowed = "METHOD_NOT_ALLOWED"
	codeRateLimited      = "RATE_LIMITED"
	codeBadUserInput     = "BAD_USER_INPUT"
	codeTooLarge         = "PAYLOAD_TOO_LARGE"
	codeInternal         = "INTERNAL_SERVER_ERROR"
)

// answer is a response: its status and JSON body.
type answer struct {
	status int
	code   string // "" for 200
	body   map[string]any
	// waiter, for the log line: set once the token was found valid.
	waiter string
}

func failure(status int, code, format string, args ...any) *answer {
	return &answer{status: status, code: code, body: map[string]any{"code": code, "error": fmt.Sprintf(format, args...)}}
}

// notFound is every refusal of a token: unknown, forged, altered, expired,
// another waiter's or a waiter that is not a durable step. One body, so
// nothing tells them apart.
func notFound() *answer { return failure(http.StatusNotFound, codeNotFound, "not found") }

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var a *answer
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			h.log.ErrorContext(r.Context(), "panic in completion URL", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			a = h.internal(r, fmt.Errorf("panic: %v", p))
		}
		h.write(w, r, a, time.Since(start))
	}()
	a = h.serve(w, r)
}

func (h *handler) serve(w http.ResponseWriter, r *http.Request) *answer {
	switch r.Method {
	case http.MethodPost:
	case http.MethodOptions:
		// A CORS preflight from an allowed origin was answered before this
		// (graph's origin check); anything else is told what is allowed.
		w.Header().Set("Allow", "POST, OPTIONS")
		return &answer{status: http.StatusNoContent}
	default:
		w.Header().Set("Allow", "POST, OPTIONS")
		return failure(http.StatusMethodNotAllowed, codeMethodNotAllowed, "a completion URL takes POST only")
	}
	// Every call counts against the caller's (its address's) rate limit,
	// the one anonymous GraphQL callers have, before the token is looked
	// at: guessing tokens is throttled like any other flood.
	if ok, wait := h.gate.AllowMutations(r.Context(), nil, 1); !ok {
		secs := int(wait/time.Second) + 1
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		return failure(http.StatusTooManyRequests, codeRateLimited, "too many requests; retry after %d s", secs)
	}
	token := strings.TrimPrefix(r.URL.Path, Pattern)
	claim, ok := h.signer.Verify(token)
	if !ok {
		return notFound()
	}
	limit := int64(h.eng.Config().MaxPayloadBytes)
	if r.ContentLength > limit {
		return tooLarge(limit)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return tooLarge(limit)
		}
		return failure(http.StatusBadRequest, codeBadUserInput, "the request body could not be read")
	}
	data, err := eventDataOf(r.Header.Get("Content-Type"), body)
	if err != nil {
		return failure(http.StatusBadRequest, codeBadUserInput, "the body is not valid UTF-8, or not a valid form")
	}
	res, err := h.eng.Complete(r.Context(), engine.CompleteParams{
		WaiterID:  claim.WaiterID,
		Expires:   claim.Expires,
		EventData: data,
		Owns: func(w *models.Waiter) bool {
			return claim.Binds(*w.WorkflowRunID, *w.StepName, w.Deadline)
		},
	})
	if err != nil {
		return h.engineError(r, err)
	}
	wt := res.Waiter
	if res.Won {
		return &answer{status: http.StatusOK, waiter: wt.ID, body: map[string]any{
			"state": wt.State, "messageId": wt.MessageID, "notifiedAt": wt.EndedAt,
		}}
	}
	a := failure(http.StatusConflict, codeConflict, "this waiter has already ended (%s)", wt.State)
	a.waiter = wt.ID
	a.body["state"] = wt.State
	if wt.MessageID != nil {
		a.body["messageId"] = *wt.MessageID
	}
	if wt.State == models.WaiterCanceled {
		a.body["error"] = "this waiter's workflow run ended before it was completed"
	}
	return a
}

func tooLarge(limit int64) *answer {
	return failure(http.StatusRequestEntityTooLarge, codeTooLarge, "the body is larger than the limit of %d bytes", limit)
}

// engineError answers an error of Complete. Engine errors keep their
// message; anything else is internal: logged, answered with the request id.
func (h *handler) engineError(r *http.Request, err error) *answer {
	var ee *engine.Error
	if !errors.As(err, &ee) {
		return h.internal(r, err)
	}
	switch ee.Code {
	case engine.CodeNotFound:
		return notFound()
	case engine.CodePayloadTooLarge:
		return failure(http.StatusRequestEntityTooLarge, codeTooLarge, "%s", ee.Message)
	case engine.CodeBadUserInput:
		return failure(http.StatusBadRequest, codeBadUserInput, "%s", ee.Message)
	case engine.CodeRunNotActive:
		return failure(http.StatusConflict, string(ee.Code), "%s", ee.Message)
	case engine.CodeUnavailable, engine.CodeOutcomeUnknown:
		h.log.WarnContext(r.Context(), "completion URL: database trouble", "err", err)
		return failure(http.StatusServiceUnavailable, string(ee.Code), "%s", ee.Message)
	}
	return h.internal(r, err)
}

func (h *handler) internal(r *http.Request, err error) *answer {
	h.log.ErrorContext(r.Context(), "internal error", "err", err)
	return failure(http.StatusInternalServerError, codeInternal, "internal server error (request id %s)", requestid.From(r.Context()))
}

// write sends the answer, counts it and logs one line: outcome, status,
// the waiter once the token was valid, duration. Never the token, never
// the body.
func (h *handler) write(w http.ResponseWriter, r *http.Request, a *answer, d time.Duration) {
	h.gate.OperationDone("mutation", d)
	outcome := "ok"
	if a.code != "" {
		outcome = a.code
		h.gate.ErrorSent(a.code)
	}
	attrs := []any{"outcome", outcome, "status", a.status, "duration_ms", float64(d.Microseconds()) / 1000}
	if a.waiter != "" {
		attrs = append(attrs, "waiter", a.waiter)
	}
	h.log.InfoContext(r.Context(), "completion url", attrs...)
	w.Header().Set("Cache-Control", "no-store")
	if a.body == nil {
		w.WriteHeader(a.status)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(a.status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.Encode(a.body)
}

// Package upstash serves Upstash Workflow's REST API (the part the
// @upstash/workflow npm Client calls: notify, getWaiters, cancel, logs,
// trigger) so that code written for Upstash works against Rendezvous with
// only its baseUrl and token changed. It parses HTTP, calls the engine and
// shapes responses as Upstash's API does; the rules are the engine's, the
// same GraphQL uses. It must never touch storage or the database, and
// never make rules of its own.
package upstash

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strconv"
	"time"

	"rendezvous/auth"
	"rendezvous/engine"
	"rendezvous/graph"
	"rendezvous/internal/requestid"
)

// Pattern is where the API is mounted: Upstash's paths all start with /v2/.
const Pattern = "/v2/"

// Sibling mounts the API on the GraphQL handler's mux (graph.HandlerConfig.Siblings).
func Sibling(eng *engine.Engine) graph.Sibling {
	return graph.Sibling{Pattern: Pattern, Build: func(g *graph.Gate) http.Handler { return newHandler(eng, g) }}
}

type api struct {
	eng  *engine.Engine
	gate *graph.Gate
	log  *slog.Logger
}

func newHandler(eng *engine.Engine, g *graph.Gate) http.Handler {
	a := &api{eng: eng, gate: g, log: g.Logger()}
	mux := http.NewServeMux()
	mux.Handle("POST /v2/notify/{eventId}", a.op(mutation, a.notify))
	mux.Handle("POST /v2/notify/{workflowRunId}/{eventId}", a.op(mutation, a.notify))
	mux.Handle("GET /v2/waiters/{eventId}", a.op(query, a.waiters))
	mux.Handle("DELETE /v2/workflows/runs/{workflowRunId}", a.op(mutation, a.cancelOne))
	mux.Handle("DELETE /v2/workflows/runs", a.op(bulkMutation, a.cancelMany))
	mux.Handle("GET /v2/workflows/events", a.op(query, a.logs))
	mux.Handle("POST /v2/batch", a.op(bulkMutation, a.batch))
	mux.Handle("/v2/", a.op(query, func(r *call) (any, error) {
		return nil, apiErrorf(http.StatusNotFound, codeNotFound, "%s %s is not an endpoint of this service's Upstash API", r.Method, r.URL.Path)
	}))
	return mux
}

// Kinds of operation, as GraphQL counts them in metrics and rate limits.
const (
	query    = "query"
	mutation = "mutation" // costs one mutation of the caller's rate limit
	// bulkMutation costs as many mutations as it does the work of; its
	// handler charges them (call.charge) before doing any.
	bulkMutation = "bulk"
)

// Codes counted in metrics for errors made here (the engine's are its own).
const (
	codeUnauthenticated = "UNAUTHENTICATED"
	codeForbidden       = "FORBIDDEN"
	codeRateLimited     = "RATE_LIMITED"
	codeBadUserInput    = "BAD_USER_INPUT"
	codeNotFound        = "NOT_FOUND"
	codeTooLarge        = "PAYLOAD_TOO_LARGE"
	codeInternal        = "INTERNAL_SERVER_ERROR"
)

// apiError is an error answered with its own status and message.
type apiError struct {
	status  int
	code    string
	message string
	// retryAfter: how long until a rate-limited call may be made.
	retryAfter time.Duration
}

func (e *apiError) Error() string { return e.message }

func apiErrorf(status int, code, format string, args ...any) *apiError {
	return &apiError{status: status, code: code, message: fmt.Sprintf(format, args...)}
}

// call is one request as a handler sees it.
type call struct {
	*http.Request
	api       *api
	principal *auth.Principal
}

// charge takes n mutations from the caller's rate limit: a bulk call that
// does the work of several mutations (several run ids, a batch) costs as
// many as GraphQL would charge for them, all or nothing.
func (c *call) charge(n int) error {
	if n <= 0 {
		return nil
	}
	if ok, wait := c.api.gate.AllowMutations(c.Context(), c.principal, n); !ok {
		return rateLimited(wait)
	}
	return nil
}

type handlerFunc func(c *call) (any, error)

// op authenticates the caller as /query does (a server token; run tokens
// may only use GraphQL's own operations), rate-limits mutations with the
// caller's GraphQL bucket, caps the body, runs fn and writes its result or
// its error in Upstash's shape ({"error": "..."}).
func (a *api) op(kind string, fn handlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				a.log.ErrorContext(r.Context(), "panic in Upstash API", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				a.writeError(w, r, fmt.Errorf("panic: %v", p))
			}
		}()
		res, err := a.run(w, r, kind, fn)
		if err != nil {
			a.writeError(w, r, err)
			return
		}
		if kind == bulkMutation {
			kind = mutation
		}
		a.gate.OperationDone(kind, time.Since(start))
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusOK)
		enc := json.NewEncoder(w)
		enc.SetEscapeHTML(false)
		enc.Encode(res)
	})
}

func (a *api) run(w http.ResponseWriter, r *http.Request, kind string, fn handlerFunc) (any, error) {
	p, err := a.gate.Authenticate(r)
	if err != nil {
		w.Header().Set("WWW-Authenticate", `Bearer realm="rendezvous"`)
		return nil, apiErrorf(http.StatusUnauthorized, codeUnauthenticated, "a valid token is required (Authorization: Bearer <token>)")
	}
	if !p.FullAccess() {
		return nil, apiErrorf(http.StatusForbidden, codeForbidden, "a run token may not call the Upstash API; use a server token")
	}
	if kind == mutation {
		if ok, wait := a.gate.AllowMutations(r.Context(), p, 1); !ok {
			return nil, rateLimited(wait)
		}
	}
	max := a.gate.MaxBodyBytes()
	if r.ContentLength > max {
		return nil, apiErrorf(http.StatusRequestEntityTooLarge, codeTooLarge, "the request body is larger than the limit of %d bytes", max)
	}
	r.Body = http.MaxBytesReader(w, r.Body, max)
	return fn(&call{Request: r, api: a, principal: p})
}

// rateLimited is the 429 Upstash sends, with the headers the npm client reads
// (Burst-RateLimit-*) and Retry-After.
func rateLimited(wait time.Duration) *apiError {
	e := apiErrorf(http.StatusTooManyRequests, codeRateLimited, "too many requests; retry after %d s", int(wait/time.Second)+1)
	e.retryAfter = wait
	return e
}

// writeError answers err in Upstash's shape. Engine errors keep their
// message; anything else is internal: logged, and answered with the
// request id only.
func (a *api) writeError(w http.ResponseWriter, r *http.Request, err error) {
	status, code, msg := http.StatusInternalServerError, codeInternal, ""
	var ae *apiError
	var ee *engine.Error
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &ae):
		status, code, msg = ae.status, ae.code, ae.message
		if ae.status == http.StatusTooManyRequests {
			secs := strconv.Itoa(int(ae.retryAfter/time.Second) + 1)
			w.Header().Set("Retry-After", secs)
			w.Header().Set("Burst-RateLimit-Remaining", "0")
			w.Header().Set("Burst-RateLimit-Reset", strconv.FormatInt(time.Now().Add(ae.retryAfter).Unix()+1, 10))
		}
	case errors.As(err, &mbe):
		status, code, msg = http.StatusRequestEntityTooLarge, codeTooLarge, fmt.Sprintf("the request body is larger than the limit of %d bytes", mbe.Limit)
	case errors.As(err, &ee):
		status, code, msg = statusOf(ee.Code), string(ee.Code), ee.Message
		if ee.Code == engine.CodeUnavailable {
			a.log.WarnContext(r.Context(), "database unavailable", "err", err)
		}
	default:
		id := requestid.From(r.Context())
		a.log.ErrorContext(r.Context(), "internal error", "err", err)
		msg = "internal server error (request id " + id + ")"
	}
	a.gate.ErrorSent(code)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.Encode(map[string]string{"error": msg})
}

// statusOf is the HTTP status Upstash answers for what the engine's code
// says. A run that has ended is 400, as Upstash answers a call on a
// finished run (its SDK reads a 400 there as "the run was finished").
func statusOf(c engine.Code) int {
	switch c {
	case engine.CodeBadUserInput, engine.CodeRunNotActive:
		return http.StatusBadRequest
	case engine.CodeNotFound:
		return http.StatusNotFound
	case engine.CodePayloadTooLarge:
		return http.StatusRequestEntityTooLarge
	case engine.CodeUnavailable, engine.CodeOutcomeUnknown:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

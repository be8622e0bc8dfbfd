package graph

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"
)

// Recorder hears what the GraphQL layer did, for metrics. Its methods are
// called from any goroutine and must be cheap and never block.
type Recorder interface {
	// GraphQLError: an error with this extensions.code was sent to a client.
	GraphQLError(code string)
	// OperationDone: a query or mutation answered, or a subscription was set
	// up (its waiter registered), after d. operation is query, mutation or
	// subscription.
	OperationDone(operation string, d time.Duration)
	// ConnectionOpened and ConnectionClosed bracket a websocket or SSE stream.
	ConnectionOpened(transport string)
	ConnectionClosed(transport string)
	// SubscriptionStarted and SubscriptionEnded bracket a waitForEvent whose
	// waiter was registered.
	SubscriptionStarted()
	SubscriptionEnded()
	// Delivered: a subscription's result (or error) was handed to its
	// transport d after its waiter ended.
	Delivered(d time.Duration)
}

// Transports of ConnectionOpened and ConnectionClosed.
const (
	TransportWebsocket = "websocket"
	TransportSSE       = "sse"
)

type nopRecorder struct{}

func (nopRecorder) GraphQLError(string)                 {}
func (nopRecorder) OperationDone(string, time.Duration) {}
func (nopRecorder) ConnectionOpened(string)             {}
func (nopRecorder) ConnectionClosed(string)             {}
func (nopRecorder) SubscriptionStarted()                {}
func (nopRecorder) SubscriptionEnded()                  {}
func (nopRecorder) Delivered(time.Duration)             {}

type recorderKey struct{}

// recorderFrom is the recorder of the handler serving ctx's request; the
// error paths outside gqlgen's presenter (HTTP refusals, operation
// middlewares, the websocket guard) find it there.
func recorderFrom(ctx context.Context) Recorder {
	if r, ok := ctx.Value(recorderKey{}).(Recorder); ok {
		return r
	}
	return nopRecorder{}
}

// errorExtensions returns the extensions of an error sent to a client with
// the code, carrying the request id, and counts it. Every error a client
// gets goes through here or through reportError, once.
func errorExtensions(ctx context.Context, code string) map[string]any {
	ext := map[string]any{"code": code}
	if id := RequestID(ctx); id != "" {
		ext["requestId"] = id
	}
	recorderFrom(ctx).GraphQLError(code)
	return ext
}

// reportError stamps the request id on an error gqlgen's presenter made,
// and counts it.
func reportError(ctx context.Context, e *gqlerror.Error) *gqlerror.Error {
	if e.Extensions == nil {
		e.Extensions = map[string]any{}
	}
	if id := RequestID(ctx); id != "" {
		e.Extensions["requestId"] = id
	}
	code, _ := e.Extensions["code"].(string)
	recorderFrom(ctx).GraphQLError(code)
	return e
}

// operationObserver is the outermost AroundOperations middleware: it times
// every operation and writes one log line per query (debug) and mutation
// (info) with its outcome. Subscriptions log their own start and end (see
// subscription.go); their duration here is the time to set them up.
type operationObserver struct {
	rec Recorder
	log *slog.Logger
}

func (o operationObserver) around(ctx context.Context, next graphql.OperationHandler) graphql.ResponseHandler {
	oc := graphql.GetOperationContext(ctx)
	if oc == nil || oc.Operation == nil {
		return next(ctx)
	}
	op := oc.Operation.Operation
	start := time.Now()
	responses := next(ctx)
	if op == ast.Subscription {
		o.rec.OperationDone(string(op), time.Since(start))
		return responses
	}
	first := true
	return func(ctx context.Context) *graphql.Response {
		resp := responses(ctx)
		if first {
			first = false
			d := time.Since(start)
			o.rec.OperationDone(string(op), d)
			level := slog.LevelDebug
			if op == ast.Mutation {
				level = slog.LevelInfo
			}
			// Field names only: never arguments, variables or results.
			o.log.Log(ctx, level, string(op), "fields", fieldNames(oc), "outcome", outcome(resp), "duration_ms", millis(d))
		}
		return resp
	}
}

// fieldNames lists the operation's root fields (schema names, not aliases),
// each once, as the executor collects them.
func fieldNames(oc *graphql.OperationContext) string {
	var names []string
	seen := map[string]bool{}
	fields, _ := collectRootFields(oc)
	for _, f := range fields {
		if !seen[f.Name] {
			seen[f.Name] = true
			names = append(names, f.Name)
		}
	}
	return strings.Join(names, ",")
}

// outcome is "ok", or the code of the response's first error.
func outcome(resp *graphql.Response) string {
	if resp == nil || len(resp.Errors) == 0 {
		return "ok"
	}
	if code, ok := resp.Errors[0].Extensions["code"].(string); ok && code != "" {
		return code
	}
	return "error"
}

func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

package graph

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"

	"rendezvous/engine"
	"rendezvous/models"
)

// A subscription resolver can only return a channel of values, but a wait
// can also end in an error after it started (its run was canceled). The
// resolver's goroutine parks such an error in a slot that lives in the
// operation's context, closes the channel, and the response interceptor
// below turns the end of the stream into one response carrying the error.
// This works the same on both websocket protocols and on SSE, and looks
// exactly like an error returned when the subscription starts.

type subscriptionErrorKey struct{}

type subscriptionErrorSlot struct {
	mu  sync.Mutex
	err error
}

func (s *subscriptionErrorSlot) set(err error) {
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
}

func (s *subscriptionErrorSlot) take() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.err
	s.err = nil
	return err
}

// withSubscriptionErrorSlot is an AroundOperations middleware.
func withSubscriptionErrorSlot(ctx context.Context, next graphql.OperationHandler) graphql.ResponseHandler {
	if oc := graphql.GetOperationContext(ctx); oc != nil && oc.Operation != nil && oc.Operation.Operation == ast.Subscription {
		ctx = context.WithValue(ctx, subscriptionErrorKey{}, &subscriptionErrorSlot{})
	}
	return next(ctx)
}

// subscriptionErrorResponses is an AroundResponses middleware.
func subscriptionErrorResponses(present graphql.ErrorPresenterFunc) graphql.ResponseMiddleware {
	return func(ctx context.Context, next graphql.ResponseHandler) *graphql.Response {
		resp := next(ctx)
		if resp != nil {
			return resp
		}
		slot, _ := ctx.Value(subscriptionErrorKey{}).(*subscriptionErrorSlot)
		if slot == nil {
			return nil
		}
		err := slot.take()
		if err == nil {
			return nil
		}
		gqlErr := present(ctx, err)
		if gqlErr.Path == nil {
			gqlErr.Path = ast.Path{ast.PathName("waitForEvent")}
		}
		return &graphql.Response{Data: json.RawMessage("null"), Errors: gqlerror.List{gqlErr}}
	}
}

// waitForEvent registers the wait and streams its result. It logs the
// subscription's start and its end with the reason (notified, timeout,
// canceled, client_gone, error), never the event data.
func (r *Resolver) waitForEvent(ctx context.Context, p engine.WaitParams) (<-chan *models.WaitResult, error) {
	start := time.Now()
	w, err := r.Engine.Wait(ctx, p)
	if err != nil {
		r.Log.InfoContext(ctx, "subscription ended", "event_id", p.EventID, "reason", "error", "code", codeOf(err), "duration_ms", millis(time.Since(start)))
		return nil, err
	}
	if r.Log.Enabled(ctx, slog.LevelInfo) {
		r.Log.InfoContext(ctx, "subscription started", "event_id", p.EventID, "waiter", w.WaiterID())
	}
	return r.streamWait(ctx, w, start), nil
}

// codeOf is the code a client gets for err.
func codeOf(err error) string {
	if code := engine.ErrorCode(err); code != "" {
		return string(code)
	}
	return codeInternal
}

// streamWait owns the channel of one waitForEvent: the wait delivers its
// single result once (the buffer of one means the send never blocks) or
// parks the error, then the channel is closed and the transport told. No
// goroutine waits meanwhile: the wait is driven by the hub, a timer and the
// context.
func (r *Resolver) streamWait(ctx context.Context, w *engine.Wait, start time.Time) <-chan *models.WaitResult {
	ch := make(chan *models.WaitResult, 1)
	ready := armStreamReady(ctx)
	r.Rec.SubscriptionStarted()
	w.Watch(ctx, func(res *models.WaitResult, err error) {
		reason, code := "error", ""
		defer func() {
			close(ch)
			if ready != nil {
				ready()
			}
		}()
		defer func() {
			r.Rec.SubscriptionEnded()
			if !r.Log.Enabled(ctx, slog.LevelInfo) {
				return
			}
			attrs := []any{"waiter", w.WaiterID(), "reason", reason}
			if code != "" {
				attrs = append(attrs, "code", code)
			}
			r.Log.InfoContext(ctx, "subscription ended", append(attrs, "duration_ms", millis(time.Since(start)))...)
		}()
		defer func() {
			// A panic here would kill the process: this runs on a timer's,
			// the hub's or the context's goroutine, which no gqlgen recover
			// covers. Answer the subscriber as for any internal error.
			if p := recover(); p != nil {
				reason, code = "error", codeInternal
				if slot, _ := ctx.Value(subscriptionErrorKey{}).(*subscriptionErrorSlot); slot != nil {
					slot.set(fmt.Errorf("panic in waitForEvent: %v", p))
				}
			}
		}()
		if ctx.Err() != nil {
			reason = "client_gone" // nobody to tell
			return
		}
		r.delivered(w)
		if err != nil {
			if reason, code = "error", codeOf(err); engine.ErrorCode(err) == engine.CodeRunNotActive {
				reason = "canceled"
			}
			if slot, _ := ctx.Value(subscriptionErrorKey{}).(*subscriptionErrorSlot); slot != nil {
				slot.set(err)
			}
			return
		}
		reason = "notified"
		if res.Timeout {
			reason = "timeout"
		}
		ch <- res
	})
	return ch
}

// delivered observes how long after its waiter ended a result is handed to
// the transport, on the engine's clock (the one that stamped the end).
func (r *Resolver) delivered(w *engine.Wait) {
	ended := w.EndedAt()
	if ended.IsZero() {
		return
	}
	now := time.Now
	if r.Now != nil {
		now = r.Now
	}
	r.Rec.Delivered(max(0, now().Sub(ended)))
}

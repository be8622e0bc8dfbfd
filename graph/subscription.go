package graph

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"

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

// streamWait owns the channel of one waitForEvent: it sends the single
// result (the buffer of one means the send never blocks) or parks the error,
// then closes the channel.
func streamWait(ctx context.Context, w *engine.Wait) <-chan *models.WaitResult {
	ch := make(chan *models.WaitResult, 1)
	go func() {
		defer close(ch)
		defer func() {
			// A panic here would kill the process: no gqlgen recover covers
			// this goroutine. Answer the subscriber as for any internal error.
			if p := recover(); p != nil {
				if slot, _ := ctx.Value(subscriptionErrorKey{}).(*subscriptionErrorSlot); slot != nil {
					slot.set(fmt.Errorf("panic in waitForEvent: %v", p))
				}
			}
		}()
		res, err := w.Result(ctx)
		if ctx.Err() != nil {
			return // the subscriber left; nobody to tell
		}
		if err != nil {
			if slot, _ := ctx.Value(subscriptionErrorKey{}).(*subscriptionErrorSlot); slot != nil {
				slot.set(err)
			}
			return
		}
		ch <- res
	}()
	return ch
}

package graph

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"

	"rendezvous/engine"
	"rendezvous/internal/requestid"
)

func sprintf(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// Codes the GraphQL layer adds to the engine's.
const (
	codeInternal     = "INTERNAL_SERVER_ERROR"
	codeBadUserInput = "BAD_USER_INPUT"
	// codeBadRequest: the HTTP request itself is unusable (not JSON, wrong
	// method or content type, a subscription over plain HTTP).
	codeBadRequest = "BAD_REQUEST"
)

// errorPresenter lets through the errors the service made on purpose (engine
// errors with their code, gqlgen's parse and validation errors, scalar
// errors) and replaces everything else with a bare INTERNAL_SERVER_ERROR;
// the detail goes to the log only. Every error gets the request id in
// extensions.requestId and is counted.
func errorPresenter(log *slog.Logger) graphql.ErrorPresenterFunc {
	return func(ctx context.Context, err error) *gqlerror.Error {
		return reportError(ctx, present(ctx, log, err))
	}
}

func present(ctx context.Context, log *slog.Logger, err error) *gqlerror.Error {
	gqlErr := graphql.DefaultErrorPresenter(ctx, err)
	var ee *engine.Error
	if errors.As(err, &ee) {
		gqlErr.Message = ee.Message
		setCode(gqlErr, string(ee.Code))
		if ee.Code == engine.CodeUnavailable {
			log.WarnContext(ctx, "database unavailable", "err", err)
		}
		return gqlErr
	}
	if code, ok := gqlErr.Extensions["code"].(string); ok {
		if code == "GRAPHQL_VALIDATION_FAILED" && len(gqlErr.Path) > 0 && gqlErr.Path[0] == ast.PathName("variable") {
			setCode(gqlErr, codeBadUserInput) // a variable's value, not the document, is wrong
		}
		return gqlErr
	}
	if gqlErr.Err == nil || isGQLError(err) {
		// Made by gqlgen itself (no cause): a message about the request.
		setCode(gqlErr, codeBadUserInput)
		return gqlErr
	}
	id := RequestID(ctx)
	log.ErrorContext(ctx, "internal error", "err", err)
	return &gqlerror.Error{
		Message:    "internal server error (request id " + id + ")",
		Path:       gqlErr.Path,
		Extensions: map[string]any{"code": codeInternal, "requestId": id},
	}
}

// isGQLError: the chain holds a *gqlerror.Error whose own cause is nil, that
// is an error gqlgen or a scalar made about the input.
func isGQLError(err error) bool {
	var g *gqlerror.Error
	return errors.As(err, &g) && g.Err == nil
}

func setCode(e *gqlerror.Error, code string) {
	if e.Extensions == nil {
		e.Extensions = map[string]any{}
	}
	e.Extensions["code"] = code
}

// recoverFunc turns a panic in a resolver into an internal error; the stack
// goes to the log.
func recoverFunc(log *slog.Logger) graphql.RecoverFunc {
	return func(ctx context.Context, p any) error {
		log.ErrorContext(ctx, "panic in resolver", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
		return fmt.Errorf("panic: %v", p)
	}
}

// RequestID returns the id of the request ctx belongs to.
func RequestID(ctx context.Context) string { return requestid.From(ctx) }

// withRequestID gives every request an id, the caller's X-Request-Id when it
// sends a sane one, returned in the response header; log lines written with
// the request's context carry it (requestid.LogHandler), and so does every
// error sent back. It also hands the handler's recorder to the error paths.
func withRequestID(rec Recorder, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("X-Request-Id")
		if id == "" || len(id) > 128 || strings.ContainsFunc(id, func(c rune) bool { return c < 0x21 || c > 0x7e }) {
			var b [12]byte
			rand.Read(b[:])
			id = hex.EncodeToString(b[:])
		}
		w.Header().Set("X-Request-Id", id)
		ctx := context.WithValue(requestid.With(r.Context(), id), recorderKey{}, rec)
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

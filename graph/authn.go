// Authentication: who is calling (a server token, a run token or nobody),
// from the Authorization header or a websocket's connection_init.

package graph

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/99designs/gqlgen/graphql/handler/transport"

	"rendezvous/auth"
)

// Error codes of the security layer.
const (
	codeUnauthenticated = "UNAUTHENTICATED"
	codeForbidden       = "FORBIDDEN"
	codeRateLimited     = "RATE_LIMITED"
	codeTooComplex      = "COMPLEXITY_LIMIT_EXCEEDED"
)

// closeUnauthorized is graphql-transport-ws's close code for a connection
// that may not run operations (44xx codes mirror HTTP statuses).
const closeUnauthorized = 4401

type principalKey struct{}

func withPrincipal(ctx context.Context, p *auth.Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// principal is the caller of the request ctx belongs to; nil before authentication.
func principal(ctx context.Context) *auth.Principal {
	p, _ := ctx.Value(principalKey{}).(*auth.Principal)
	return p
}

// authenticate resolves the Authorization header of plain HTTP and SSE
// requests, answering 401 when it is missing (on a server with tokens) or
// invalid. A websocket upgrade may carry the header too; if it does not,
// the token comes in connection_init (wsInit).
func authenticate(a *auth.Authenticator, now func() time.Time, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		header := r.Header.Get("Authorization")
		if r.Method == http.MethodOptions || (isUpgrade(r) && header == "") {
			next.ServeHTTP(w, r)
			return
		}
		p, err := a.Authenticate(header, now())
		if err != nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="rendezvous"`)
			writeError(w, r, http.StatusUnauthorized, codeUnauthenticated, "a valid token is required (Authorization: Bearer <token>)")
			return
		}
		ctx := withPrincipal(r.Context(), p)
		if !p.Expires.IsZero() {
			// An SSE stream (or a websocket authenticated by header) ends
			// when its run token does.
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadlineCause(ctx, p.Expires, errTokenExpired)
			defer cancel()
		}
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

func isUpgrade(r *http.Request) bool { return r.Header.Get("Upgrade") != "" }

// RequireServerToken lets through requests with a server token (or any
// request on a server running open) and refuses the rest: 401 without a
// valid token, 403 with a run token. It guards /metrics.
func RequireServerToken(a *auth.Authenticator, now func() time.Time, next http.Handler) http.Handler {
	if now == nil {
		now = time.Now
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, err := a.Authenticate(r.Header.Get("Authorization"), now())
		if err != nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="rendezvous"`)
			writeError(w, r, http.StatusUnauthorized, codeUnauthenticated, "a server token is required (Authorization: Bearer <token>)")
			return
		}
		if !p.FullAccess() {
			writeError(w, r, http.StatusForbidden, codeForbidden, "a run token may not read %s", r.URL.Path)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// errTokenExpired is the cause of a context that ended with its run token.
var errTokenExpired = errors.New("run token expired")

// wsInit authenticates a websocket from its connection_init payload
// ("Authorization" or "authToken"), unless the upgrade request already did.
// A connection opened with a run token ends when the token expires (its
// context's cause is errTokenExpired).
func wsInit(a *auth.Authenticator, now func() time.Time) wsInitFunc {
	return func(ctx context.Context, payload transport.InitPayload) (context.Context, error) {
		p := principal(ctx)
		if p == nil {
			token := payload.Authorization()
			if token == "" {
				token = payload.GetString("authToken")
			}
			var err error
			if p, err = a.Authenticate(token, now()); err != nil {
				return ctx, errors.New("unauthenticated")
			}
			ctx = withPrincipal(ctx, p)
		}
		if !p.Expires.IsZero() {
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadlineCause(ctx, p.Expires, errTokenExpired)
			context.AfterFunc(ctx, cancel) // release the timer with the connection
		}
		return ctx, nil
	}
}

// Sibling HTTP surfaces: APIs served beside /query (the Upstash REST API)
// on the same server and handler chain (request ids, client addresses,
// origins), checked by the same tokens and rate limits, counted by the same
// metrics. They get these through a Gate rather than copies of them.

package graph

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"rendezvous/auth"
)

// Sibling is an HTTP surface mounted on the GraphQL handler's mux.
type Sibling struct {
	// Pattern is the ServeMux pattern it serves ("/v2/").
	Pattern string
	// Build makes its handler; it is called once, by NewHandler.
	Build func(*Gate) http.Handler
}

// Gate hands a sibling surface the GraphQL endpoint's checks. It knows
// nothing of the sibling's error format: the sibling writes its own.
type Gate struct {
	auth    *auth.Authenticator
	now     func() time.Time
	limiter *rateLimiter
	rec     Recorder
	maxBody int64
	log     *slog.Logger
}

// Authenticate resolves the request's Authorization header as /query does:
// an error when it is missing (on a server with tokens) or invalid.
func (g *Gate) Authenticate(r *http.Request) (*auth.Principal, error) {
	return g.auth.Authenticate(r.Header.Get("Authorization"), g.now())
}

// AllowMutations takes n mutations from the caller's rate limit bucket, the
// one its GraphQL mutations use; when refused it says how long to wait.
func (g *Gate) AllowMutations(ctx context.Context, p *auth.Principal, n int) (bool, time.Duration) {
	return g.limiter.allowCaller(ctx, p, n)
}

// ErrorSent counts an error answered with this code (the GraphQL codes:
// BAD_USER_INPUT, NOT_FOUND, …) in the same metric as GraphQL's errors.
func (g *Gate) ErrorSent(code string) { g.rec.GraphQLError(code) }

// OperationDone records an answered call (operation "query" or "mutation").
func (g *Gate) OperationDone(operation string, d time.Duration) { g.rec.OperationDone(operation, d) }

// MaxBodyBytes is the body limit of /query.
func (g *Gate) MaxBodyBytes() int64 { return g.maxBody }

// Logger logs with the request id of the context it is given.
func (g *Gate) Logger() *slog.Logger { return g.log }

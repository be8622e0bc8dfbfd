// Rate limiting of mutations per caller.

package graph

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"
)

// rateLimiter is a token bucket per caller for mutations: rate per second,
// up to burst at once. Buckets idle for a minute are dropped.
type rateLimiter struct {
	rate  float64
	burst float64
	now   func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
	swept   time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newRateLimiter(rate float64, burst int, now func() time.Time) *rateLimiter {
	if rate <= 0 {
		return nil
	}
	if burst < 1 {
		burst = max(1, int(rate))
	}
	return &rateLimiter{rate: rate, burst: float64(burst), now: now, buckets: map[string]*bucket{}}
}

// allow takes n tokens for key, or says how long until they are available.
func (l *rateLimiter) allow(key string, n int) (bool, time.Duration) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.swept) > time.Minute {
		for k, b := range l.buckets {
			if now.Sub(b.last) > time.Minute {
				delete(l.buckets, k)
			}
		}
		l.swept = now
	}
	b := l.buckets[key]
	if b == nil {
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[key] = b
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	need := float64(n)
	if b.tokens >= need {
		b.tokens -= need
		return true, 0
	}
	if need > l.burst {
		return false, time.Duration(need / l.rate * float64(time.Second))
	}
	return false, time.Duration((need - b.tokens) / l.rate * float64(time.Second))
}

type clientIPKey struct{}

// limitMutations is an AroundOperations middleware that rate-limits
// mutations per token (per client address for anonymous callers). Every
// mutation field counts: one request with 40 aliased triggers costs 40.
func (l *rateLimiter) limitMutations(ctx context.Context, next graphql.OperationHandler) graphql.ResponseHandler {
	if l == nil {
		return next(ctx)
	}
	oc := graphql.GetOperationContext(ctx)
	if oc.Operation.Operation != ast.Mutation {
		return next(ctx)
	}
	key := "ip:" + clientIP(ctx)
	if p := principal(ctx); p != nil && p.Key != "" {
		key = p.Key
	}
	ok, wait := l.allow(key, max(1, len(rootFields(oc.Doc, oc.Operation.SelectionSet))))
	if ok {
		return next(ctx)
	}
	secs := int(wait/time.Second) + 1
	ext := errorExtensions(ctx, codeRateLimited)
	ext["retryAfter"] = secs
	return graphql.OneShot(&graphql.Response{Errors: gqlerror.List{{
		Message:    fmt.Sprintf("too many mutations; retry after %d s", secs),
		Extensions: ext,
	}}})
}

func clientIP(ctx context.Context) string {
	ip, _ := ctx.Value(clientIPKey{}).(string)
	return ip
}

func withClientIP(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			host = r.RemoteAddr
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), clientIPKey{}, host)))
	})
}

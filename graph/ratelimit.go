// Rate limiting of mutations per caller.

package graph

import (
	"container/list"
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"
	"golang.org/x/time/rate"

	"rendezvous/auth"
)

// callerRate is mutations per second with a burst; a zero Rate is no limit.
type callerRate struct {
	Rate  float64
	Burst int
}

func (l callerRate) unlimited() bool { return l.Rate <= 0 || math.IsInf(l.Rate, 1) }

// DefaultMaxRateLimitedCallers bounds the callers whose limiters are kept.
const DefaultMaxRateLimitedCallers = 100_000

// rateLimiter holds a token bucket (golang.org/x/time/rate) per caller: per
// token, or per client address for anonymous callers. A token with a limit
// of its own (auth.Limit) uses it; other server tokens use server, everyone
// else (anonymous callers on an open server, run tokens) others.
//
// Memory is bounded: a limiter whose bucket has refilled is the same as a
// new one, so those are dropped when the table is swept (every minute, or
// when it is full); if a flood of distinct callers still fills the table,
// the least recently used is dropped: it starts again with a full bucket,
// which costs less than refusing new callers or growing without bound.
type rateLimiter struct {
	server, others callerRate
	max            int
	now            func() time.Time

	mu      sync.Mutex
	callers map[string]*list.Element // of *callerLimit, most recent first
	lru     list.List
	swept   time.Time
}

type callerLimit struct {
	key string
	lim *rate.Limiter
}

func newRateLimiter(server, others callerRate, maxCallers int, now func() time.Time) *rateLimiter {
	if maxCallers <= 0 {
		maxCallers = DefaultMaxRateLimitedCallers
	}
	return &rateLimiter{
		server: server, others: others, max: maxCallers, now: now,
		callers: map[string]*list.Element{},
	}
}

// limitOf is the limit that applies to the principal.
func (l *rateLimiter) limitOf(p *auth.Principal) callerRate {
	switch {
	case p != nil && p.Limit != nil:
		return callerRate{Rate: p.Limit.Rate, Burst: p.Limit.Burst}
	case p != nil && p.Kind == auth.Server:
		return l.server
	}
	return l.others
}

// allow takes n tokens from key's bucket (limit lim), or says how long
// until they are available.
func (l *rateLimiter) allow(key string, lim callerRate, n int) (bool, time.Duration) {
	if lim.unlimited() {
		return true, 0
	}
	burst := lim.Burst
	if burst < 1 {
		burst = max(1, int(min(lim.Rate, math.MaxInt32)))
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.swept) > time.Minute {
		l.sweepIdle(now)
	}
	var c *callerLimit
	if e := l.callers[key]; e != nil {
		l.lru.MoveToFront(e)
		c = e.Value.(*callerLimit)
		if c.lim.Limit() != rate.Limit(lim.Rate) || c.lim.Burst() != burst {
			c.lim = rate.NewLimiter(rate.Limit(lim.Rate), burst)
		}
	} else {
		if len(l.callers) >= l.max {
			// At most one full sweep a second: a flood of new callers
			// must not cost a walk of the whole table each.
			if now.Sub(l.swept) > time.Second {
				l.sweepIdle(now)
			}
			for len(l.callers) >= l.max {
				e := l.lru.Back()
				l.lru.Remove(e)
				delete(l.callers, e.Value.(*callerLimit).key)
			}
		}
		c = &callerLimit{key: key, lim: rate.NewLimiter(rate.Limit(lim.Rate), burst)}
		l.callers[key] = l.lru.PushFront(c)
	}
	if c.lim.AllowN(now, n) {
		return true, 0
	}
	need := float64(n)
	if n <= burst {
		need -= c.lim.TokensAt(now)
	}
	return false, time.Duration(need / lim.Rate * float64(time.Second))
}

// sweepIdle drops the limiters whose bucket is full again. l.mu is held.
func (l *rateLimiter) sweepIdle(now time.Time) {
	l.swept = now
	for e := l.lru.Back(); e != nil; {
		prev := e.Prev()
		c := e.Value.(*callerLimit)
		if c.lim.TokensAt(now) >= float64(c.lim.Burst()) {
			l.lru.Remove(e)
			delete(l.callers, c.key)
		}
		e = prev
	}
}

// size is the number of callers whose limiters are kept.
func (l *rateLimiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.callers)
}

// limitMutations is an AroundOperations middleware that rate-limits
// mutations per caller. Every mutation field the executor will resolve
// counts (one request with 40 aliased triggers costs 40): they are counted
// on graphql.CollectFields, the collection gqlgen executes (and caches on
// the operation context), so fragments and @skip/@include are seen exactly
// as the executor sees them. A refused operation runs nothing.
func (l *rateLimiter) limitMutations(ctx context.Context, next graphql.OperationHandler) graphql.ResponseHandler {
	oc := graphql.GetOperationContext(ctx)
	if oc == nil || oc.Operation == nil || oc.Operation.Operation != ast.Mutation {
		return next(ctx)
	}
	p := principal(ctx)
	if l.limitOf(p).unlimited() {
		return next(ctx)
	}
	n := 0
	fields, _ := collectRootFields(oc)
	for _, f := range fields {
		if f.Name != "__typename" {
			n++
		}
	}
	ok, wait := l.allowCaller(ctx, p, max(1, n))
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

// allowCaller takes n tokens from the bucket of the caller of ctx's
// request (principal p): its token's, or its address's when anonymous.
func (l *rateLimiter) allowCaller(ctx context.Context, p *auth.Principal, n int) (bool, time.Duration) {
	key := "ip:" + clientIP(ctx)
	if p != nil && p.Key != "" {
		key = p.Key
	}
	return l.allow(key, l.limitOf(p), n)
}

type clientIPKey struct{}

func clientIP(ctx context.Context) string {
	ip, _ := ctx.Value(clientIPKey{}).(string)
	return ip
}

// ParseTrustedProxies reads a comma-separated list of CIDRs (a plain
// address is one host: /32 or /128), as RENDEZVOUS_TRUSTED_PROXIES gives it.
func ParseTrustedProxies(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || unicode.IsSpace(r) }) {
		if p, err := netip.ParsePrefix(f); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("%q is neither a CIDR nor an IP address", f)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// withClientIP records the client's address for rate limiting. It is the
// direct peer, unless the peer is a trusted proxy: then X-Forwarded-For is
// read from the right (each proxy appends the address it got the request
// from), skipping trusted proxies, and the first address that is not one is
// the client. Whatever is left of it was written by the client and is not
// believed. A malformed X-Forwarded-For counts for nothing: the peer it is.
func withClientIP(trusted []netip.Prefix, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), clientIPKey{}, clientAddr(trusted, r))))
	})
}

func clientAddr(trusted []netip.Prefix, r *http.Request) string {
	peer, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if err != nil {
			return r.RemoteAddr
		}
		return host
	}
	addr := peer.Addr().Unmap().WithZone("") // a prefix never contains a zoned address
	if !isTrusted(trusted, addr) {
		return addr.String()
	}
	var hops []string
	for _, v := range r.Header.Values("X-Forwarded-For") {
		hops = append(hops, strings.Split(v, ",")...)
	}
	client := addr
	for i := len(hops) - 1; i >= 0; i-- {
		hop, ok := parseHop(hops[i])
		if !ok {
			return addr.String()
		}
		client = hop
		if !isTrusted(trusted, hop) {
			break
		}
	}
	return client.String()
}

// parseHop reads one X-Forwarded-For entry: an address, with a port or in
// brackets as some proxies write it.
func parseHop(s string) (netip.Addr, bool) {
	s = strings.TrimSpace(s)
	a, err := netip.ParseAddr(s)
	if err != nil {
		if ap, err2 := netip.ParseAddrPort(s); err2 == nil {
			a, err = ap.Addr(), nil
		} else {
			a, err = netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]"))
		}
	}
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap().WithZone(""), true
}

func isTrusted(trusted []netip.Prefix, a netip.Addr) bool {
	for _, p := range trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

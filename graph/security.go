package graph

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/handler/transport"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"

	"rendezvous/auth"
	"rendezvous/engine"
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

// authorize is an AroundOperations middleware: a run token may only run
// waitForEvent and workflowRun for its own run (and __typename).
func authorize(ctx context.Context, next graphql.OperationHandler) graphql.ResponseHandler {
	p := principal(ctx)
	if p == nil || p.FullAccess() {
		return next(ctx)
	}
	oc := graphql.GetOperationContext(ctx)
	for _, f := range rootFields(oc.Doc, oc.Operation.SelectionSet) {
		if err := runTokenMay(p, f, oc.Variables); err != nil {
			return graphql.OneShot(&graphql.Response{Errors: gqlerror.List{{
				Message:    err.Error(),
				Path:       ast.Path{ast.PathName(f.Alias)},
				Extensions: errorExtensions(ctx, codeForbidden),
			}}})
		}
	}
	return next(ctx)
}

func runTokenMay(p *auth.Principal, f *ast.Field, vars map[string]any) error {
	switch f.Name {
	case "__typename":
		return nil
	case "waitForEvent", "workflowRun":
		id, _ := f.ArgumentMap(vars)["workflowRunId"].(string)
		if id != "" && !strings.HasPrefix(id, engine.RunIDPrefix) {
			id = engine.RunIDPrefix + id
		}
		if id == p.RunID {
			return nil
		}
		return fmt.Errorf("this run token allows %s on run %s only", f.Name, p.RunID)
	}
	return fmt.Errorf("a run token may not use %s", f.Name)
}

// rootFields lists the operation's top-level fields, through fragments.
func rootFields(doc *ast.QueryDocument, set ast.SelectionSet) []*ast.Field {
	var out []*ast.Field
	var walk func(ast.SelectionSet, int)
	walk = func(set ast.SelectionSet, depth int) {
		if depth > 10 {
			return
		}
		for _, sel := range set {
			switch s := sel.(type) {
			case *ast.Field:
				out = append(out, s)
			case *ast.InlineFragment:
				walk(s.SelectionSet, depth+1)
			case *ast.FragmentSpread:
				if fr := doc.Fragments.ForName(s.Name); fr != nil {
					walk(fr.SelectionSet, depth+1)
				}
			}
		}
	}
	walk(set, 0)
	return out
}

// queryLimits refuses operations nested deeper than maxDepth, with more
// than maxAliases aliased fields (the cheap way to multiply work in one
// request), or with more than maxFields fields once fragments are expanded.
// It runs before gqlgen's complexity limit, whose walk re-expands every
// fragment spread: a 1 KB query of fragments that spread the previous one
// twice would make it walk 2^n fields. Here each fragment is measured once.
type queryLimits struct{ maxDepth, maxAliases, maxFields int }

var (
	_ graphql.HandlerExtension        = queryLimits{}
	_ graphql.OperationContextMutator = queryLimits{}
)

func (queryLimits) ExtensionName() string                   { return "QueryLimits" }
func (queryLimits) Validate(graphql.ExecutableSchema) error { return nil }
func (l queryLimits) MutateOperationContext(_ context.Context, oc *graphql.OperationContext) *gqlerror.Error {
	m := measurer{doc: oc.Doc, memo: map[string]size{}, visiting: map[string]bool{}}
	sz := m.set(oc.Operation.SelectionSet)
	tooComplex := func(format string, args ...any) *gqlerror.Error {
		return &gqlerror.Error{Message: fmt.Sprintf(format, args...), Extensions: map[string]any{"code": codeTooComplex}}
	}
	switch {
	case sz.depth > l.maxDepth:
		return tooComplex("the operation is nested %d levels deep; at most %d are allowed", sz.depth, l.maxDepth)
	case sz.aliases > l.maxAliases:
		return tooComplex("the operation has %d aliased fields; at most %d are allowed", sz.aliases, l.maxAliases)
	case sz.fields > l.maxFields:
		return tooComplex("the operation's complexity is too high: it selects %d fields once fragments are expanded; at most %d are allowed", sz.fields, l.maxFields)
	}
	return nil
}

// size of a selection set: levels of nesting, aliased fields and fields,
// with fragments expanded. Counts saturate at sizeCap.
type size struct{ depth, aliases, fields int }

const sizeCap = 1 << 30

func (a size) plus(b size) size {
	return size{max(a.depth, b.depth), min(a.aliases+b.aliases, sizeCap), min(a.fields+b.fields, sizeCap)}
}

type measurer struct {
	doc      *ast.QueryDocument
	memo     map[string]size
	visiting map[string]bool // cycles are refused by validation; this keeps the walk finite
}

func (m measurer) set(set ast.SelectionSet) size {
	var total size
	for _, sel := range set {
		switch s := sel.(type) {
		case *ast.Field:
			child := m.set(s.SelectionSet)
			f := size{depth: child.depth + 1, aliases: child.aliases, fields: min(child.fields+1, sizeCap)}
			if s.Alias != "" && s.Alias != s.Name {
				f.aliases = min(f.aliases+1, sizeCap)
			}
			total = total.plus(f)
		case *ast.InlineFragment:
			total = total.plus(m.set(s.SelectionSet))
		case *ast.FragmentSpread:
			total = total.plus(m.fragment(s.Name))
		}
	}
	return total
}

func (m measurer) fragment(name string) size {
	if sz, ok := m.memo[name]; ok {
		return sz
	}
	fr := m.doc.Fragments.ForName(name)
	if fr == nil || m.visiting[name] {
		return size{}
	}
	m.visiting[name] = true
	sz := m.set(fr.SelectionSet)
	delete(m.visiting, name)
	m.memo[name] = sz
	return sz
}

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

// origins answers CORS for HTTP and refuses cross-origin websocket upgrades
// whose Origin is not allowed. Same-origin requests and clients that send no
// Origin (servers, CLIs) always pass: CORS protects browsers' users, and
// browsers always send Origin across origins.
type origins struct {
	any     bool
	allowed map[string]bool
}

func newOrigins(list []string) origins {
	o := origins{allowed: map[string]bool{}}
	for _, s := range list {
		s = strings.TrimRight(strings.TrimSpace(s), "/")
		switch s {
		case "":
		case "*":
			o.any = true
		default:
			o.allowed[strings.ToLower(s)] = true
		}
	}
	return o
}

func (o origins) ok(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" || o.any || o.allowed[strings.ToLower(origin)] {
		return true
	}
	u, err := url.Parse(origin)
	return err == nil && strings.EqualFold(u.Host, r.Host)
}

func (o origins) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := r.Header.Get("Origin")
		if !o.ok(r) {
			writeError(w, r, http.StatusForbidden, codeForbidden, "origin %s is not allowed (RENDEZVOUS_ALLOWED_ORIGINS)", strconv.Quote(origin))
			return
		}
		if origin != "" {
			w.Header().Add("Vary", "Origin")
			w.Header().Set("Access-Control-Allow-Origin", origin)
			w.Header().Set("Access-Control-Expose-Headers", "X-Request-Id, Retry-After")
			if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
				w.Header().Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
				w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept, X-Request-Id")
				w.Header().Set("Access-Control-Max-Age", "600")
				w.WriteHeader(http.StatusNoContent)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

package graph

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/handler"
	"github.com/99designs/gqlgen/graphql/handler/extension"
	"github.com/99designs/gqlgen/graphql/handler/lru"
	"github.com/99designs/gqlgen/graphql/handler/transport"
	"github.com/vektah/gqlparser/v2/ast"

	"rendezvous/auth"
	"rendezvous/engine"
	"rendezvous/internal/requestid"
)

// HandlerConfig tunes the HTTP side. Zero fields take the defaults.
type HandlerConfig struct {
	// Auth checks tokens; nil runs open.
	Auth *auth.Authenticator
	// AllowedOrigins may call from browsers on other origins ("*": any).
	AllowedOrigins []string
	// MaxBodyBytes caps a POST body and a websocket message; it must leave
	// room for the largest eventData plus the query around it.
	MaxBodyBytes int64
	// Limits on one operation.
	MaxDepth, MaxAliases, MaxComplexity, MaxTokens int
	// MaxSubscriptionsPerConnection caps operations running at once on one websocket.
	MaxSubscriptionsPerConnection int
	// RateLimit is mutations per second per caller (0: unlimited), up to
	// RateBurst at once, for callers without a limit of their own:
	// anonymous callers (per client address) and run tokens.
	RateLimit float64
	RateBurst int
	// ServerRateLimit and ServerRateBurst are the same for server tokens
	// without a limit of their own (auth.Limit); 0: unlimited.
	ServerRateLimit float64
	ServerRateBurst int
	// MaxRateLimitedCallers bounds the per-caller limiters kept in memory.
	MaxRateLimitedCallers int
	// TrustedProxies are the peers whose X-Forwarded-For is believed when
	// telling callers apart by address (ParseTrustedProxies).
	TrustedProxies []netip.Prefix
	// KeepAlive is the interval of keep-alive and ping messages on
	// websockets and SSE; a websocket client that leaves two pings in a
	// row unanswered is disconnected.
	KeepAlive time.Duration
	// InitTimeout is how long a websocket may take to send connection_init.
	InitTimeout time.Duration
	// Playground serves GraphQL Playground at / and allows introspection and
	// field suggestions; off in production.
	Playground bool
	// PlaygroundAssets, when set, is where Playground loads the npm packages
	// graphiql@4.1.2, react@18.2.0 and react-dom@18.2.0 from instead of the
	// public CDN: a base URL (serving <base>/graphiql/…, <base>/react/…,
	// <base>/react-dom/…) or a local directory laid out so (node_modules),
	// which is then served at /playground-assets/ (see playground.go).
	PlaygroundAssets string
	// Streams, when done, ends every websocket and SSE request (graceful
	// shutdown) while plain requests run to completion.
	Streams context.Context
	// Recorder hears errors, operation times, connections and deliveries
	// (metrics); nil: nobody.
	Recorder Recorder
	// Metrics, when set, is served at GET /metrics (Prometheus text
	// format), behind a server token when MetricsTokenRequired.
	Metrics              http.Handler
	MetricsTokenRequired bool
	// ReadyDetails, when set, adds lines to /readyz's body about parts
	// that may be down without making the service unready (Redis: wake-ups
	// then go through the catch-up poll).
	ReadyDetails func() map[string]string
	Now          func() time.Time
	// Logger: log lines written with a request's context carry its
	// request_id (the handler is wrapped with requestid.LogHandler).
	Logger *slog.Logger

	// Hooks signs the completion URLs of durable waiters
	// (Waiter.completionUrl, served by package hooks); nil: none.
	Hooks *auth.HookSigner
	// PublicURL is the base of completion URLs (RENDEZVOUS_PUBLIC_URL,
	// checked by ParsePublicURL); empty: the request's scheme and host,
	// forwarded ones believed from TrustedProxies only.
	PublicURL string

	// Siblings are other HTTP surfaces served beside /query (the Upstash
	// REST API), behind the same checks (see Gate).
	Siblings []Sibling

	// Test hooks, for this package's tests only.
	// resolvedRootField hears every root field just before its resolver
	// runs (innermost of the field middleware), with the arguments it gets.
	resolvedRootField func(ctx context.Context, fc *graphql.FieldContext)
	// authzFieldCheckOnly turns off the authorizer's operation and root
	// field hooks, so that a test shows its field check holds alone.
	authzFieldCheckOnly bool
}

// Defaults of HandlerConfig.
const (
	DefaultMaxDepth                      = 15 // GraphiQL's introspection query needs 13
	DefaultMaxAliases                    = 50
	DefaultMaxComplexity                 = 2000
	DefaultMaxTokens                     = 5000
	DefaultMaxSubscriptionsPerConnection = 1000
	DefaultKeepAlive                     = 15 * time.Second
	DefaultInitTimeout                   = 5 * time.Second
)

func (c HandlerConfig) withDefaults(eng *engine.Engine) HandlerConfig {
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	c.Logger = slog.New(requestid.LogHandler(c.Logger.Handler()))
	if c.Recorder == nil {
		c.Recorder = nopRecorder{}
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Auth == nil {
		c.Auth, _ = auth.New(auth.Config{})
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = int64(eng.Config().MaxPayloadBytes)*2 + 64<<10
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.MaxDepth, DefaultMaxDepth)
	def(&c.MaxAliases, DefaultMaxAliases)
	def(&c.MaxComplexity, DefaultMaxComplexity)
	def(&c.MaxTokens, DefaultMaxTokens)
	def(&c.MaxSubscriptionsPerConnection, DefaultMaxSubscriptionsPerConnection)
	if c.KeepAlive <= 0 {
		c.KeepAlive = DefaultKeepAlive
	}
	if c.InitTimeout <= 0 {
		c.InitTimeout = DefaultInitTimeout
	}
	return c
}

// NewHandler serves the GraphQL API at /query (POST, GET, websocket with
// graphql-transport-ws and graphql-ws, SSE), Playground at /, and /healthz
// and /readyz.
func NewHandler(eng *engine.Engine, cfg HandlerConfig) http.Handler {
	cfg = cfg.withDefaults(eng)
	log := cfg.Logger
	present := errorPresenter(log)
	limiter := newRateLimiter(callerRate{cfg.ServerRateLimit, cfg.ServerRateBurst}, callerRate{cfg.RateLimit, cfg.RateBurst}, cfg.MaxRateLimitedCallers, cfg.Now)

	rec := cfg.Recorder
	vars := newVariableDecoder()
	srv := handler.New(NewExecutableSchema(Config{Resolvers: &Resolver{Engine: eng, Auth: cfg.Auth, Now: cfg.Now, Log: log, Rec: rec, Hooks: cfg.Hooks}}))
	srv.AddTransport(&wsTransport{
		keepAlive:   cfg.KeepAlive,
		initTimeout: cfg.InitTimeout,
		readLimit:   cfg.MaxBodyBytes,
		maxOps:      cfg.MaxSubscriptionsPerConnection,
		vars:        vars,
		init:        wsInit(cfg.Auth, cfg.Now),
		present:     present,
		recover:     recoverFunc(log),
		log:         log,
	})
	srv.AddTransport(transport.Options{})
	// SSE before POST: both take application/json POSTs; SSE only those
	// that accept text/event-stream.
	srv.AddTransport(sseTransport{keepAlive: cfg.KeepAlive, vars: vars})
	srv.AddTransport(newHTTPTransport(cfg.MaxBodyBytes, vars))
	srv.AddTransport(unsupported{}) // last: takes whatever the others did not
	srv.SetQueryCache(boundedCache[*ast.QueryDocument]{lru.New[*ast.QueryDocument](1000)})
	srv.SetParserTokenLimit(cfg.MaxTokens)
	// queryLimits first: it refuses fragment explosions that gqlgen's
	// complexity walk would take exponential time over.
	srv.Use(queryLimits{maxDepth: cfg.MaxDepth, maxAliases: cfg.MaxAliases, maxFields: cfg.MaxComplexity})
	// jsonLiterals before the complexity limit, whose argument maps panic
	// on a literal integer beyond 64 bits.
	srv.Use(newJSONLiterals())
	srv.Use(extension.FixedComplexityLimit(cfg.MaxComplexity))
	if cfg.Playground {
		srv.Use(extension.Introspection{})
	} else {
		srv.SetDisableSuggestion(true)
	}
	srv.SetErrorPresenter(present)
	srv.SetRecoverFunc(recoverFunc(log))
	// First, so that it sees what every other middleware answers.
	srv.AroundOperations(operationObserver{rec: rec, log: log}.around)
	srv.Use(&authorizer{fieldCheckOnly: cfg.authzFieldCheckOnly})
	srv.AroundOperations(limiter.limitMutations)
	srv.AroundOperations(withSubscriptionErrorSlot)
	srv.AroundResponses(subscriptionErrorResponses(present))
	if hook := cfg.resolvedRootField; hook != nil {
		srv.AroundFields(func(ctx context.Context, next graphql.Resolver) (any, error) {
			if fc := graphql.GetFieldContext(ctx); fc != nil && isRootType(fc.Object) {
				hook(ctx, fc)
			}
			return next(ctx)
		})
	}

	mux := http.NewServeMux()
	mux.Handle("/query", limitBody(cfg.MaxBodyBytes, authenticate(cfg.Auth, cfg.Now, endStreamsWith(cfg.Streams, rec, srv))))
	if cfg.Metrics != nil {
		metrics := cfg.Metrics
		if cfg.MetricsTokenRequired {
			metrics = RequireServerToken(cfg.Auth, cfg.Now, metrics)
		}
		mux.Handle("GET /metrics", metrics)
	}
	gate := &Gate{auth: cfg.Auth, now: cfg.Now, limiter: limiter, rec: rec, maxBody: cfg.MaxBodyBytes, log: log}
	for _, s := range cfg.Siblings {
		mux.Handle(s.Pattern, s.Build(gate))
	}
	if cfg.Playground {
		servePlayground(mux, cfg.PlaygroundAssets)
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeStatus(w, http.StatusOK, map[string]any{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		body := map[string]any{"status": "ready", "database": "ok", "auth": "tokens"}
		if cfg.Auth.Open() {
			body["auth"] = "OPEN: no tokens configured, anyone can call every operation"
		}
		if cfg.ReadyDetails != nil {
			for k, v := range cfg.ReadyDetails() {
				body[k] = v
			}
		}
		if err := eng.Ready(ctx); err != nil {
			log.WarnContext(ctx, "not ready", "err", err)
			body["status"], body["database"] = "unavailable", "unreachable"
			writeStatus(w, http.StatusServiceUnavailable, body)
			return
		}
		writeStatus(w, http.StatusOK, body)
	})
	return withRequestID(rec, withClientIP(cfg.TrustedProxies, withPublicBase(cfg.PublicURL, cfg.TrustedProxies, newOrigins(cfg.AllowedOrigins).middleware(mux))))
}

func writeStatus(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(body)
}

// errShuttingDown is the cause of a stream's context that a graceful
// shutdown ended.
var errShuttingDown = errors.New("server shutting down")

// endStreamsWith serves long-lived requests (websocket upgrades and SSE):
// it lifts the server's read and write timeouts, which are for plain
// requests, cancels the stream when streams is done (graceful shutdown),
// and counts the open streams.
func endStreamsWith(streams context.Context, rec Recorder, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !isUpgrade(r) && !strings.Contains(r.Header.Get("Accept"), "text/event-stream") {
			next.ServeHTTP(w, r)
			return
		}
		transport := TransportSSE
		if isUpgrade(r) {
			transport = TransportWebsocket
		}
		rec.ConnectionOpened(transport)
		rc := http.NewResponseController(w)
		rc.SetReadDeadline(time.Time{})
		rc.SetWriteDeadline(time.Time{})
		parent := r.Context()
		expires, hasDeadline := parent.Deadline()
		if transport == TransportWebsocket {
			// The websocket transport takes the stream over and serves it
			// after the handler returned, when net/http (and authenticate)
			// cancel the request's context: the stream's ends here and with
			// streams, and keeps the one deadline an upgrade request has, a
			// run token's expiry from its Authorization header (connection
			// init sets it again on the connection's context).
			parent = context.WithoutCancel(parent)
		}
		ctx, cancel := context.WithCancelCause(parent)
		if transport == TransportWebsocket && hasDeadline {
			var cancelDeadline context.CancelFunc
			ctx, cancelDeadline = context.WithDeadlineCause(ctx, expires, errTokenExpired)
			cancelStream := cancel
			cancel = func(cause error) { cancelStream(cause); cancelDeadline() } // the cause first: it is what the child reports
		}
		stop := func() bool { return false }
		if streams != nil {
			stop = context.AfterFunc(streams, func() { cancel(errShuttingDown) })
		}
		t := &streamTakeover{end: func() {
			stop()
			cancel(nil)
			rec.ConnectionClosed(transport)
		}}
		defer func() { // deferred: a panicking handler's stream ends too
			if !t.taken {
				t.end()
			}
		}()
		next.ServeHTTP(w, r.WithContext(context.WithValue(ctx, streamTakeoverKey{}, t)))
	})
}

// streamTakeover lets the transport serving a stream take over its end:
// the websocket transport serves a connection on a goroutine of its own
// once it is upgraded, and the handler returns (see wsTransport.Do).
type streamTakeover struct {
	end   func()
	taken bool
}

type streamTakeoverKey struct{}

// takeOverStream makes the caller responsible for ending the stream of the
// request with ctx: it must call the returned function once, when the
// stream has ended. nil: the request did not come through endStreamsWith,
// and the handler serves it to the end. Only the handler's goroutine may
// call it.
func takeOverStream(ctx context.Context) func() {
	t, _ := ctx.Value(streamTakeoverKey{}).(*streamTakeover)
	if t == nil || t.taken {
		return nil
	}
	t.taken = true
	return t.end
}

// limitBody caps every request body on /query; the websocket transport has
// its own read limit. An SSE body is read here, whole or refused with 413,
// so that the stream opens only for a body within the limit.
func limitBody(n int64, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body == nil || isUpgrade(r) {
			next.ServeHTTP(w, r)
			return
		}
		if r.ContentLength > n {
			writeError(w, r, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE", "the request body is larger than the limit of %d bytes", n)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, n)
		if strings.Contains(r.Header.Get("Accept"), "text/event-stream") {
			body, err := io.ReadAll(r.Body)
			if err != nil {
				writeError(w, r, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE", "the request body is larger than the limit of %d bytes", n)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		next.ServeHTTP(w, r)
	})
}

// maxCachedQueryBytes: longer query texts are parsed every time rather than
// kept, so that padded queries cannot pin gigabytes in a cache keyed by text.
const maxCachedQueryBytes = 32 << 10

// boundedCache is a query cache that ignores long keys.
type boundedCache[T any] struct{ graphql.Cache[T] }

func (c boundedCache[T]) Add(ctx context.Context, key string, value T) {
	if len(key) <= maxCachedQueryBytes {
		c.Cache.Add(ctx, key, value)
	}
}

// Package service wires Rendezvous together (storage, hub, engine, HTTP
// handler) from a Config, and runs it with a graceful shutdown. server.go
// and the end-to-end tests both start the service through here.
package service

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"rendezvous/auth"
	"rendezvous/bus"
	"rendezvous/delivery"
	"rendezvous/engine"
	"rendezvous/graph"
	"rendezvous/graph/scalar"
	"rendezvous/hooks"
	"rendezvous/hub"
	"rendezvous/internal/requestid"
	"rendezvous/metrics"
	"rendezvous/storage"
	"rendezvous/upstash"
)

var _ graph.Recorder = (*metrics.Metrics)(nil)

// Config is everything an operator can set.
type Config struct {
	DatabaseURL string
	// RedisURL, when set, connects the replicas' hubs through Redis pub/sub.
	RedisURL string
	// Bus tunes the Redis bus; Channel comes from RENDEZVOUS_BUS_CHANNEL,
	// and when empty is derived from the database (see deploymentOf).
	Bus bus.Options
	// Addr is where the API listens: host:port, or :port alone (empty:
	// ":8080"). Without a host it listens on loopback when no server token
	// is configured and on every interface otherwise (see bindAddr).
	Addr       string
	Engine     engine.Config
	Playground bool
	// PlaygroundAssets: see graph.HandlerConfig.
	PlaygroundAssets string
	// Auth: server tokens, run token secrets.
	Auth auth.Config
	// HTTP: limits, origins, rate limit, keep-alive (Auth, Playground,
	// Streams and Logger are filled in by New).
	HTTP graph.HandlerConfig
	// ShutdownGrace bounds how long a graceful stop waits for requests.
	ShutdownGrace time.Duration
	// MetricsAddr, when set (":9090"), serves /metrics on a listener of its
	// own; when empty, /metrics is on Addr with the API. Without a host it
	// follows Addr's rule: loopback unless /metrics needs a token.
	MetricsAddr string
	// MetricsTokenRequired: whether /metrics needs a server token. nil: it
	// does on the main port when server tokens are configured, and does
	// not on MetricsAddr (keep that port private). true with no server
	// tokens configured is refused.
	MetricsTokenRequired *bool
	// Outbound: HTTP dispatch (outbound.go).
	Outbound OutboundConfig
	// PublicURL is the base of completion URLs (RENDEZVOUS_PUBLIC_URL);
	// empty: each request's scheme and host (see graph.HandlerConfig).
	PublicURL string
	// HookSecrets sign completion URLs (RENDEZVOUS_HOOK_SECRET; the first
	// signs, all verify). Empty: the run token secrets
	// (RENDEZVOUS_SECRET) when set, else a key made once and kept in the
	// database (see hookSigner).
	HookSecrets []string
	// Metrics, when set, is the service's metrics (tests may share or read
	// it); nil: New makes them.
	Metrics *metrics.Metrics
	// Logger: New wraps its handler so that lines logged with a request's
	// context carry its request_id.
	Logger *slog.Logger
}

// DefaultRateLimit is mutations per second per anonymous caller (by
// address) and per run token when RENDEZVOUS_RATE_LIMIT is unset (burst:
// twice as many).
const DefaultRateLimit = 200

// DefaultServerRateLimit is mutations per second per server token without
// a limit of its own when RENDEZVOUS_SERVER_RATE_LIMIT is unset: none. A
// server token may already do everything, so a limit guards nothing against
// its holder, and any fixed figure is either above what a replica serves
// (so it guards nothing) or throttles a healthy backend on a larger
// machine. Operators who share a deployment between backends set limits
// per token ("<token>;rate=1000;burst=2000").
const DefaultServerRateLimit = 0

// ConfigFromEnv reads the environment; see README.md for the variables.
func ConfigFromEnv(getenv func(string) string) (Config, error) {
	cfg := Config{
		DatabaseURL:   "sqlite://rendezvous.db",
		Addr:          ":" + DefaultPort,
		Playground:    true,
		ShutdownGrace: 10 * time.Second,
	}
	if v := getenv("DATABASE_URL"); v != "" {
		cfg.DatabaseURL = v
	}
	cfg.RedisURL = getenv("REDIS_URL")
	cfg.Bus.Channel = strings.TrimSpace(getenv("RENDEZVOUS_BUS_CHANNEL"))
	var errs []error
	// PORT alone names no host: the host then follows the open-default
	// rule (bindAddr). RENDEZVOUS_LISTEN may name one.
	port := getenv("PORT")
	if port != "" {
		if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			errs = append(errs, fmt.Errorf("PORT %q: not a port number", port))
		}
		cfg.Addr = ":" + port
	}
	if v := getenv("RENDEZVOUS_LISTEN"); v != "" {
		_, lport, err := parseListen("RENDEZVOUS_LISTEN", v)
		switch {
		case err != nil:
			errs = append(errs, err)
		case port != "" && lport != port:
			// Platforms set PORT; a RENDEZVOUS_LISTEN on another port is a
			// mistake one of them would silently lose.
			errs = append(errs, fmt.Errorf("RENDEZVOUS_LISTEN %q and PORT %q name different ports: set one, or both to the same port", v, port))
		}
		cfg.Addr = v
	}
	dur := func(name string, dst *time.Duration) {
		if v := getenv(name); v != "" {
			d, err := scalar.ParseDuration(v)
			if err != nil || d <= 0 {
				errs = append(errs, fmt.Errorf("%s %q: want a positive duration such as 30s, 5m, 2h or 7d", name, v))
				return
			}
			*dst = d
		}
	}
	num := func(name string, dst *int) {
		if v := getenv(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				errs = append(errs, fmt.Errorf("%s %q: want a positive whole number", name, v))
				return
			}
			*dst = n
		}
	}
	dur("RENDEZVOUS_DEFAULT_TIMEOUT", &cfg.Engine.DefaultTimeout)
	dur("RENDEZVOUS_MAX_TIMEOUT", &cfg.Engine.MaxTimeout)
	dur("RENDEZVOUS_LOOKBACK_RETENTION", &cfg.Engine.LookbackRetention)
	dur("RENDEZVOUS_RUN_RETENTION", &cfg.Engine.RunRetention)
	dur("RENDEZVOUS_SWEEP_INTERVAL", &cfg.Engine.SweepInterval)
	dur("RENDEZVOUS_CATCHUP_INTERVAL", &cfg.Engine.CatchUpInterval)
	dur("RENDEZVOUS_LEASE_TTL", &cfg.Engine.LeaseTTL)
	dur("RENDEZVOUS_METRICS_INTERVAL", &cfg.Engine.GaugeInterval)
	num("RENDEZVOUS_MAX_PAYLOAD_BYTES", &cfg.Engine.MaxPayloadBytes)
	num("RENDEZVOUS_MAX_EVENT_ID_BYTES", &cfg.Engine.MaxIDBytes)
	cfg.PlaygroundAssets = getenv("RENDEZVOUS_PLAYGROUND_ASSETS")
	if v := getenv("RENDEZVOUS_MAX_EVENT_ID_BYTES"); v != "" && cfg.Engine.MaxIDBytes > 256 {
		errs = append(errs, fmt.Errorf("RENDEZVOUS_MAX_EVENT_ID_BYTES %q: at most 256", v))
	}
	boolean := func(name string, dst *bool) {
		if v := getenv(name); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s %q: want true or false", name, v))
			}
			*dst = b
		}
	}
	boolean("RENDEZVOUS_PLAYGROUND", &cfg.Playground)
	list := func(v string) []string {
		return strings.FieldsFunc(v, func(r rune) bool { return r == ',' || unicode.IsSpace(r) })
	}

	// Security.
	cfg.Auth.ServerTokens = list(getenv("RENDEZVOUS_TOKENS"))
	if path := getenv("RENDEZVOUS_TOKENS_FILE"); path != "" {
		more, err := auth.ReadTokenFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("RENDEZVOUS_TOKENS_FILE: %w", err))
		}
		cfg.Auth.ServerTokens = append(cfg.Auth.ServerTokens, more...)
	}
	boolean("RENDEZVOUS_REQUIRE_TOKENS", &cfg.Auth.RequireTokens)
	cfg.Auth.Secrets = list(getenv("RENDEZVOUS_SECRET"))
	dur("RENDEZVOUS_RUN_TOKEN_TTL", &cfg.Auth.RunTokenTTL)
	cfg.HTTP.AllowedOrigins = list(getenv("RENDEZVOUS_ALLOWED_ORIGINS"))
	perSecond := func(name string, dst *float64) {
		if v := getenv(name); v != "" {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f < 0 || math.IsInf(f, 0) {
				errs = append(errs, fmt.Errorf("%s %q: want mutations per second, 0 for no limit", name, v))
			}
			*dst = f
		}
	}
	// Anonymous callers and run tokens get a protective default; server
	// tokens none (see DefaultServerRateLimit), unless set.
	cfg.HTTP.RateLimit = DefaultRateLimit
	perSecond("RENDEZVOUS_RATE_LIMIT", &cfg.HTTP.RateLimit)
	num("RENDEZVOUS_RATE_BURST", &cfg.HTTP.RateBurst)
	if cfg.HTTP.RateBurst == 0 {
		cfg.HTTP.RateBurst = int(min(2*cfg.HTTP.RateLimit, math.MaxInt32))
	}
	cfg.HTTP.ServerRateLimit = DefaultServerRateLimit
	perSecond("RENDEZVOUS_SERVER_RATE_LIMIT", &cfg.HTTP.ServerRateLimit)
	cfg.HTTP.ServerRateBurst = int(min(2*cfg.HTTP.ServerRateLimit, math.MaxInt32))
	if v := getenv("RENDEZVOUS_TRUSTED_PROXIES"); v != "" {
		var err error
		if cfg.HTTP.TrustedProxies, err = graph.ParseTrustedProxies(v); err != nil {
			errs = append(errs, fmt.Errorf("RENDEZVOUS_TRUSTED_PROXIES: %w", err))
		}
	}
	var maxBody int
	num("RENDEZVOUS_MAX_BODY_BYTES", &maxBody)
	cfg.HTTP.MaxBodyBytes = int64(maxBody)
	num("RENDEZVOUS_MAX_QUERY_DEPTH", &cfg.HTTP.MaxDepth)
	num("RENDEZVOUS_MAX_ALIASES", &cfg.HTTP.MaxAliases)
	num("RENDEZVOUS_MAX_COMPLEXITY", &cfg.HTTP.MaxComplexity)
	num("RENDEZVOUS_MAX_QUERY_TOKENS", &cfg.HTTP.MaxTokens)
	num("RENDEZVOUS_MAX_SUBSCRIPTIONS_PER_CONNECTION", &cfg.HTTP.MaxSubscriptionsPerConnection)
	dur("RENDEZVOUS_KEEPALIVE", &cfg.HTTP.KeepAlive)
	dur("RENDEZVOUS_INIT_TIMEOUT", &cfg.HTTP.InitTimeout)

	errs = append(errs, outboundFromEnv(getenv, &cfg)...)

	// Completion URLs.
	if v := getenv("RENDEZVOUS_PUBLIC_URL"); v != "" {
		u, err := graph.ParsePublicURL(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("RENDEZVOUS_PUBLIC_URL %q: %w", v, err))
		}
		cfg.PublicURL = u
	}
	cfg.HookSecrets = list(getenv("RENDEZVOUS_HOOK_SECRET"))
	for i, s := range cfg.HookSecrets {
		if len(s) < auth.MinHookSecretLen {
			// Never quote a secret.
			errs = append(errs, fmt.Errorf("RENDEZVOUS_HOOK_SECRET: secret %d is shorter than %d characters", i+1, auth.MinHookSecretLen))
		}
	}

	// Metrics.
	if v := getenv("RENDEZVOUS_METRICS_ADDR"); v != "" {
		if _, _, err := parseListen("RENDEZVOUS_METRICS_ADDR", v); err != nil {
			errs = append(errs, err)
		}
		cfg.MetricsAddr = v
	}
	if v := getenv("RENDEZVOUS_METRICS_TOKEN_REQUIRED"); v != "" {
		var b bool
		boolean("RENDEZVOUS_METRICS_TOKEN_REQUIRED", &b)
		cfg.MetricsTokenRequired = &b
	}
	if err := testClockSkew(getenv, &cfg); err != nil {
		errs = append(errs, err)
	}
	return cfg, errors.Join(errs...)
}

// testClockSkewEnv skews a test build's clock; see testclock.go.
const testClockSkewEnv = "RENDEZVOUS_TEST_CLOCK_SKEW"

// Service is a wired Rendezvous.
type Service struct {
	cfg     Config
	Store   storage.Store
	Engine  *engine.Engine
	Handler http.Handler
	Metrics *metrics.Metrics
	// MetricsHandler serves /metrics on MetricsAddr; nil when /metrics is
	// part of Handler.
	MetricsHandler http.Handler
	bus            *bus.Redis
	deliverer      *delivery.Deliverer
	endStreams     context.CancelFunc
	log            *slog.Logger
	// open: no server tokens. listenAddr and metricsListen are where the
	// API and the metrics listener go, hosts filled in by bindAddr.
	open                bool
	listenAddr          string
	metricsListen       string
	metricsTokenRequire bool

	metricsAddrMu sync.Mutex
	metricsAddr   string
}

// New opens the database (applying migrations) and builds the handler. Start
// the engine's loops with Start; Close releases everything.
func New(ctx context.Context, cfg Config) (*Service, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	log = slog.New(requestid.LogHandler(log.Handler()))
	cfg.Logger = log
	cfg.Engine.Logger = log
	m := cfg.Metrics
	if m == nil {
		m = metrics.New()
	}
	cfg.Engine.Recorder = m
	// The run token secrets the operator set, before a random one may be
	// put in their place: completion URLs fall back to them.
	runSecrets := cfg.Auth.Secrets
	if len(cfg.Auth.Secrets) == 0 {
		// Run tokens still work, on this process until it restarts.
		var b [32]byte
		rand.Read(b[:])
		cfg.Auth.Secrets = []string{hex.EncodeToString(b[:])}
		log.Warn("no RENDEZVOUS_SECRET: run tokens are signed with a random secret and stop working at restart and on other replicas")
	}
	authn, err := auth.New(cfg.Auth)
	if err != nil {
		return nil, err
	}
	if authn.Open() {
		log.Warn("NO TOKENS CONFIGURED: the API is open to anyone who can reach it; set RENDEZVOUS_TOKENS and RENDEZVOUS_REQUIRE_TOKENS=true in production")
	}
	// /metrics wants a server token on the main port when there are tokens;
	// a separate metrics port is expected to be private.
	metricsToken := cfg.metricsNeedToken(authn.Open())
	if cfg.MetricsTokenRequired != nil {
		if metricsToken && authn.Open() {
			return nil, fmt.Errorf("RENDEZVOUS_METRICS_TOKEN_REQUIRED=true but no server token is configured (RENDEZVOUS_TOKENS or RENDEZVOUS_TOKENS_FILE)")
		}
	}
	cfg.Outbound.Delivery.Observer = m
	buildDeliverer, err := prepareOutbound(&cfg, authn)
	if err != nil {
		return nil, err
	}
	store, err := storage.Open(ctx, cfg.DatabaseURL, storage.Options{Logger: log, Observer: m})
	if err != nil {
		return nil, err
	}
	h := hub.New()
	var (
		rb     *bus.Redis
		engBus engine.Bus
	)
	if cfg.RedisURL != "" {
		host, _ := os.Hostname()
		bo := cfg.Bus
		bo.Origin = fmt.Sprintf("%s-%d-%d", host, os.Getpid(), time.Now().UnixNano())
		bo.Logger = log
		if bo.Deployment == "" {
			bo.Deployment = deploymentOf(cfg.DatabaseURL, bo.Origin)
		}
		if rb, err = bus.NewRedis(cfg.RedisURL, h, bo); err != nil {
			store.Close()
			return nil, err
		}
		// Never fails: an unreachable Redis is logged, shown on /readyz
		// and retried, and replicas meanwhile hear of each other's ends
		// through the catch-up poll.
		rb.Start(ctx)
		engBus = rb
		m.ObserveBus(rb)
	}
	eng := engine.New(store, h, engBus, cfg.Engine)
	// Before anything is served: every time stored or compared is on the
	// database's clock (see engine/clock.go).
	if err := eng.SyncClock(ctx); err != nil {
		if rb != nil {
			rb.Stop()
		}
		store.Close()
		return nil, err
	}
	hookSigner, err := hookSigner(ctx, cfg, runSecrets, store, eng.Now(), log)
	if err != nil {
		if rb != nil {
			rb.Stop()
		}
		store.Close()
		return nil, err
	}
	deliverer := buildDeliverer(eng)
	m.ObserveOutboxPending(eng.OutboxPending)
	streams, endStreams := context.WithCancel(context.Background())
	hc := cfg.HTTP
	hc.Auth, hc.Playground, hc.PlaygroundAssets, hc.Streams, hc.Logger, hc.Now = authn, cfg.Playground, cfg.PlaygroundAssets, streams, log, eng.Now
	hc.Recorder = m
	hc.Hooks, hc.PublicURL = hookSigner, cfg.PublicURL
	hc.ReadyDetails = func() map[string]string {
		if rb == nil {
			return map[string]string{"redis": "not configured (replicas hear of each other through the catch-up poll)"}
		}
		return map[string]string{"redis": rb.Health()}
	}
	var metricsHandler http.Handler
	if cfg.MetricsAddr == "" {
		hc.Metrics, hc.MetricsTokenRequired = m.Handler(), metricsToken
	} else {
		h := m.Handler()
		if metricsToken {
			h = graph.RequireServerToken(authn, eng.Now, h)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", h)
		metricsHandler = mux
	}
	// The Upstash REST API, beside /query behind the same checks.
	hc.Siblings = append(hc.Siblings, upstash.Sibling(eng))
	// Completion URLs, beside /query behind the same origin checks and rate limits.
	hc.Siblings = append(hc.Siblings, hooks.Sibling(eng, hookSigner))
	handler := graph.NewHandler(eng, hc)
	api, metricsListen := cfg.listenAddrs(authn.Open())
	return &Service{cfg: cfg, Store: store, Engine: eng, Handler: handler, Metrics: m, MetricsHandler: metricsHandler,
		bus: rb, deliverer: deliverer, endStreams: endStreams, log: log,
		open: authn.Open(), listenAddr: api, metricsListen: metricsListen, metricsTokenRequire: metricsToken}, nil
}

// ListenAddr is where Listen opens the API: Config.Addr, with the host
// filled in when it names none (loopback when no server token is
// configured, every interface otherwise).
func (s *Service) ListenAddr() string { return s.listenAddr }

// Listen opens the API's listener on ListenAddr, for Serve.
func (s *Service) Listen() (net.Listener, error) {
	ln, err := net.Listen("tcp", s.listenAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s (RENDEZVOUS_LISTEN or PORT): %w", s.listenAddr, err)
	}
	return ln, nil
}

// Bus is the Redis bus between replicas, nil without REDIS_URL.
func (s *Service) Bus() *bus.Redis { return s.bus }

// MetricsAddr is the address /metrics is served on when Config.MetricsAddr
// is set, once Serve has opened it; "" before.
func (s *Service) MetricsAddr() string {
	s.metricsAddrMu.Lock()
	defer s.metricsAddrMu.Unlock()
	return s.metricsAddr
}

// Start runs the engine's background loops and the delivery loop.
func (s *Service) Start(ctx context.Context) {
	s.Engine.Start(ctx)
	s.deliverer.Start(ctx)
}

// Close ends open subscriptions (durable waiters stay in the database, the
// others are removed), stops the loops and closes the database.
func (s *Service) Close() error {
	s.endStreams()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Engine.DrainWaits(ctx); err != nil {
		s.log.Warn("subscriptions did not all clean up in time", "err", err)
	}
	s.deliverer.Stop()
	s.Engine.Stop()
	if s.bus != nil {
		s.bus.Stop()
	}
	return s.Store.Close()
}

// Serve serves on ln (see Listen) until ctx is done, then shuts down gracefully:
// stop accepting, end websocket and SSE subscriptions, let plain requests
// finish, close the database.
func (s *Service) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.Handler,
		ReadHeaderTimeout: 10 * time.Second,
		// Websockets and SSE lift these for themselves (graph.endStreamsWith).
		ReadTimeout:  time.Minute,
		WriteTimeout: time.Minute,
		IdleTimeout:  2 * time.Minute,
		ErrorLog:     slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	var (
		msrv  *http.Server
		mdone = make(chan error, 1)
	)
	if s.MetricsHandler != nil {
		mln, err := net.Listen("tcp", s.metricsListen)
		if err != nil {
			s.Close()
			return fmt.Errorf("listen for /metrics on %s (RENDEZVOUS_METRICS_ADDR): %w", s.metricsListen, err)
		}
		msrv = &http.Server{
			Handler:           s.MetricsHandler,
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       time.Minute,
			WriteTimeout:      time.Minute,
			ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		}
		s.metricsAddrMu.Lock()
		s.metricsAddr = mln.Addr().String()
		s.metricsAddrMu.Unlock()
		go func() { mdone <- msrv.Serve(mln) }()
		s.logMetricsListening(mln.Addr(), s.metricsTokenRequire)
	}
	stopMetrics := func(ctx context.Context) {
		if msrv != nil {
			msrv.Shutdown(ctx)
			<-mdone
		}
	}
	s.Start(ctx)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	s.logListening(ln.Addr())

	select {
	case err := <-errc:
		stopMetrics(context.Background())
		s.Close()
		return err
	case <-ctx.Done():
	}
	s.log.Info("shutting down")
	s.endStreams()
	grace := s.cfg.ShutdownGrace
	if grace <= 0 {
		grace = 10 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	err := srv.Shutdown(sctx)
	stopMetrics(sctx)
	if cerr := s.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		s.log.Info("stopped")
	}
	return err
}

// NewLogger returns a JSON logger on stderr, or text when stderr is a terminal.
func NewLogger(level string) *slog.Logger {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(strings.ToUpper(level))); err != nil {
		lv = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: lv}
	if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		return slog.New(slog.NewTextHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, opts))
}

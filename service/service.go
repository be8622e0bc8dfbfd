// Package service wires Rendezvous together (storage, hub, engine, HTTP
// handler) from a Config, and runs it with a graceful shutdown. server.go
// and the end-to-end tests both start the service through here.
package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"rendezvous/bus"
	"rendezvous/engine"
	"rendezvous/graph"
	"rendezvous/graph/scalar"
	"rendezvous/hub"
	"rendezvous/storage"
)

// Config is everything an operator can set.
type Config struct {
	DatabaseURL string
	// RedisURL, when set, connects the replicas' hubs through Redis pub/sub.
	RedisURL   string
	Addr       string
	Engine     engine.Config
	Playground bool
	// PlaygroundAssets: see graph.HandlerConfig.
	PlaygroundAssets string
	// ShutdownGrace bounds how long a graceful stop waits for requests.
	ShutdownGrace time.Duration
	Logger        *slog.Logger
}

// ConfigFromEnv reads the environment; see README.md for the variables.
func ConfigFromEnv(getenv func(string) string) (Config, error) {
	cfg := Config{
		DatabaseURL:   "sqlite://rendezvous.db",
		Addr:          ":8080",
		Playground:    true,
		ShutdownGrace: 10 * time.Second,
	}
	if v := getenv("DATABASE_URL"); v != "" {
		cfg.DatabaseURL = v
	}
	cfg.RedisURL = getenv("REDIS_URL")
	if v := getenv("PORT"); v != "" {
		if _, err := strconv.ParseUint(v, 10, 16); err != nil {
			return cfg, fmt.Errorf("PORT %q: not a port number", v)
		}
		cfg.Addr = ":" + v
	}
	var errs []error
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
	dur("RENDEZVOUS_SWEEP_INTERVAL", &cfg.Engine.SweepInterval)
	dur("RENDEZVOUS_CATCHUP_INTERVAL", &cfg.Engine.CatchUpInterval)
	num("RENDEZVOUS_MAX_PAYLOAD_BYTES", &cfg.Engine.MaxPayloadBytes)
	num("RENDEZVOUS_MAX_EVENT_ID_BYTES", &cfg.Engine.MaxIDBytes)
	cfg.PlaygroundAssets = getenv("RENDEZVOUS_PLAYGROUND_ASSETS")
	if v := getenv("RENDEZVOUS_PLAYGROUND"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("RENDEZVOUS_PLAYGROUND %q: want true or false", v))
		}
		cfg.Playground = b
	}
	if v := getenv("RENDEZVOUS_MAX_EVENT_ID_BYTES"); v != "" && cfg.Engine.MaxIDBytes > 256 {
		errs = append(errs, fmt.Errorf("RENDEZVOUS_MAX_EVENT_ID_BYTES %q: at most 256", v))
	}
	return cfg, errors.Join(errs...)
}

// Service is a wired Rendezvous.
type Service struct {
	cfg        Config
	Store      storage.Store
	Engine     *engine.Engine
	Handler    http.Handler
	bus        *bus.Redis
	endStreams context.CancelFunc
	log        *slog.Logger
}

// New opens the database (applying migrations) and builds the handler. Start
// the engine's loops with Start; Close releases everything.
func New(ctx context.Context, cfg Config) (*Service, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	cfg.Engine.Logger = log
	store, err := storage.Open(ctx, cfg.DatabaseURL, storage.Options{Logger: log})
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
		origin := fmt.Sprintf("%s-%d-%d", host, os.Getpid(), time.Now().UnixNano())
		if rb, err = bus.NewRedis(ctx, cfg.RedisURL, origin, h, log); err != nil {
			store.Close()
			return nil, err
		}
		if err := rb.Start(ctx); err != nil {
			rb.Stop()
			store.Close()
			return nil, err
		}
		engBus = rb
	}
	eng := engine.New(store, h, engBus, cfg.Engine)
	streams, endStreams := context.WithCancel(context.Background())
	handler := graph.NewHandler(eng, graph.HandlerConfig{Playground: cfg.Playground, PlaygroundAssets: cfg.PlaygroundAssets, Streams: streams, Logger: log})
	return &Service{cfg: cfg, Store: store, Engine: eng, Handler: handler, bus: rb, endStreams: endStreams, log: log}, nil
}

// Start runs the engine's background loops.
func (s *Service) Start(ctx context.Context) { s.Engine.Start(ctx) }

// Close ends open subscriptions (durable waiters stay in the database, the
// others are removed), stops the loops and closes the database.
func (s *Service) Close() error {
	s.endStreams()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Engine.DrainWaits(ctx); err != nil {
		s.log.Warn("subscriptions did not all clean up in time", "err", err)
	}
	s.Engine.Stop()
	if s.bus != nil {
		s.bus.Stop()
	}
	return s.Store.Close()
}

// Serve listens on cfg.Addr until ctx is done, then shuts down gracefully:
// stop accepting, end websocket and SSE subscriptions, let plain requests
// finish, close the database.
func (s *Service) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.Handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	s.Start(ctx)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	s.log.Info("rendezvous listening", "addr", ln.Addr().String(), "database", s.Store.Dialect(), "playground", s.cfg.Playground)

	select {
	case err := <-errc:
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

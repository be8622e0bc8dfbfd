package graph

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/99designs/gqlgen/graphql/handler"
	"github.com/99designs/gqlgen/graphql/handler/extension"
	"github.com/99designs/gqlgen/graphql/handler/lru"
	"github.com/99designs/gqlgen/graphql/handler/transport"
	"github.com/99designs/gqlgen/graphql/playground"
	coderws "github.com/coder/websocket"
	"github.com/vektah/gqlparser/v2/ast"

	"rendezvous/engine"
)

// HandlerConfig tunes the HTTP side.
type HandlerConfig struct {
	// MaxBodyBytes caps a POST body; it must leave room for the largest
	// eventData plus the query around it.
	MaxBodyBytes int64
	// KeepAlive is the interval of websocket and SSE keep-alive messages.
	KeepAlive time.Duration
	// Playground serves GraphQL Playground at /.
	Playground bool
	// PlaygroundAssets, when set, is a base URL serving the npm packages
	// graphiql@4.1.2, react@18.2.0 and react-dom@18.2.0 (as <base>/graphiql/…,
	// <base>/react/…, <base>/react-dom/…), for networks that cannot reach
	// the public CDN Playground loads them from by default.
	PlaygroundAssets string
	// Streams, when done, ends every websocket and SSE request (graceful
	// shutdown) while plain requests run to completion.
	Streams context.Context
	Logger  *slog.Logger
}

// NewHandler serves the GraphQL API at /query (POST, GET, websocket with
// graphql-transport-ws and graphql-ws, SSE), Playground at /, and /healthz
// and /readyz.
func NewHandler(eng *engine.Engine, cfg HandlerConfig) http.Handler {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = int64(eng.Config().MaxPayloadBytes)*2 + 64<<10
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = 15 * time.Second
	}
	log := cfg.Logger
	present := errorPresenter(log)

	srv := handler.New(NewExecutableSchema(Config{Resolvers: &Resolver{Engine: eng, Log: log}}))
	srv.AddTransport(transport.Websocket{
		KeepAlivePingInterval: cfg.KeepAlive,
		InitTimeout:           10 * time.Second,
		Implementation: transport.CoderWebsocketImplementation{AcceptOptions: coderws.AcceptOptions{
			// Any origin for now: browsers on other origins are expected
			// clients. An allow-list belongs with authentication.
			OriginPatterns: []string{"*"},
		}},
	})
	srv.AddTransport(transport.Options{})
	// SSE before POST: both take application/json POSTs; SSE only those
	// that accept text/event-stream.
	srv.AddTransport(transport.SSE{KeepAlivePingInterval: cfg.KeepAlive})
	srv.AddTransport(newHTTPTransport(cfg.MaxBodyBytes))
	srv.AddTransport(unsupported{}) // last: takes whatever the others did not
	srv.SetQueryCache(lru.New[*ast.QueryDocument](1000))
	srv.Use(extension.Introspection{})
	srv.SetErrorPresenter(present)
	srv.SetRecoverFunc(recoverFunc(log))
	srv.AroundOperations(withSubscriptionErrorSlot)
	srv.AroundResponses(subscriptionErrorResponses(present))

	mux := http.NewServeMux()
	mux.Handle("/query", endStreamsWith(cfg.Streams, srv))
	if cfg.Playground {
		mux.Handle("GET /{$}", playground.Handler("Rendezvous", "/query", playgroundAssets(cfg.PlaygroundAssets)...))
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeStatus(w, http.StatusOK, map[string]any{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := eng.Ready(ctx); err != nil {
			log.WarnContext(ctx, "not ready", "err", err)
			writeStatus(w, http.StatusServiceUnavailable, map[string]any{"status": "unavailable", "database": "unreachable"})
			return
		}
		writeStatus(w, http.StatusOK, map[string]any{"status": "ready", "database": "ok"})
	})
	return withRequestID(mux)
}

func writeStatus(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(body)
}

// endStreamsWith cancels long-lived requests (websocket upgrades and SSE)
// when streams is done.
func endStreamsWith(streams context.Context, next http.Handler) http.Handler {
	if streams == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "" && !strings.Contains(r.Header.Get("Accept"), "text/event-stream") {
			next.ServeHTTP(w, r)
			return
		}
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		stop := context.AfterFunc(streams, cancel)
		defer stop()
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

// playgroundAssets points Playground at self-hosted copies of its scripts.
// The integrity hashes are those of the published npm files, the same that
// gqlgen pins for the CDN.
func playgroundAssets(base string) []playground.GraphiqlConfigOption {
	if base == "" {
		return nil
	}
	base = strings.TrimRight(base, "/")
	return []playground.GraphiqlConfigOption{
		playground.WithGraphiqlVersion(
			base+"/graphiql/graphiql.min.js", base+"/graphiql/graphiql.min.css",
			"sha256-hnImuor1znlJkD/FOTL3jayfS/xsyNoP04abi8bFJWs=", "sha256-MEh+B2NdMSpj9kexQNN3QKc8UzMrCXW/Sx/phcpuyIU="),
		playground.WithGraphiqlReactVersion(
			base+"/react/umd/react.production.min.js", base+"/react-dom/umd/react-dom.production.min.js",
			"sha256-S0lp+k7zWUMk2ixteM6HZvu8L9Eh//OVrt+ZfbCpmgY=", "sha256-IXWO0ITNDjfnNXIu5POVfqlgYoop36bDzhodR6LW5Pc="),
	}
}

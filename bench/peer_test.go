package main

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"rendezvous/service"
)

// TestPeerDelivery drives the peer's server code and its client code the
// way the peer phase does, in one process and at a small size: every
// publish reaches its one subscription, idle subscriptions hear nothing,
// and the bench-only endpoints answer.
func TestPeerDelivery(t *testing.T) {
	// The centrifuge node's dissolver workers (its own pool, which delays
	// broker unsubscribes by a second) outlive its Shutdown: the library's,
	// not the bench's.
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent(), goleak.IgnoreAnyFunction("github.com/centrifugal/centrifuge/internal/dissolve.(*Dissolver).runWorker"))
	h, shutdown, err := newPeerServer()
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	peer := &peerHandle{addr: ln.Addr().String(), hc: &http.Client{Timeout: time.Minute}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	p := newClientProc()
	for _, c := range []command{
		{Op: "psubscribe", Set: "idle", Endpoint: peer.wsURL(), API: peer.apiURL(), N: 12, PerConn: 1, Prefix: "idle-"},
		{Op: "psubscribe", Set: "dlv", Endpoint: peer.wsURL(), API: peer.apiURL(), N: 40, PerConn: 10, Prefix: "dlv-"},
	} {
		r := p.handle(c)
		require.Empty(t, r.Err)
		require.Zero(t, r.Errors, r.FirstError)
	}
	n, err := peer.subs(ctx)
	require.NoError(t, err)
	require.Equal(t, 52, n)

	g0, err := peer.gc(ctx)
	require.NoError(t, err)
	r := p.handle(command{Op: "deliver", Set: "dlv", Rate: 200})
	require.Empty(t, r.Err)
	require.Equal(t, 40, r.OK, "received")
	require.Zero(t, r.Missing)
	require.Zero(t, r.Errors, r.FirstError)
	require.Positive(t, r.Lat.P50)
	require.LessOrEqual(t, r.Lat.P50, r.Lat.P99)
	idle := p.handle(command{Op: "status", Set: "idle"})
	require.Zero(t, idle.OK, "an idle subscription received a publication")
	require.Zero(t, idle.Errors, idle.FirstError)

	runtime.GC() // the peer shares this process here: a cycle for the window
	g1, err := peer.gc(ctx)
	require.NoError(t, err)
	w := gcBetween(g0, g1)
	require.GreaterOrEqual(t, w.cycles, uint64(1))
	require.Positive(t, w.maxPause)
	require.Contains(t, w.String(), "longest stop")

	m, err := peer.mem(ctx)
	require.NoError(t, err)
	require.Positive(t, m.rss)

	require.Error(t, peerPublish(ctx, p.hc, peer.apiURL(), []byte(`{"data":{}}`)), "a publish without a channel is refused")

	p.closeSet("idle")
	p.closeSet("dlv")
	p.hc.CloseIdleConnections()
	peer.hc.CloseIdleConnections()
	srv.Close()
	require.NoError(t, shutdown())
}

// TestGCBetweenNoCycle: a window without a GC cycle says so.
func TestGCBetweenNoCycle(t *testing.T) {
	g := readGC()
	w := gcBetween(g, g)
	require.Zero(t, w.cycles)
	require.True(t, strings.HasPrefix(w.String(), "no GC cycle"), w.String())
}

// TestRendezvousDelivery drives our server the way the idle phase does,
// on SQLite and at a small size: the client process's code subscribes,
// notifies at a rate, and receives every message once.
func TestRendezvousDelivery(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent(), goleak.IgnoreAnyFunction("github.com/centrifugal/centrifuge/internal/dissolve.(*Dissolver).runWorker"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	path := filepath.Join(t.TempDir(), "bench.db")
	cfg := service.Config{DatabaseURL: "sqlite://" + path, ShutdownGrace: 5 * time.Second}
	cfg.HTTP.RateLimit = 0
	svc, err := service.New(ctx, cfg)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	serveCtx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- svc.Serve(serveCtx, ln) }()
	endpoint := "http://" + ln.Addr().String() + "/query"
	db, err := openSQLite(path)
	require.NoError(t, err)
	p := newClientProc()
	defer func() {
		p.closeSet("idle")
		p.closeSet("dlv")
		p.hc.CloseIdleConnections()
		db.Close()
		stop()
		require.NoError(t, <-served)
	}()
	s := &suite{db: db, client: nil}
	for _, c := range []command{
		{Op: "subscribe", Set: "idle", Endpoint: endpoint, N: 6, PerConn: 1, Prefix: "idle-"},
		{Op: "subscribe", Set: "dlv", Endpoint: endpoint, N: 30, PerConn: 10, Prefix: "dlv-"},
	} {
		r := p.handle(c)
		require.Empty(t, r.Err)
		require.NoError(t, s.waitWaiting(ctx, c.Prefix+"%", c.N, "", 20*time.Second), "registered")
	}
	r := p.handle(command{Op: "deliver", Set: "dlv", Rate: 100})
	require.Empty(t, r.Err)
	require.Equal(t, 30, r.OK, "received: %+v", r)
	require.Zero(t, r.Missing)
	require.Zero(t, r.Errors, r.FirstError)
	require.Positive(t, r.Resp.P50)
	idle := p.handle(command{Op: "status", Set: "idle"})
	require.Zero(t, idle.OK, "an idle subscription received a message")
	require.Zero(t, idle.Errors, idle.FirstError)
}

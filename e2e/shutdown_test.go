package e2e

import (
	"context"
	"log/slog"
	"net"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// sdServer is a service run by Serve on a real listener, as server.go runs it.
type sdServer struct {
	t        *testing.T
	cfg      service.Config
	endpoint string
	cancel   context.CancelFunc
	errc     chan error
	logs     *syncBuffer
}

func sdConfig(db string, logs *syncBuffer) service.Config {
	cfg := service.Config{
		DatabaseURL:   db,
		Playground:    true,
		ShutdownGrace: 5 * time.Second,
		Logger:        slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	cfg.Engine.SweepInterval = 100 * time.Millisecond
	cfg.Engine.CatchUpInterval = 200 * time.Millisecond
	return cfg
}

func sdServe(t *testing.T, db string) *sdServer {
	t.Helper()
	s := &sdServer{t: t, logs: &syncBuffer{}, errc: make(chan error, 1)}
	s.cfg = sdConfig(db, s.logs)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svc, err := service.New(ctx, s.cfg)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s.endpoint = "http://" + ln.Addr().String() + "/query"
	serveCtx, stop := context.WithCancel(context.Background())
	s.cancel = stop
	go func() { s.errc <- svc.Serve(serveCtx, ln) }()
	t.Cleanup(func() {
		stop()
		select {
		case <-s.errc:
		case <-time.After(15 * time.Second):
			t.Error("Serve did not return at cleanup")
		}
		if t.Failed() {
			t.Logf("service log:\n%s", s.logs.String())
		}
	})
	// Up when /healthz answers.
	eventually(t, 10*time.Second, func() bool {
		resp, err := gqlclient.Post(ctxT(t), s.endpoint, `{ __typename }`, nil)
		return err == nil && len(resp.Errors) == 0
	}, "service did not come up")
	return s
}

// shutdown cancels Serve's context and returns what Serve returned.
func (s *sdServer) shutdown(within time.Duration) error {
	s.t.Helper()
	s.cancel()
	select {
	case err := <-s.errc:
		s.errc <- err // for the cleanup
		return err
	case <-time.After(within):
		s.t.Fatalf("Serve did not return within %s of the shutdown", within)
	}
	return nil
}

func sdOK(t *testing.T, endpoint, query string, vars map[string]any, v any) {
	t.Helper()
	r, err := gqlclient.Post(ctxT(t), endpoint, query, vars)
	require.NoError(t, err)
	require.Empty(t, r.Errors, "query %s", query)
	if v != nil {
		require.NoError(t, r.Decode(v))
	}
}

func sdWaiters(t *testing.T, endpoint, eventID string) []waiterView {
	t.Helper()
	var out struct {
		Waiters []waiterView `json:"waiters"`
	}
	sdOK(t, endpoint, waitersQuery, map[string]any{"ev": eventID}, &out)
	return out.Waiters
}

// A graceful shutdown closes the websockets, keeps durable waiters in the
// database and removes ephemeral ones.
func TestGracefulShutdown(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		s := sdServe(t, db)
		var trig struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		sdOK(t, s.endpoint, triggerMutation, map[string]any{"id": uid("sd")}, &trig)
		run := trig.Trigger.WorkflowRunID
		durableEv, ephemeralEv := uid("durable"), uid("ephemeral")

		c, err := gqlclient.Dial(ctxT(t), s.endpoint, gqlclient.TransportWS, nil)
		require.NoError(t, err)
		t.Cleanup(func() { c.CloseNow() })
		durable, err := c.Subscribe(ctxT(t), waitSubscription, waitVars(durableEv, waitOpts{run: run, step: "wait-durable"}))
		require.NoError(t, err)
		ephemeral, err := c.Subscribe(ctxT(t), waitSubscription, waitVars(ephemeralEv, waitOpts{}))
		require.NoError(t, err)
		eventually(t, 10*time.Second, func() bool {
			return len(sdWaiters(t, s.endpoint, durableEv)) == 1 && len(sdWaiters(t, s.endpoint, ephemeralEv)) == 1
		}, "both waiters registered")
		durableID := sdWaiters(t, s.endpoint, durableEv)[0].ID

		start := time.Now()
		require.NoError(t, s.shutdown(10*time.Second), "Serve returns nil after a graceful shutdown")
		require.Less(t, time.Since(start), 5*time.Second, "shutdown took too long")

		// The server closed the websocket.
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("the websocket is still open after the shutdown")
		}
		// Neither subscription got a result: they did not end, the server did.
		for _, sub := range []*gqlclient.Sub{durable, ephemeral} {
			for ev := range sub.C {
				require.Nil(t, ev.Response, "subscription %s got a payload at shutdown: %+v", sub.ID, ev)
			}
		}

		// The database after the shutdown, through a new service on it.
		logs := &syncBuffer{}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		svc, err := service.New(ctx, sdConfig(db, logs))
		require.NoError(t, err)
		svc.Start(context.Background())
		srv := httptest.NewServer(svc.Handler)
		t.Cleanup(func() {
			svc.Close()
			srv.Close()
			if t.Failed() {
				t.Logf("second service log:\n%s", logs.String())
			}
		})
		endpoint := srv.URL + "/query"

		ws := sdWaiters(t, endpoint, durableEv)
		require.Len(t, ws, 1, "the durable waiter survives the shutdown")
		require.Equal(t, durableID, ws[0].ID)
		require.Equal(t, "WAITING", ws[0].State)
		require.Equal(t, "wait-durable", *ws[0].StepName)
		require.Empty(t, sdWaiters(t, endpoint, ephemeralEv), "the ephemeral waiter is gone")
		var out struct {
			WorkflowRun runView `json:"workflowRun"`
		}
		sdOK(t, endpoint, runQuery, map[string]any{"id": run}, &out)
		require.Len(t, out.WorkflowRun.Waiters, 1)
		require.Equal(t, "WAITING", out.WorkflowRun.Waiters[0].State)

		// The durable step goes on: re-attach, notify, receive.
		c2, err := gqlclient.Dial(ctxT(t), endpoint, gqlclient.LegacyWS, nil)
		require.NoError(t, err)
		t.Cleanup(func() { c2.CloseNow() })
		again, err := c2.Subscribe(ctxT(t), waitSubscription, waitVars(durableEv, waitOpts{run: run, step: "wait-durable"}))
		require.NoError(t, err)
		var n struct {
			Notify notifyView `json:"notify"`
		}
		sdOK(t, endpoint, notifyMutation, map[string]any{"ev": durableEv, "data": "after restart", "run": run}, &n)
		require.Len(t, n.Notify.NotifyResponse, 1)
		r := mustResult(t, again)
		require.Equal(t, durableID, r.WaiterID)
		require.Equal(t, `"after restart"`, string(r.EventData))
	})
}

// A graceful shutdown also ends SSE subscriptions: their streams close, the
// ephemeral waiter is removed and Serve returns nil in time.
func TestGracefulShutdownSSE(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		s := sdServe(t, db)
		ev := uid("sse-shutdown")
		done := make(chan error, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		go func() {
			_, err := gqlclient.SSE(ctx, s.endpoint, waitSubscription, waitVars(ev, waitOpts{}))
			done <- err
		}()
		eventually(t, 10*time.Second, func() bool { return len(sdWaiters(t, s.endpoint, ev)) == 1 }, "SSE waiter registered")
		start := time.Now()
		require.NoError(t, s.shutdown(10*time.Second))
		require.Less(t, time.Since(start), 5*time.Second, "shutdown took too long")
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("the SSE stream is still open after the shutdown")
		}

		svc, err := service.New(ctxT(t), sdConfig(db, &syncBuffer{}))
		require.NoError(t, err)
		srv := httptest.NewServer(svc.Handler)
		t.Cleanup(func() { svc.Close(); srv.Close() })
		require.Empty(t, sdWaiters(t, srv.URL+"/query", ev), "the SSE subscription's waiter is gone")
	})
}

// A subscription sent as a plain POST (long-polling the result) must not
// hold up a graceful shutdown past the grace period: Serve returns nil in time.
func TestGracefulShutdownPendingPOSTSubscription(t *testing.T) {
	s := sdServe(t, testdb.SQLite(t))
	ev := uid("post-shutdown")
	done := make(chan struct{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		defer close(done)
		gqlclient.Post(ctx, s.endpoint, waitSubscription, waitVars(ev, waitOpts{}))
	}()
	// Either refused at once, or registered a waiter: both are fine here.
	eventually(t, 10*time.Second, func() bool {
		select {
		case <-done:
			return true
		default:
		}
		return len(sdWaiters(t, s.endpoint, ev)) == 1
	}, "POST subscription neither answered nor registered")
	start := time.Now()
	err := s.shutdown(15 * time.Second)
	require.NoError(t, err, "Serve returned an error after %s", time.Since(start))
	require.Less(t, time.Since(start), 4*time.Second, "a pending POST subscription held the shutdown up")
	cancel()
	<-done
}

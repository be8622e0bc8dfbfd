package bus_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"rendezvous/bus"
	"rendezvous/hub"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, cond func() bool, msg string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", within, msg)
		}
		time.Sleep(5 * time.Millisecond) // polling interval of the condition
	}
}

// A Redis nobody answers on: Start returns at once, the state says down
// and why, and publishing drops quietly (counted), never blocks.
func TestRedisUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close() // a closed port: connection refused

	r, err := bus.NewRedis("redis://"+addr+"/0", hub.New(), bus.Options{Deployment: "d", Origin: "o", Logger: quietLogger(),
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	require.NoError(t, err)
	start := time.Now()
	r.Start(context.Background())
	require.Less(t, time.Since(start), time.Second, "Start must not wait for an unreachable Redis")
	defer r.Stop()
	require.Equal(t, bus.StateDown, r.Status().State)
	require.Contains(t, r.Status().Err, "refused")
	require.Contains(t, r.Health(), "down since")
	require.NoError(t, r.Publish(context.Background(), []string{"wtr_1", "wtr_2"}))
	require.Equal(t, uint64(2), r.Stats().Dropped)
	r.Stop()
	r.Stop() // harmless
}

// A Redis that accepts connections and never answers: Start waits at most
// StartWait, and the health check reports it down.
func TestRedisSilent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // held open, never answered
			mu.Unlock()
		}
	}()
	defer func() {
		ln.Close()
		wg.Wait()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()

	r, err := bus.NewRedis("redis://"+ln.Addr().String()+"/0", hub.New(), bus.Options{Deployment: "d", Origin: "o", Logger: quietLogger(),
		HealthInterval: 100 * time.Millisecond, StartWait: 50 * time.Millisecond, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	require.NoError(t, err)
	start := time.Now()
	r.Start(context.Background())
	defer r.Stop()
	require.Less(t, time.Since(start), time.Second, "Start waits StartWait at most")
	eventually(t, 5*time.Second, func() bool { return r.Status().State == bus.StateDown }, "a silent Redis is down")
	// The handshake's read times out, or the subscription stays unconfirmed.
	require.Regexp(t, "timeout|no answer", r.Status().Err)
	stopping := time.Now()
	r.Stop()
	t.Logf("down after the handshake timed out: %s; Stop took %s", r.Status().Err, time.Since(stopping).Round(time.Millisecond))
}

// The channel: an explicit one is used as given; otherwise it is derived
// from the deployment and the Redis database number.
func TestRedisChannel(t *testing.T) {
	explicit, err := bus.NewRedis("redis://127.0.0.1:1/0", hub.New(), bus.Options{Channel: "mine", Deployment: "d"})
	require.NoError(t, err)
	defer explicit.Stop()
	require.Equal(t, "mine", explicit.Channel())

	derived, err := bus.NewRedis("redis://127.0.0.1:1/3", hub.New(), bus.Options{Deployment: "d"})
	require.NoError(t, err)
	defer derived.Stop()
	require.Equal(t, bus.ChannelFor("d", 3), derived.Channel())
	require.NotEqual(t, bus.ChannelFor("d", 0), bus.ChannelFor("d", 3))
	require.NotEqual(t, bus.ChannelFor("d", 0), bus.ChannelFor("e", 0))

	_, err = bus.NewRedis("http://nope", hub.New(), bus.Options{})
	require.ErrorContains(t, err, "REDIS_URL")
}

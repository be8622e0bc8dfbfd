package bus_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
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

// realRedis is the Redis of RENDEZVOUS_TEST_REDIS (default
// 127.0.0.1:6379): skipped when it does not answer, failed instead under
// RENDEZVOUS_REQUIRE_MYSQL=1 (CI, which runs Redis beside MariaDB).
func realRedis(t *testing.T) string {
	u := os.Getenv("RENDEZVOUS_TEST_REDIS")
	if u == "" {
		u = "redis://127.0.0.1:6379/0"
	}
	opts, err := redis.ParseURL(u)
	require.NoError(t, err)
	c := redis.NewClient(opts)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		if os.Getenv("RENDEZVOUS_REQUIRE_MYSQL") == "1" {
			t.Fatalf("Redis not reachable at %s: %v", u, err)
		}
		t.Skipf("Redis not reachable at %s (%v): skipped", u, err)
	}
	return u
}

// Waiter ends queued while a PUBLISH is on its way go out together in the
// next one: a burst of single-waiter ends reaches the other replica whole,
// in fewer PUBLISH commands than ends, and every waiter is woken.
func TestRedisBatchesABurst(t *testing.T) {
	u := realRedis(t)
	channel := fmt.Sprintf("rendezvous-test-batch-%d", time.Now().UnixNano())
	hb := hub.New()
	a, err := bus.NewRedis(u, hub.New(), bus.Options{Channel: channel, Origin: "a", Logger: quietLogger()})
	require.NoError(t, err)
	b, err := bus.NewRedis(u, hb, bus.Options{Channel: channel, Origin: "b", Logger: quietLogger()})
	require.NoError(t, err)
	a.Start(context.Background())
	defer a.Stop()
	b.Start(context.Background())
	defer b.Stop()
	require.Equal(t, bus.StateUp, a.Status().State)
	require.Equal(t, bus.StateUp, b.Status().State)

	const n = 2000
	var woken atomic.Int64
	for i := range n {
		l := hb.Listen(fmt.Sprintf("wtr_%d", i), func(hub.Wake) { woken.Add(1) })
		defer hb.Unlisten(l)
	}
	for i := range n {
		require.NoError(t, a.Publish(context.Background(), []string{fmt.Sprintf("wtr_%d", i)}))
	}
	eventually(t, 10*time.Second, func() bool { return woken.Load() == n }, "every waiter woken on the other replica")
	st := a.Stats()
	require.Equal(t, uint64(n), st.Published)
	require.Equal(t, uint64(n), b.Stats().Received)
	require.Less(t, st.Batches, uint64(n), "a burst goes out in fewer PUBLISH commands than waiter ends")
	t.Logf("%d waiter ends in %d PUBLISH commands", n, st.Batches)
}

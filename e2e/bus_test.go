package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"rendezvous/bus"
	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// redisProc is a redis-server child process of the test, on a port of its
// own, so the test may kill it and start it again.
type redisProc struct {
	t    *testing.T
	port int
	cmd  *exec.Cmd
	done chan struct{}
}

// freePort returns a port nothing listens on (at the time of asking).
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// start runs redis-server on the port and waits until it answers PING.
func (r *redisProc) start() {
	r.t.Helper()
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", r.t.TempDir(), "--loglevel", "warning")
	require.NoError(r.t, cmd.Start())
	r.cmd, r.done = cmd, make(chan struct{})
	done := r.done
	go func() {
		cmd.Wait()
		close(done)
	}()
	c := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", r.port), MaxRetries: -1})
	defer c.Close()
	eventually(r.t, 10*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		return c.Ping(ctx).Err() == nil
	}, "redis-server on port %d answers", r.port)
}

// kill SIGKILLs the process it started and waits for it; harmless when
// nothing runs.
func (r *redisProc) kill() {
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

// signal sends sig to the process it started (SIGSTOP freezes it: its
// connections stay open and silent).
func (r *redisProc) signal(sig os.Signal) {
	r.t.Helper()
	require.NotNil(r.t, r.cmd)
	require.NoError(r.t, r.cmd.Process.Signal(sig))
}

// readyz returns /readyz's status and its "redis" line.
func (e *env) readyz() (int, string) {
	e.t.Helper()
	resp, body := httpGet(e.t, e.srv.URL+"/readyz")
	var ready map[string]any
	require.NoError(e.t, json.Unmarshal([]byte(body), &ready), body)
	line, _ := ready["redis"].(string)
	return resp.StatusCode, line
}

// awaitRedis waits until /readyz says the state (its "redis" line starts
// with it), and checks it stays 200 all along.
func (e *env) awaitRedis(state bus.State) {
	e.t.Helper()
	eventually(e.t, 20*time.Second, func() bool {
		status, line := e.readyz()
		require.Equal(e.t, http.StatusOK, status, "/readyz stays 200 whatever Redis does: %s", line)
		return strings.HasPrefix(line, string(state))
	}, "/readyz: redis %s", state)
}

// received is how many waiter ends the replica heard of through Redis.
func (e *env) received() uint64 { return e.svc.Bus().Stats().Received }

// deliverAcross subscribes on to, notifies on from, and checks the
// subscriber's result. viaBus: to then hears of the end through Redis (its
// counter moves); otherwise it must not (Redis is down: the catch-up poll
// delivered it).
func deliverAcross(t *testing.T, from, to *env, viaBus bool) {
	t.Helper()
	ev := uid("bus")
	before := to.received()
	s := to.subscribe(to.dial(gqlclient.TransportWS), ev, waitOpts{})
	from.awaitWaiting(ev, 1)
	n := from.notify(ev, "across", "")
	require.Len(t, n.NotifyResponse, 1)
	r := mustResult(t, s)
	require.Equal(t, `"across"`, string(r.EventData))
	if viaBus {
		eventually(t, 10*time.Second, func() bool { return to.received() > before }, "the wake-up came through Redis")
	} else {
		require.Equal(t, before, to.received(), "Redis is down: the catch-up poll delivered it")
	}
}

// Redis is optional and never holds data: unreachable at start-up, the
// replicas start, say so on /readyz (still 200) and deliver across through
// the catch-up poll; when Redis appears they subscribe by themselves and
// wake-ups go through it again; when it dies mid-run and comes back, the
// same.
func TestBusRedisOutages(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server is not installed: this test starts and kills its own Redis")
	}
	t.Parallel()
	db := testdb.MySQL(t)
	rp := &redisProc{t: t, port: freePort(t)}
	t.Cleanup(rp.kill)
	mod := func(c *service.Config) {
		c.RedisURL = fmt.Sprintf("redis://127.0.0.1:%d/0", rp.port) // nothing listens there yet
		c.Bus.MinBackoff, c.Bus.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
		c.Bus.HealthInterval = 250 * time.Millisecond
	}
	a, b := newEnv(t, db, mod), newEnv(t, db, mod)

	// Unreachable at start: up, ready, and saying so.
	for _, e := range []*env{a, b} {
		status, line := e.readyz()
		require.Equal(t, http.StatusOK, status)
		require.True(t, strings.HasPrefix(line, "down"), "/readyz says Redis is down: %q", line)
		require.Contains(t, line, "catch-up poll")
		require.Contains(t, e.logs.String(), "Redis unreachable")
		require.Zero(t, e.scrape(nil).value("rendezvous_bus_up"))
	}
	deliverAcross(t, a, b, false)

	// Redis appears: both subscribe by themselves.
	rp.start()
	a.awaitRedis(bus.StateUp)
	b.awaitRedis(bus.StateUp)
	deliverAcross(t, a, b, true)
	deliverAcross(t, b, a, true)
	m := b.scrape(nil)
	require.Equal(t, 1.0, m.value("rendezvous_bus_up"))
	require.Equal(t, float64(b.received()), m.value("rendezvous_bus_wakeups_total", "direction", "received"))

	// Redis dies mid-run: catch-up again, and /readyz says so.
	rp.kill()
	a.awaitRedis(bus.StateDown)
	b.awaitRedis(bus.StateDown)
	deliverAcross(t, a, b, false)

	// And comes back.
	rp.start()
	a.awaitRedis(bus.StateUp)
	b.awaitRedis(bus.StateUp)
	deliverAcross(t, a, b, true)
	require.Contains(t, b.logs.String(), "Redis reachable again")

	// Redis freezes: connections stay open but nothing answers, not even
	// a ping. The health check notices; thawed, it is used again.
	rp.signal(syscall.SIGSTOP)
	a.awaitRedis(bus.StateDown)
	b.awaitRedis(bus.StateDown)
	deliverAcross(t, a, b, false)
	rp.signal(syscall.SIGCONT)
	a.awaitRedis(bus.StateUp)
	b.awaitRedis(bus.StateUp)
	deliverAcross(t, a, b, true)
	t.Logf("b heard of %d waiter ends through Redis; a dropped %d while Redis was down", b.received(), a.svc.Bus().Stats().Dropped)
}

// Deployments on different databases that share one Redis do not hear each
// other's wake-ups; replicas of one deployment do. Redis delivers the
// messages of one connection in order, so once a replica has heard a wake-up
// published after another deployment's, it would have heard that one too
// had they shared a channel: the exact counts show it.
func TestBusDeploymentsApart(t *testing.T) {
	t.Parallel()
	u := redisURL(t)
	dbA, dbB := testdb.MySQL(t), testdb.MySQL(t)
	mod := func(c *service.Config) {
		c.RedisURL = u
		c.Engine.CatchUpInterval = time.Hour // only Redis can deliver across replicas
	}
	a1, a2 := newEnv(t, dbA, mod), newEnv(t, dbA, mod)
	b1, b2 := newEnv(t, dbB, mod), newEnv(t, dbB, mod)

	deliverAcross(t, a1, a2, true) // A's wake-up, published on A's channel
	deliverAcross(t, b1, b2, true) // then B's
	deliverAcross(t, a1, a2, true) // then A's again
	require.Equal(t, uint64(1), b2.received(), "B's replica heard B's wake-up only, not A's before it")
	require.Equal(t, uint64(2), a2.received(), "A's replica heard A's two wake-ups only, not B's between them")
	require.Equal(t, a1.svc.Bus().Channel(), a2.svc.Bus().Channel(), "replicas of one deployment agree")
	require.NotEqual(t, a1.svc.Bus().Channel(), b1.svc.Bus().Channel(), "deployments on two databases differ")
}

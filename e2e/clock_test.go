package e2e

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// clockSkew is how far the skewed replicas' clocks are off, each way.
const clockSkew = 60 * time.Second

// skewedReplicas starts two replicas on one MariaDB database, one whose
// clock is clockSkew ahead and one clockSkew behind. Every time one replica
// writes and another compares (leases, deadlines) must come from the
// database's clock, or the two disagree by two minutes.
func skewedReplicas(t *testing.T, mods ...func(*service.Config)) (ahead, behind *env) {
	t.Helper()
	db := testdb.MySQL(t)
	skew := func(d time.Duration) func(*service.Config) {
		return func(c *service.Config) { c.Engine.ClockSkew = d }
	}
	ahead = newEnv(t, db, append([]func(*service.Config){skew(clockSkew)}, mods...)...)
	behind = newEnv(t, db, append([]func(*service.Config){skew(-clockSkew)}, mods...)...)
	return ahead, behind
}

// Rule 5 across replicas whose clocks disagree by two minutes: a waiter
// registered on one replica counts for a targeted notify on the other (it
// is resolved, never skipped for a lease that only looks expired), and the
// race of the two ends with the event delivered exactly once.
func TestClockSkewRule5(t *testing.T) {
	t.Parallel()
	u := redisURL(t)
	ahead, behind := skewedReplicas(t, func(c *service.Config) { c.RedisURL = u })
	pairs := []struct {
		name           string
		waiter, sender *env
	}{{"wait-behind-notify-ahead", behind, ahead}, {"wait-ahead-notify-behind", ahead, behind}}

	for _, p := range pairs {
		// A waiter that is plainly waiting: the notify must resolve it.
		run, ev := p.waiter.trigger(), uid("skew")
		sub := p.waiter.subscribe(p.waiter.dial(gqlclient.TransportWS), ev, waitOpts{run: run})
		p.waiter.awaitWaiting(ev, 1)
		ws := p.sender.waiters(ev)
		require.Len(t, ws, 1, "%s: the other replica must see the waiter as waiting", p.name)
		n := p.sender.notify(ev, "settled", run)
		require.Len(t, n.NotifyResponse, 1, "%s: the notify skipped a live waiter (lookback stored: %v)", p.name, n.Lookback != nil)
		require.Nil(t, n.Lookback)
		r := mustResult(t, sub)
		require.Equal(t, n.NotifyResponse[0].MessageID, *r.MessageID)
	}

	const races = 40
	for _, p := range pairs {
		conn := p.waiter.dial(gqlclient.TransportWS)
		var (
			wg                 sync.WaitGroup
			mu                 sync.Mutex
			resolved, lookback int
		)
		sem := make(chan struct{}, 8)
		for i := range races {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				run, ev := p.waiter.trigger(), uid("skew-race")
				data := fmt.Sprintf("%s-%d", p.name, i)
				var (
					sub    *gqlclient.Sub
					subErr error
					n      notifyView
				)
				together(
					func() {
						sub, subErr = conn.Subscribe(ctxT(t), waitSubscription, waitVars(ev, waitOpts{run: run}))
					},
					func() {
						n = p.sender.notify(ev, data, run)
					},
				)
				require.NoError(t, subErr)
				o := result(t, sub, 10*time.Second)
				if !assert.NotNil(t, o.Result, "%s race %d: the subscriber got %+v (notify resolved %d, lookback %v)", p.name, i, o.Errors, len(n.NotifyResponse), n.Lookback != nil) {
					return
				}
				assert.Equal(t, fmt.Sprintf("%q", data), string(o.Result.EventData))
				mu.Lock()
				defer mu.Unlock()
				switch {
				case len(n.NotifyResponse) == 1 && n.Lookback == nil:
					assert.Equal(t, n.NotifyResponse[0].MessageID, *o.Result.MessageID)
					resolved++
				case len(n.NotifyResponse) == 0 && n.Lookback != nil:
					assert.Equal(t, n.Lookback.MessageID, *o.Result.MessageID)
					lookback++
				default:
					t.Errorf("%s race %d: notify resolved %d waiters and stored lookback %v", p.name, i, len(n.NotifyResponse), n.Lookback != nil)
				}
				assert.Empty(t, p.sender.run(run).LookbackEvents, "%s race %d: a lookback event is left over", p.name, i)
			}()
		}
		wg.Wait()
		t.Logf("%s: %d races, %d resolved a waiter, %d went through lookback", p.name, races, resolved, lookback)
		require.Equal(t, races, resolved+lookback)
	}
}

// Timeouts across replicas whose clocks disagree by two minutes: a 2 s
// timeout fires at about 2 s whichever replica registered the waiter and
// whichever watches or sweeps it. A replica ahead must not time out the
// waiters of one behind early, one behind must not keep them late.
func TestClockSkewTimeouts(t *testing.T) {
	t.Parallel()
	const timeout = 2 * time.Second
	inTime := func(t *testing.T, what string, since time.Time, o outcome) {
		t.Helper()
		require.Empty(t, o.Errors, what)
		require.NotNil(t, o.Result, what)
		require.True(t, o.Result.Timeout, what)
		took := time.Since(since)
		require.GreaterOrEqual(t, took, timeout-50*time.Millisecond, "%s: timed out early", what)
		require.Less(t, took, timeout+2*time.Second, "%s: timed out late", what)
	}

	t.Run("ephemeral", func(t *testing.T) {
		t.Parallel()
		ahead, behind := skewedReplicas(t)
		for _, p := range []struct {
			name        string
			owner, peer *env
		}{{"registered-behind", behind, ahead}, {"registered-ahead", ahead, behind}} {
			run, ev := p.owner.trigger(), uid("skew-timeout")
			start := time.Now()
			sub := p.owner.subscribe(p.owner.dial(gqlclient.TransportWS), ev, waitOpts{run: run, timeout: "2s"})
			ws := p.owner.awaitWaiting(ev, 1)
			dl := parseTime(t, ws[0].Deadline)
			require.WithinDuration(t, start.Add(timeout), dl, time.Second, "%s: the deadline is not on the database's clock", p.name)
			// The peer sweeps every 100 ms: it must neither end the waiter
			// early nor take it for an orphan.
			inTime(t, p.name, start, result(t, sub, timeout+10*time.Second))
			require.Empty(t, p.peer.waiters(ev))
		}
	})

	// A durable step registered on one replica and watched on the other,
	// the registering replica gone: only the watching one times it out.
	t.Run("durable", func(t *testing.T) {
		t.Parallel()
		for _, dir := range []string{"registered-ahead", "registered-behind"} {
			ahead, behind := skewedReplicas(t)
			reg, watch := ahead, behind
			if dir == "registered-behind" {
				reg, watch = behind, ahead
			}
			run, ev := reg.trigger(), uid("skew-durable")
			c := reg.dial(gqlclient.TransportWS)
			start := time.Now()
			first := reg.subscribe(c, ev, waitOpts{run: run, step: "s", timeout: "2s"})
			reg.awaitWaiting(ev, 1)
			require.NoError(t, first.Stop(ctxT(t)))
			reg.stop()
			sub := watch.subscribe(watch.dial(gqlclient.TransportWS), ev, waitOpts{run: run, step: "s", timeout: "2s"})
			inTime(t, dir, start, result(t, sub, timeout+10*time.Second))
		}
	})
}

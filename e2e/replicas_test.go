package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/service"
	"rendezvous/storage"
)

// redisURL returns the Redis the replica tests use, or skips (fails under
// RENDEZVOUS_REQUIRE_MYSQL=1, i.e. in CI, where .ci/run starts Redis).
func redisURL(t *testing.T) string {
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
		if os.Getenv(testdb.EnvRequireMySQL) == "1" {
			t.Fatalf("Redis not reachable at %s: %v", u, err)
		}
		t.Skipf("Redis not reachable at %s (%v): skipped", u, err)
	}
	return u
}

// Two replicas on one MySQL database: a subscriber on one receives a notify
// sent to the other, through Redis in milliseconds, and without Redis
// through the catch-up poll.
func TestReplicasDeliverAcross(t *testing.T) {
	for _, withRedis := range []bool{true, false} {
		t.Run(fmt.Sprintf("redis=%v", withRedis), func(t *testing.T) {
			t.Parallel()
			db := testdb.MySQL(t)
			mod := func(c *service.Config) {}
			if withRedis {
				u := redisURL(t)
				mod = func(c *service.Config) {
					c.RedisURL = u
					c.Engine.CatchUpInterval = time.Hour // prove Redis did it
				}
			}
			a, b := newEnv(t, db, mod), newEnv(t, db, mod)
			ev := uid("ev")
			run := a.trigger()
			c := a.dial(gqlclient.TransportWS)
			broadcast := a.subscribe(c, ev, waitOpts{})
			targeted := a.subscribe(c, ev, waitOpts{run: run, step: "s"})
			b.awaitWaiting(ev, 2)

			n := b.notify(ev, "from b", "")
			require.Len(t, n.NotifyResponse, 2)
			for _, s := range []*gqlclient.Sub{broadcast, targeted} {
				r := mustResult(t, s)
				require.Equal(t, `"from b"`, string(r.EventData))
				require.Equal(t, n.NotifyResponse[0].MessageID, *r.MessageID)
			}
		})
	}
}

// Rule 5 across replicas: the wait registers on one replica while the
// targeted notify commits on the other.
func TestReplicasTargetedRace(t *testing.T) {
	t.Parallel()
	db := testdb.MySQL(t)
	u := redisURL(t)
	mod := func(c *service.Config) { c.RedisURL = u }
	a, b := newEnv(t, db, mod), newEnv(t, db, mod)
	conns := []*gqlclient.Conn{a.dial(gqlclient.TransportWS), a.dial(gqlclient.LegacyWS)}

	const races = 100
	var (
		wg                 sync.WaitGroup
		mu                 sync.Mutex
		resolved, lookback int
	)
	sem := make(chan struct{}, 16)
	for i := range races {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ev := uid("race")
			run := a.trigger()
			data := fmt.Sprintf("race-%d", i)
			var sub *gqlclient.Sub
			var subErr error
			var n notifyView
			together(
				func() {
					sub, subErr = conns[i%2].Subscribe(context.Background(), waitSubscription, waitVars(ev, waitOpts{run: run}))
				},
				func() {
					n = b.notify(ev, data, run)
				},
			)
			require.NoError(t, subErr)
			r := mustResult(t, sub)
			require.Equal(t, fmt.Sprintf("%q", data), string(r.EventData))
			switch {
			case len(n.NotifyResponse) == 1 && n.Lookback == nil:
				require.Equal(t, n.NotifyResponse[0].MessageID, *r.MessageID)
				mu.Lock()
				resolved++
				mu.Unlock()
			case len(n.NotifyResponse) == 0 && n.Lookback != nil:
				require.Equal(t, n.Lookback.MessageID, *r.MessageID)
				mu.Lock()
				lookback++
				mu.Unlock()
			default:
				t.Errorf("race %d: notify resolved %d waiters and stored lookback %v", i, len(n.NotifyResponse), n.Lookback != nil)
			}
			require.Empty(t, b.run(run).LookbackEvents)
		}()
	}
	wg.Wait()
	t.Logf("%d races across replicas: %d resolved a waiter, %d went through lookback", races, resolved, lookback)
	require.Equal(t, races, resolved+lookback)
}

// A waiter without a step whose replica died (no cleanup, lease run out)
// must not swallow a targeted notify: the notify stores a lookback instead,
// the run's next wait gets it, and the orphan is reaped.
func TestOrphanedWaiterOfDeadReplica(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db, func(c *service.Config) { c.Engine.LeaseTTL = 2 * time.Second })
		ctx := ctxT(t)
		run, ev := e.trigger(), uid("ev")
		now := e.clock.Now()
		// What a replica killed mid-wait leaves behind: its waiter, and a
		// lease that has run out.
		require.NoError(t, e.svc.Store.ReplicaRenew(ctx, "rep_dead", now.Add(-time.Second)))
		orphan := &models.Waiter{EventID: ev, WorkflowRunID: &run, State: models.WaiterWaiting,
			Deadline: now.Add(time.Hour), CreatedAt: now, Owner: "rep_dead"}
		require.NoError(t, e.svc.Store.WaiterInsert(ctx, orphan))
		require.Empty(t, e.waiters(ev), "a dead replica's waiter is not waiting")

		n := e.notify(ev, "for the next wait", run)
		require.Empty(t, n.NotifyResponse, "the orphan must not swallow the notification")
		require.NotNil(t, n.Lookback)

		r := mustResult(t, e.subscribe(e.dial(gqlclient.TransportWS), ev, waitOpts{run: run}))
		require.Equal(t, `"for the next wait"`, string(r.EventData))
		require.Equal(t, n.Lookback.MessageID, *r.MessageID)

		eventually(t, 10*time.Second, func() bool {
			_, err := e.svc.Store.WaiterGet(ctx, orphan.ID)
			return errors.Is(err, storage.ErrNotFound)
		}, "the orphan is reaped")

		// A live replica's own waiters keep counting while it renews.
		live := e.subscribe(e.dial(gqlclient.TransportWS), ev, waitOpts{run: run})
		e.awaitWaiting(ev, 1)
		e.clock.Advance(5 * time.Second) // past the TTL: only renewals keep it alive
		eventually(t, 10*time.Second, func() bool { return len(e.waiters(ev)) == 1 }, "lease renewed")
		n2 := e.notify(ev, "live", run)
		require.Len(t, n2.NotifyResponse, 1)
		require.Equal(t, `"live"`, string(mustResult(t, live).EventData))
	})
}

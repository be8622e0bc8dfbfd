package e2e

// Figures for Rendezvous on Galera (issue 11's benchmark), printed by an
// opt-in test rather than by go run ./bench: RENDEZVOUS_GALERA_BENCH=1
// scripts/test -run TestGaleraBench -v ./e2e/. Each figure is printed beside
// its baseline measured in the same run: delivery across replicas beside
// delivery on the notifying replica; throughput on the three nodes beside one
// replica on the machine's plain MariaDB.

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/internal/testgalera"
)

func galeraPercentiles(d []time.Duration) string {
	if len(d) == 0 {
		return "none"
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	p := func(q float64) time.Duration { return d[min(len(d)-1, int(q*float64(len(d))))] }
	return fmt.Sprintf("p50 %s p99 %s (n=%d)", p(0.50).Round(10*time.Microsecond), p(0.99).Round(10*time.Microsecond), len(d))
}

func TestGaleraBench(t *testing.T) {
	if os.Getenv("RENDEZVOUS_GALERA_BENCH") != "1" {
		t.Skip("set RENDEZVOUS_GALERA_BENCH=1 for the Galera figures")
	}
	testgalera.Require(t)
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))

	delivery := func(name string, g *galeraReplicas) {
		// 500 notifies/s for 5 s, each to a waiter registered beforehand on a
		// random replica, sent through a random replica; latency from the
		// notify's send to the subscriber's result, split by same/other replica.
		const rate, secs = 500, 5
		n := rate * secs
		type one struct {
			ev   string
			at   int // replica of the waiter
			sub  *gqlclient.Sub
			sent time.Time
			got  chan time.Time
		}
		all := make([]*one, n)
		for k := range all {
			o := &one{ev: uid("galera-bench"), at: rng.Intn(3), got: make(chan time.Time, 1)}
			s, err := g.conn(rng, o.at).Subscribe(ctxT(t), waitSubscription, waitVars(o.ev, waitOpts{timeout: "1h"}))
			require.NoError(t, err)
			o.sub = s
			all[k] = o
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				if _, err := o.sub.Next(ctx); err == nil {
					o.got <- time.Now()
				}
			}()
		}
		for _, o := range all {
			eventually(t, 60*time.Second, func() bool { return len(sdWaiters(t, g.ep(o.at), o.ev)) == 1 }, "waiter on %s registered", o.ev)
		}
		var (
			wg         sync.WaitGroup
			same, diff []time.Duration
			calls      []time.Duration // the notify's own response time
			mu         sync.Mutex
		)
		tick := time.NewTicker(time.Second / rate)
		defer tick.Stop()
		for _, o := range all {
			<-tick.C
			from := rng.Intn(3)
			wg.Add(1)
			go func() {
				defer wg.Done()
				o.sent = time.Now()
				if _, err := galeraPost(g.ep(from), notifyMutation, map[string]any{"ev": o.ev, "data": 1}, nil); err != nil {
					t.Errorf("notify: %v", err)
					return
				}
				answered := time.Since(o.sent)
				mu.Lock()
				calls = append(calls, answered)
				mu.Unlock()
				select {
				case at := <-o.got:
					mu.Lock()
					if from == o.at {
						same = append(same, at.Sub(o.sent))
					} else {
						diff = append(diff, at.Sub(o.sent))
					}
					mu.Unlock()
				case <-time.After(30 * time.Second):
					t.Errorf("no delivery within 30s")
				}
			}()
		}
		wg.Wait()
		t.Logf("delivery %s at %d notifies/s: to another replica %s; baseline, on the notifying replica %s; the notify call itself %s", name, rate, galeraPercentiles(diff), galeraPercentiles(same), galeraPercentiles(calls))
	}
	throughput := func(eps []string) float64 {
		// 16 clients, targeted notifies to runs nobody waits on (each stores
		// a lookback event), for 5 s.
		const clients, d = 16, 5 * time.Second
		runs := make([]string, 64)
		for k := range runs {
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			sdOK(t, eps[k%len(eps)], triggerMutation, map[string]any{"id": uid("galera-tp")}, &out)
			runs[k] = out.Trigger.WorkflowRunID
		}
		var done atomic.Int64
		stop := time.Now().Add(d)
		var wg sync.WaitGroup
		for c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewSource(int64(c)))
				for time.Now().Before(stop) {
					if _, err := galeraPost(eps[r.Intn(len(eps))], notifyMutation, map[string]any{"ev": "tp", "run": runs[r.Intn(len(runs))], "data": 1}, nil); err != nil {
						t.Errorf("notify: %v", err)
						return
					}
					done.Add(1)
				}
			}()
		}
		wg.Wait()
		return float64(done.Load()) / d.Seconds()
	}

	g := newGaleraReplicas(t, redisURL(t))
	delivery("with Redis", g)
	three := throughput([]string{g.ep(0), g.ep(1), g.ep(2)})
	noRedis := newGaleraReplicas(t, "")
	delivery("catch-up only (RENDEZVOUS_CATCHUP_INTERVAL 2s)", noRedis)

	single := newCrashServer(t, crashBuild(t), testdb.MySQL(t), "LOG_LEVEL=warn")
	single.start()
	one := throughput([]string{single.endpoint()})
	t.Logf("targeted notify throughput, 16 clients: three replicas on three Galera nodes %.0f/s; baseline, one replica on one MariaDB %.0f/s (ratio %.2f)", three, one, three/one)
}

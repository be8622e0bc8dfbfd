package e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/bus"
	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// Two replicas on one database with Redis between them: a worker on A gets
// a run triggered on B in milliseconds (the bus, not the poll), and
// workers on both replicas competing for many runs ack each exactly once.
func TestRunsToStartAcrossReplicas(t *testing.T) {
	db := testdb.MySQL(t)
	u := redisURL(t)
	mod := func(c *service.Config) { c.RedisURL = u }
	a, b := newEnv(t, db, mod), newEnv(t, db, mod)
	eventually(t, 10*time.Second, func() bool {
		return a.svc.Bus().Status().State == bus.StateUp && b.svc.Bus().Status().State == bus.StateUp
	}, "both buses up")

	// Latency: one worker on A, runs triggered on B one at a time.
	label := uid("xrep")
	c := a.dial(gqlclient.TransportWS)
	sub, err := c.Subscribe(ctxT(t), runsToStartSub, map[string]any{"label": label, "lease": "30s", "max": 1})
	require.NoError(t, err)
	var lat []time.Duration
	for range 10 {
		start := time.Now()
		var out struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		b.ok(triggerMutation, map[string]any{"id": uid("x"), "label": label}, &out)
		ev, err := sub.Next(ctxT(t))
		require.NoError(t, err)
		lat = append(lat, time.Since(start))
		require.Contains(t, string(ev.Response.Data), out.Trigger.WorkflowRunID)
		b.ok(ackMutation, map[string]any{"id": out.Trigger.WorkflowRunID, "attempt": 1}, nil)
	}
	worst := lat[0]
	for _, l := range lat {
		worst = max(worst, l)
	}
	t.Logf("trigger on B -> worker on A: %v", lat)
	// The poll alone takes 0.5-1s; the bus brings it in milliseconds.
	require.Less(t, worst, 400*time.Millisecond, "a worker on A hears of runs triggered on B through the bus")

	// Competing across replicas.
	label2 := uid("xcomp")
	log := newWorkerLog()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i, e := range []*env{a, b, a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runWorker(ctx, t, e, fmt.Sprint("r", i), []string{gqlclient.TransportWS, gqlclient.LegacyWS}[i%2], label2, 1, 2*time.Second, log, true)
		}()
	}
	const n = 150
	for i := range n {
		e := []*env{a, b}[i%2]
		e.ok(triggerMutation, map[string]any{"id": uid("xc"), "label": label2}, nil)
	}
	eventually(t, 60*time.Second, func() bool { return log.acked() == n }, "all runs acked")
	cancel()
	wg.Wait()
	log.mu.Lock()
	defer log.mu.Unlock()
	for run, k := range log.acks {
		require.Equal(t, 1, k, run)
	}
	require.Len(t, log.acks, n)
}

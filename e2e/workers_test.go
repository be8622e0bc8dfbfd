package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
)

const runsToStartSub = `subscription($label: String, $lease: Duration, $max: Int) {
  runsToStart(label: $label, lease: $lease, maxUnacked: $max) { workflowRunId label attempts claimedAt }
}`

const ackMutation = `mutation($id: ID!, $attempt: Int) { ackRun(workflowRunId: $id, attempt: $attempt) { workflowRunId ackedAt attempts } }`

// hold is one hand-over of a run as a worker saw it.
type hold struct {
	worker   string
	received time.Time
	claimed  time.Time  // claimedAt, on the server's (database's) clock
	attempt  int        // the hand-over's number (attempts)
	end      time.Time  // when the worker let go: acked, killed, or its lease passed
	how      string     // "acked", "killed", "forgot", "lost"
	connEnd  *time.Time // when its connection ended, for the report
}

// workerLog records every hand-over and ack of a test's workers.
type workerLog struct {
	mu    sync.Mutex
	holds map[string][]*hold
	acks  map[string]int
	label map[string]string
}

func newWorkerLog() *workerLog {
	return &workerLog{holds: map[string][]*hold{}, acks: map[string]int{}, label: map[string]string{}}
}

func (l *workerLog) acked() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.acks)
}

// runWorker is one worker process: it connects, subscribes (one or two
// subscriptions on the connection), acks what it gets, and now and then
// dies holding a run (closes its connection) or forgets to ack (its lease
// passes). It reconnects until ctx ends.
func runWorker(ctx context.Context, t *testing.T, e *env, name, protocol, label string, subs int, lease time.Duration, log *workerLog, chaos bool) {
	for gen := 0; ctx.Err() == nil; gen++ {
		c, err := gqlclient.Dial(ctx, e.endpoint, protocol, nil)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			t.Errorf("worker %s dial: %v", name, err)
			return
		}
		var (
			wg       sync.WaitGroup
			killed   atomic.Bool
			mine     []*hold
			mineMu   sync.Mutex
			killedAt time.Time // under mineMu
		)
		kill := func() {
			if killed.CompareAndSwap(false, true) {
				now := time.Now()
				mineMu.Lock()
				killedAt = now
				for _, h := range mine {
					// A run it forgot to ack is given back too, before
					// its lease passes.
					if h.end.IsZero() || (h.how == "forgot" && h.end.After(now)) {
						h.end, h.how = now, "killed"
					}
				}
				mineMu.Unlock()
				c.CloseNow()
			}
		}
		for s := range subs {
			sub, err := c.Subscribe(ctx, runsToStartSub, map[string]any{"label": label, "lease": lease.String(), "max": 2})
			if err != nil {
				kill()
				break
			}
			id := fmt.Sprintf("%s/%d/%d", name, gen, s)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					ev, err := sub.Next(ctx)
					if err != nil || ev.Complete {
						return
					}
					if ev.Response == nil || len(ev.Response.Errors) > 0 {
						t.Errorf("worker %s: %+v %+v", id, ev.Response, ev.Errors)
						return
					}
					var got struct {
						RunsToStart struct {
							WorkflowRunID string    `json:"workflowRunId"`
							Label         *string   `json:"label"`
							Attempts      int       `json:"attempts"`
							ClaimedAt     time.Time `json:"claimedAt"`
						} `json:"runsToStart"`
					}
					if err := ev.Response.Decode(&got); err != nil {
						t.Errorf("worker %s: decode: %v", id, err)
						return
					}
					run := got.RunsToStart.WorkflowRunID
					h := &hold{worker: id, received: time.Now(), claimed: got.RunsToStart.ClaimedAt, attempt: got.RunsToStart.Attempts}
					log.mu.Lock()
					log.holds[run] = append(log.holds[run], h)
					if got.RunsToStart.Label != nil {
						log.label[run] = *got.RunsToStart.Label
					}
					log.mu.Unlock()
					mineMu.Lock()
					if !killedAt.IsZero() {
						// Read from the buffer after its connection was
						// closed: it was let go then.
						h.end, h.how = killedAt, "killed"
					}
					mine = append(mine, h)
					mineMu.Unlock()
					if chaos {
						switch r := rand.IntN(100); {
						case r < 3:
							kill()
							return
						case r < 5:
							mineMu.Lock()
							if h.end.IsZero() { // not let go already by a kill
								h.end, h.how = h.received.Add(lease), "forgot"
							}
							mineMu.Unlock()
							continue
						}
					}
					resp, err := gqlclient.Post(ctx, e.endpoint, ackMutation, map[string]any{"id": run, "attempt": got.RunsToStart.Attempts})
					if err != nil {
						return
					}
					if len(resp.Errors) > 0 {
						// Lost it (its lease passed meanwhile): fine, someone else has it.
						if resp.FirstCode() != "RUN_NOT_CLAIMED" {
							t.Errorf("worker %s: ack %s: %+v", id, run, resp.Errors)
						}
						mineMu.Lock()
						if h.end.IsZero() { // not already let go when its connection was killed
							h.end, h.how = time.Now(), "lost"
						}
						mineMu.Unlock()
						continue
					}
					mineMu.Lock()
					h.end, h.how = time.Now(), "acked"
					mineMu.Unlock()
					log.mu.Lock()
					log.acks[run]++
					log.mu.Unlock()
				}
			}()
		}
		select {
		case <-ctx.Done():
		case <-c.Done():
			now := time.Now()
			mineMu.Lock()
			for _, h := range mine {
				h.connEnd = &now
			}
			mineMu.Unlock()
			if !killed.Load() {
				t.Logf("worker %s/%d: the server closed the connection: %v (%d)", name, gen, c.Err(), c.CloseStatus())
			}
		}
		kill()
		wg.Wait()
	}
}

// Competing workers over both websocket protocols, some multiplexed, dying
// and reconnecting at random, some forgetting to ack: every run is acked
// exactly once, none is lost, none is handed to a second worker while the
// first still held it, and no worker gets a run of another label.
// RENDEZVOUS_WORKER_RUNS sets the number of runs (default 200; the issue's
// figure is 1000).
func TestRunsToStartCompetingWorkers(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		n := 200
		if v := os.Getenv("RENDEZVOUS_WORKER_RUNS"); v != "" {
			var err error
			n, err = strconv.Atoi(v)
			require.NoError(t, err, "RENDEZVOUS_WORKER_RUNS=%q", v)
		}
		const lease = 2 * time.Second
		label, other := uid("jobs"), uid("other")
		log, otherLog := newWorkerLog(), newWorkerLog()
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for i := range 5 {
			proto := []string{gqlclient.TransportWS, gqlclient.LegacyWS}[i%2]
			subs := 1 + i%2 // every other worker multiplexes two subscriptions
			wg.Add(1)
			go func() {
				defer wg.Done()
				runWorker(ctx, t, e, fmt.Sprint("w", i), proto, label, subs, lease, log, true)
			}()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			runWorker(ctx, t, e, "other", gqlclient.TransportWS, other, 1, lease, otherLog, false)
		}()
		defer func() {
			cancel()
			wg.Wait()
		}()

		ids := map[string]bool{}
		var otherIDs []string
		for i := range n {
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			e.ok(triggerMutation, map[string]any{"id": uid("job"), "label": label, "body": map[string]any{"i": i}}, &out)
			ids[out.Trigger.WorkflowRunID] = true
			if i%50 == 0 {
				e.ok(triggerMutation, map[string]any{"id": uid("oth"), "label": other}, &out)
				otherIDs = append(otherIDs, out.Trigger.WorkflowRunID)
			}
		}
		// A run without dispatch that ends before anyone acks it is never
		// handed over again; a run with no label goes to no labelled worker.
		e.ok(triggerMutation, map[string]any{"id": uid("nolabel")}, nil)

		eventually(t, 90*time.Second, func() bool { return log.acked() == n }, "all %d runs acked", n)
		eventually(t, 30*time.Second, func() bool { return otherLog.acked() == len(otherIDs) }, "other label's runs acked")
		cancel()
		wg.Wait()

		log.mu.Lock()
		defer log.mu.Unlock()
		for id := range ids {
			require.Equal(t, 1, log.acks[id], "run %s acked once", id)
			require.Equal(t, label, log.label[id])
			// In the order the server handed them over (arrival order can
			// differ: a slow delivery of an earlier hand-over).
			hs := slices.SortedFunc(slices.Values(log.holds[id]), func(a, b *hold) int { return a.attempt - b.attempt })
			for i := 1; i < len(hs); i++ {
				// Never one hand-over to two workers. (A number may be
				// missing: handed to a connection that died before it read it.)
				require.Less(t, hs[i-1].attempt, hs[i].attempt, "run %s: hand-over %d went to two workers", id, hs[i].attempt)
				prev := hs[i-1]
				require.NotEqual(t, "acked", prev.how, "run %s handed over after it was acked", id)
				// Handed again only once the previous holder let go (it
				// died, and the server noticed after) or its lease passed
				// (counted from its claim, on the database's clock).
				leasePassed := !hs[i].claimed.Before(prev.claimed.Add(lease))
				require.True(t, leasePassed || (!prev.end.IsZero() && !hs[i].received.Before(prev.end)),
					"run %s went to %s (hand-over %d claimed %s) at %s while %s (hand-over %d claimed %s) held it until %s (%s; its connection ended %v)",
					id, hs[i].worker, hs[i].attempt, hs[i].claimed, hs[i].received, prev.worker, prev.attempt, prev.claimed, prev.end, prev.how, prev.connEnd)
			}
		}
		for run := range log.holds {
			require.True(t, ids[run], "a %s worker got %s, of another label", label, run)
		}
		for _, id := range otherIDs {
			require.Equal(t, 1, otherLog.acks[id])
		}
		var redelivered int
		for _, hs := range log.holds {
			if len(hs) > 1 {
				redelivered++
			}
		}
		t.Logf("%d runs, %d handed over more than once", n, redelivered)
	})
}

// ackRun's refusals, and a run's claim fields.
func TestAckRunRefusals(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		e.fails("RUN_NOT_CLAIMED", ackMutation, map[string]any{"id": run})
		e.fails("NOT_FOUND", ackMutation, map[string]any{"id": uid("missing")})
		c := e.dial(gqlclient.TransportWS)
		for _, vars := range []map[string]any{{"lease": "0s"}, {"lease": "2h"}, {"max": 0}, {"max": 101}} {
			bad, err := c.Subscribe(ctxT(t), runsToStartSub, vars)
			require.NoError(t, err)
			ev, err := bad.Next(ctxT(t))
			require.NoError(t, err)
			errs := ev.Errors
			if ev.Response != nil {
				errs = ev.Response.Errors
			}
			require.NotEmpty(t, errs, "%v", vars)
			require.Equal(t, "BAD_USER_INPUT", errs[0].Code(), "%v", vars)
		}
		sub, err := c.Subscribe(ctxT(t), runsToStartSub, map[string]any{"lease": "1s"})
		require.NoError(t, err)
		ev, err := sub.Next(ctxT(t))
		require.NoError(t, err)
		var got struct {
			RunsToStart struct {
				WorkflowRunID string  `json:"workflowRunId"`
				Attempts      int     `json:"attempts"`
				ClaimedAt     *string `json:"claimedAt"`
			} `json:"runsToStart"`
		}
		require.NoError(t, ev.Response.Decode(&got))
		require.Equal(t, run, got.RunsToStart.WorkflowRunID)
		require.Equal(t, 1, got.RunsToStart.Attempts)
		require.NotNil(t, got.RunsToStart.ClaimedAt)
		// Not acked within its lease: the same subscriber gets it again.
		ev, err = sub.Next(ctxT(t))
		require.NoError(t, err)
		require.NoError(t, ev.Response.Decode(&got))
		require.Equal(t, 2, got.RunsToStart.Attempts)
		// The first hand-over's ack comes too late: it cannot take the
		// run from the second.
		e.fails("RUN_NOT_CLAIMED", ackMutation, map[string]any{"id": run, "attempt": 1})
		e.fails("BAD_USER_INPUT", ackMutation, map[string]any{"id": run, "attempt": 0})
		var acked struct {
			AckRun struct {
				AckedAt  *string `json:"ackedAt"`
				Attempts int     `json:"attempts"`
			} `json:"ackRun"`
		}
		e.ok(ackMutation, map[string]any{"id": run, "attempt": 2}, &acked)
		require.NotNil(t, acked.AckRun.AckedAt)
		e.fails("RUN_NOT_CLAIMED", ackMutation, map[string]any{"id": run})
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, map[string]any{"id": run}, nil)
		e.fails("RUN_NOT_ACTIVE", ackMutation, map[string]any{"id": run})

		// A run that ends before a worker acks it is not handed over again.
		ended := e.trigger()
		ev, err = sub.Next(ctxT(t))
		require.NoError(t, err)
		require.NoError(t, ev.Response.Decode(&got))
		require.Equal(t, ended, got.RunsToStart.WorkflowRunID)
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": ended}, nil)
		next := e.trigger()
		ev, err = sub.Next(ctxT(t))
		require.NoError(t, err)
		require.NoError(t, ev.Response.Decode(&got))
		require.Equal(t, next, got.RunsToStart.WorkflowRunID, "the canceled run is not handed over again")
	})
}

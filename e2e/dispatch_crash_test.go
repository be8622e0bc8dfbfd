package e2e

import (
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
)

// The real binary is SIGKILLed while deliveries are in flight, and
// restarted on the same database: every run is still delivered, each
// delivery id is processed once by a receiver that deduplicates on it, and
// every signature verifies.
func TestDispatchCrashKill(t *testing.T) {
	db := testdb.MySQL(t)
	bin := crashBuild(t)
	rcv := newReceiver(t, func(id string, attempt int) string {
		if rand.IntN(5) == 0 {
			return "500"
		}
		return ""
	})
	// Slow answers, so that kills find deliveries in flight.
	inner := rcv.srv.Config.Handler
	rcv.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Duration(50+rand.IntN(250)) * time.Millisecond) // the receiver's own work
		inner.ServeHTTP(w, r)
	})
	srv := newCrashServer(t, bin, db,
		"RENDEZVOUS_OUTBOUND_ALLOWED="+rcv.srv.URL+"/hooks",
		"RENDEZVOUS_SIGNING_SECRET="+signingSecret,
		"RENDEZVOUS_OUTBOUND_TIMEOUT=1s",
		"RENDEZVOUS_OUTBOUND_RETRY_BASE=100ms",
		"RENDEZVOUS_OUTBOUND_RETRY_MAX=500ms",
	)
	srv.start()
	const perRound, rounds = 40, 3
	var ids []string
	for round := range rounds {
		for range perRound {
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			sdOK(t, srv.endpoint(), dispatchTrigger, map[string]any{"id": uid("crash"), "body": map[string]any{"round": round},
				"d": map[string]any{"url": rcv.srv.URL + "/hooks/run", "retries": 20}}, &out)
			ids = append(ids, out.Trigger.WorkflowRunID)
		}
		// Kill once some, not all, of this round have been processed.
		target := len(ids) - perRound/2
		eventually(t, 30*time.Second, func() bool { return rcv.processedCount() >= target }, "deliveries before the kill")
		srv.kill()
		srv.start()
	}
	eventually(t, 60*time.Second, func() bool { return rcv.processedCount() == len(ids) }, "every run delivered after the kills")
	for _, id := range ids {
		eventually(t, 20*time.Second, func() bool {
			var out struct {
				WorkflowRun struct {
					Dispatch dispatchView `json:"dispatch"`
				} `json:"workflowRun"`
			}
			sdOK(t, srv.endpoint(), `query($id: ID!) { workflowRun(workflowRunId: $id) { dispatch { state attempts } } }`, map[string]any{"id": id}, &out)
			return out.WorkflowRun.Dispatch.State == "DELIVERED"
		}, "dispatch of %s DELIVERED", id)
	}
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	require.Zero(t, rcv.badSigs)
	seen := map[string]bool{}
	arrivals := 0
	for _, body := range rcv.processed {
		var b struct {
			WorkflowRunID string `json:"workflowRunId"`
		}
		require.NoError(t, json.Unmarshal(body, &b))
		require.False(t, seen[b.WorkflowRunID], "two delivery ids for run %s", b.WorkflowRunID)
		seen[b.WorkflowRunID] = true
	}
	for _, a := range rcv.arrivals {
		arrivals += len(a)
	}
	require.Len(t, seen, len(ids))
	t.Logf("%d runs, %d kills; %d requests arrived, %d of them repeats of a delivery already processed (deduplicated by the receiver)",
		len(ids), srv.kills, arrivals, rcv.dups)
}

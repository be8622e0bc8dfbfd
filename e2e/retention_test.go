package e2e

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
	"rendezvous/storage"
)

// TestRetentionPurgesEndedRuns: once RENDEZVOUS_RUN_RETENTION has passed
// since a run ended, the run and everything of its own go (waiters, steps,
// lookback events), waiters without a run go an hour after they ended, and
// nothing live goes: a started run however old, a waiting subscription, a
// notification another run's waiter still refers to.
func TestRetentionPurgesEndedRuns(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db, func(c *service.Config) {
			c.Engine.RunRetention = 48 * time.Hour
			c.Engine.RunlessWaiterRetention = time.Hour
			c.Engine.PurgeInterval = 50 * time.Millisecond
		})
		ctx := ctxT(t)
		c := e.dial(gqlclient.TransportWS)
		ended, started := e.trigger(), e.trigger()

		// One broadcast resolves a durable step of each run and a
		// subscription without a run: they share one stored notification.
		ev := uid("shared")
		sEnded := e.subscribe(c, ev, waitOpts{run: ended, step: "wait"})
		sStarted := e.subscribe(c, ev, waitOpts{run: started, step: "wait"})
		sFree := e.subscribe(c, ev, waitOpts{})
		e.awaitWaiting(ev, 3)
		n := e.notify(ev, map[string]any{"shared": true}, "")
		require.Len(t, n.NotifyResponse, 3)
		var freeWaiter string
		for _, r := range n.NotifyResponse {
			if r.WorkflowRunID == nil {
				freeWaiter = r.Waiter.ID
			}
		}
		for _, s := range []*gqlclient.Sub{sEnded, sStarted, sFree} {
			require.JSONEq(t, `{"shared":true}`, string(mustResult(t, s).EventData))
		}

		// The ended run also has a notify step, a consumed lookback event
		// and a pending one (dropped when it ends).
		step := uid("tell")
		e.ok(notifyMutation, map[string]any{"ev": step, "step": map[string]any{"workflowRunId": ended, "stepName": "tell"}}, nil)
		lb := uid("lb")
		require.NotNil(t, e.notify(lb, "stored", ended).Lookback)
		require.Equal(t, `"stored"`, string(mustResult(t, e.subscribe(c, lb, waitOpts{run: ended})).EventData))
		require.NotNil(t, e.notify(uid("pending"), "never read", ended).Lookback)
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, map[string]any{"id": ended}, nil)
		require.Len(t, e.run(ended).Steps, 2)

		// Live: a subscription without a run, waiting.
		evLive := uid("live")
		sLive := e.subscribe(c, evLive, waitOpts{})
		e.awaitWaiting(evLive, 1)

		// Just before the retention, nothing is purged.
		e.clock.Advance(47 * time.Hour)
		_, err := e.svc.Engine.Purge(ctx)
		require.NoError(t, err)
		require.NotNil(t, e.run(ended))

		e.clock.Advance(2 * time.Hour)
		eventually(t, 10*time.Second, func() bool { return e.run(ended) == nil }, "the ended run should be purged")
		ws, err := e.svc.Store.WaiterListByRun(ctx, ended)
		require.NoError(t, err)
		require.Empty(t, ws)
		steps, err := e.svc.Store.StepListByRun(ctx, ended)
		require.NoError(t, err)
		require.Empty(t, steps)
		require.Empty(t, e.storedLookback(ended))
		eventually(t, 10*time.Second, func() bool {
			_, err := e.svc.Store.WaiterGet(ctx, freeWaiter)
			return err == storage.ErrNotFound
		}, "the ended waiter without a run should be purged")

		// The started run, two days old, is whole; its step still returns
		// the notification it shares with what was purged.
		r := e.run(started)
		require.Equal(t, "RUN_STARTED", r.State)
		require.Len(t, r.Waiters, 1)
		require.Len(t, r.Steps, 1)
		require.NotNil(t, r.Steps[0].CompletedAt)
		again := mustResult(t, e.subscribe(c, ev, waitOpts{run: started, step: "wait"}))
		require.JSONEq(t, `{"shared":true}`, string(again.EventData))

		// The waiting subscription still waits, and still receives.
		require.Len(t, e.waiters(evLive), 1)
		require.Len(t, e.notify(evLive, "late", "").NotifyResponse, 1)
		require.Equal(t, `"late"`, string(mustResult(t, sLive).EventData))
	})
}

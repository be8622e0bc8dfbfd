package e2e

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
)

// Rule 1: trigger creates a run in RUN_STARTED; the same id again returns the
// existing run, created: false, body unchanged.
func TestRule1Trigger(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		type trig struct {
			Trigger struct {
				WorkflowRunID string  `json:"workflowRunId"`
				Created       bool    `json:"created"`
				Run           runView `json:"run"`
			} `json:"trigger"`
		}
		id := uid("order")
		var first trig
		e.ok(triggerMutation, map[string]any{"id": id, "body": map[string]any{"n": 1}, "label": "checkout"}, &first)
		require.Equal(t, "wfr_"+id, first.Trigger.WorkflowRunID)
		require.True(t, first.Trigger.Created)
		require.Equal(t, "RUN_STARTED", first.Trigger.Run.State)
		require.JSONEq(t, `{"n":1}`, string(first.Trigger.Run.Body))

		var again trig
		e.ok(triggerMutation, map[string]any{"id": id, "body": map[string]any{"n": 2}}, &again)
		require.False(t, again.Trigger.Created)
		require.Equal(t, first.Trigger.WorkflowRunID, again.Trigger.WorkflowRunID)
		require.JSONEq(t, `{"n":1}`, string(again.Trigger.Run.Body), "body unchanged")
		require.Equal(t, "checkout", *again.Trigger.Run.Label)

		// The full id works too, and names the same run.
		var full trig
		e.ok(triggerMutation, map[string]any{"id": "wfr_" + id}, &full)
		require.False(t, full.Trigger.Created)

		// Without an id: a fresh wfr_ id each time.
		var gen1, gen2 trig
		e.ok(triggerMutation, nil, &gen1)
		e.ok(triggerMutation, nil, &gen2)
		require.True(t, strings.HasPrefix(gen1.Trigger.WorkflowRunID, "wfr_"))
		require.NotEqual(t, gen1.Trigger.WorkflowRunID, gen2.Trigger.WorkflowRunID)

		// Ids are compared byte for byte.
		var upper trig
		e.ok(triggerMutation, map[string]any{"id": strings.ToUpper(id)}, &upper)
		require.True(t, upper.Trigger.Created, "Order-1 and order-1 are different runs")

		require.Equal(t, "RUN_STARTED", e.run(first.Trigger.WorkflowRunID).State)
		require.Nil(t, e.run("wfr_"+uid("missing")))
	})
}

// Rule 2: a broadcast notify resolves every waiter WAITING on the event id,
// one NotifyResponse each; with none waiting it stores nothing.
func TestRule2Broadcast(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ev := uid("ev")
		run := e.trigger()
		c1 := e.dial(gqlclient.TransportWS)
		c2 := e.dial(gqlclient.LegacyWS)
		s1 := e.subscribe(c1, ev, waitOpts{})
		s2 := e.subscribe(c2, ev, waitOpts{})
		s3 := e.subscribe(c1, ev, waitOpts{run: run})
		other := e.subscribe(c1, uid("other"), waitOpts{})
		e.awaitWaiting(ev, 3)

		n := e.notify(ev, map[string]any{"paid": true}, "")
		require.Len(t, n.NotifyResponse, 3)
		require.Nil(t, n.Lookback)
		msg := n.NotifyResponse[0].MessageID
		for _, s := range []*gqlclient.Sub{s1, s2, s3} {
			r := mustResult(t, s)
			require.False(t, r.Timeout)
			require.JSONEq(t, `{"paid":true}`, string(r.EventData))
			require.Equal(t, msg, *r.MessageID)
			require.NotNil(t, r.NotifiedAt)
		}
		require.Empty(t, e.waiters(ev))
		quiet(t, other)

		// Nobody waiting: empty list, nothing stored.
		empty := e.notify(uid("nobody"), 1, "")
		require.Empty(t, empty.NotifyResponse)
		require.Nil(t, empty.Lookback)
		require.Empty(t, e.run(run).LookbackEvents)
	})
}

// Rule 3: a targeted notify resolves that run's waiters on the event id (all
// of them), or stores one lookback event; unknown run NOT_FOUND, ended run
// RUN_NOT_ACTIVE.
func TestRule3Targeted(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ev := uid("ev")
		run, otherRun := e.trigger(), e.trigger()
		c := e.dial(gqlclient.TransportWS)
		a := e.subscribe(c, ev, waitOpts{run: run})
		b := e.subscribe(c, ev, waitOpts{run: run, step: "wait-b"})
		notMine := e.subscribe(c, ev, waitOpts{run: otherRun})
		runless := e.subscribe(c, ev, waitOpts{})
		e.awaitWaiting(ev, 4)

		n := e.notify(ev, "hello", run)
		require.Len(t, n.NotifyResponse, 2)
		require.Nil(t, n.Lookback)
		for _, s := range []*gqlclient.Sub{a, b} {
			r := mustResult(t, s)
			require.Equal(t, `"hello"`, string(r.EventData))
			require.Equal(t, run, *r.WorkflowRunID)
		}
		quiet(t, notMine)
		quiet(t, runless)
		require.Len(t, e.waiters(ev), 2, "the other run's and the run-less waiter still wait")

		// No waiter on the run: stored as lookback, returned in lookback.
		ev2 := uid("ev2")
		n2 := e.notify(ev2, []any{1, 2}, run)
		require.Empty(t, n2.NotifyResponse)
		require.NotNil(t, n2.Lookback)
		require.Equal(t, run, e.run(run).WorkflowRunID)
		require.Equal(t, ev2, n2.Lookback.EventID)
		require.JSONEq(t, `[1,2]`, string(n2.Lookback.EventData))
		lbs := e.run(run).LookbackEvents
		require.Len(t, lbs, 1)
		require.Equal(t, n2.Lookback.ID, lbs[0].ID)

		e.fails("NOT_FOUND", notifyMutation, map[string]any{"ev": ev, "run": "wfr_" + uid("nope")})
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": otherRun}, nil)
		e.fails("RUN_NOT_ACTIVE", notifyMutation, map[string]any{"ev": ev, "run": otherRun})
	})
}

// Rule 4: waitForEvent with a run first consumes the oldest unconsumed,
// unexpired lookback event, at once; each is consumed exactly once.
func TestRule4LookbackConsumedOnce(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ev := uid("ev")
		run := e.trigger()
		first := e.notify(ev, "first", run)
		second := e.notify(ev, "second", run)
		require.NotNil(t, first.Lookback)
		require.NotNil(t, second.Lookback)
		require.Len(t, e.run(run).LookbackEvents, 2)

		c := e.dial(gqlclient.TransportWS)
		r1 := mustResult(t, e.subscribe(c, ev, waitOpts{run: run}))
		require.Equal(t, `"first"`, string(r1.EventData))
		require.Equal(t, first.Lookback.MessageID, *r1.MessageID)
		r2 := mustResult(t, e.subscribe(c, ev, waitOpts{run: run}))
		require.Equal(t, `"second"`, string(r2.EventData))
		require.Equal(t, second.Lookback.MessageID, *r2.MessageID)
		require.Empty(t, e.run(run).LookbackEvents)

		// A third wait finds nothing and waits.
		s3 := e.subscribe(c, ev, waitOpts{run: run})
		e.awaitWaiting(ev, 1)
		quiet(t, s3)

		// Lookback belongs to its run and event id only.
		other := e.trigger()
		e.notify(ev, "for other", other)
		quiet(t, s3)
		n := e.notify(ev, "third", run)
		require.Len(t, n.NotifyResponse, 1)
		require.Equal(t, `"third"`, string(mustResult(t, s3).EventData))
	})
}

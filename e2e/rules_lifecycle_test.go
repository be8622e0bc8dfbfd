package e2e

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/service"
)

// Lifecycle rules: durable steps (6), ephemeral waiters (7), timeouts (8),
// ending runs (11) and lookback retention (12).

const cancelMutation = `mutation($id: ID!) { cancel(workflowRunId: $id) { workflowRunId state result } }`

const finishMutation = `mutation($id: ID!, $state: RunState!, $result: JSON) {
  finishRun(workflowRunId: $id, state: $state, result: $result) { workflowRunId state result }
}`

// startWithoutLoops starts the service like env.start but leaves the
// engine's background loops (timeout sweeper, lookback purge, catch-up)
// stopped, so a test can see what a request alone makes of the database.
// Start them later with e.svc.Start.
func (e *env) startWithoutLoops() {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svc, err := service.New(ctx, e.cfg)
	require.NoError(e.t, err)
	e.svc = svc
	e.srv = httptest.NewServer(svc.Handler)
	e.endpoint = e.srv.URL + "/query"
}

func parseTime(t *testing.T, s string) time.Time {
	t.Helper()
	tm, err := time.Parse(time.RFC3339Nano, s)
	require.NoError(t, err, "time %q", s)
	return tm
}

func isNullJSON(raw []byte) bool { return len(raw) == 0 || string(raw) == "null" }

// runWaiter returns the run's waiter with the id, failing if it is not listed.
func (e *env) runWaiter(runID, waiterID string) waiterView {
	e.t.Helper()
	r := e.run(runID)
	require.NotNil(e.t, r, "run %s", runID)
	for _, w := range r.Waiters {
		if w.ID == waiterID {
			return w
		}
	}
	e.t.Fatalf("run %s does not list waiter %s; it lists %+v", runID, waiterID, r.Waiters)
	return waiterView{}
}

// runHasWaiter reports whether workflowRun.waiters lists the waiter.
func (e *env) runHasWaiter(runID, waiterID string) bool {
	e.t.Helper()
	for _, w := range e.run(runID).Waiters {
		if w.ID == waiterID {
			return true
		}
	}
	return false
}

// storedLookback lists the run's unconsumed lookback rows as the database
// holds them, expired ones included (the listing in the API hides those).
func (e *env) storedLookback(runID string) []*models.LookbackEvent {
	e.t.Helper()
	longAgo := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	evs, err := e.svc.Store.LookbackEventListByRun(ctxT(e.t), runID, longAgo)
	require.NoError(e.t, err)
	return evs
}

func lookbackIDs(evs []*models.LookbackEvent) []string {
	ids := make([]string, len(evs))
	for i, ev := range evs {
		ids[i] = ev.ID
	}
	return ids
}

// waitFails subscribes and expects the subscription to end with the code.
func (e *env) waitFails(c *gqlclient.Conn, code, eventID string, o waitOpts) {
	e.t.Helper()
	out := result(e.t, e.subscribe(c, eventID, o), 15*time.Second)
	require.Nil(e.t, out.Result, "waitForEvent(%s, %+v) should fail with %s", eventID, o, code)
	require.Equal(e.t, code, out.code(), "waitForEvent(%s, %+v): errors %+v", eventID, o, out.Errors)
}

// ---------------------------------------------------------------- rule 6

// Rule 6: a durable step's waiter lives in the database whether or not a
// client is connected; a notify while nobody listens resolves it; subscribing
// again with the same (run, step) returns its result at once.
func TestRule6DurableStepOutlivesConnection(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		ev, probe := uid("ev"), uid("probe")

		c := e.dial(gqlclient.TransportWS)
		e.subscribe(c, ev, waitOpts{run: run, step: "wait-paid"})
		// An ephemeral waiter on the same connection shows when the server
		// has seen the connection close: it is removed then (rule 7).
		e.subscribe(c, probe, waitOpts{run: run})
		ws := e.awaitWaiting(ev, 1)
		e.awaitWaiting(probe, 1)
		w := ws[0]
		require.Equal(t, "WAITING", w.State)
		require.Equal(t, run, *w.WorkflowRunID)
		require.Equal(t, "wait-paid", *w.StepName)

		require.NoError(t, c.CloseNow())
		e.awaitWaiting(probe, 0)
		left := e.waiters(ev)
		require.Len(t, left, 1, "the durable waiter outlives its connection")
		require.Equal(t, w.ID, left[0].ID)
		require.Equal(t, "WAITING", e.runWaiter(run, w.ID).State)

		// Nobody connected: the notify resolves the waiter in the database.
		n := e.notify(ev, map[string]any{"amount": 42}, run)
		require.Len(t, n.NotifyResponse, 1)
		require.Nil(t, n.Lookback, "a waiting durable step takes the event; nothing is stored")
		require.Equal(t, w.ID, n.NotifyResponse[0].Waiter.ID)
		msg := n.NotifyResponse[0].MessageID
		require.Empty(t, e.waiters(ev))
		require.Equal(t, "NOTIFIED", e.runWaiter(run, w.ID).State)
		require.Empty(t, e.run(run).LookbackEvents)

		// Subscribing again returns that result at once, as often as asked.
		c2 := e.dial(gqlclient.LegacyWS)
		for range 2 {
			r := mustResult(t, e.subscribe(c2, ev, waitOpts{run: run, step: "wait-paid"}))
			require.False(t, r.Timeout)
			require.Equal(t, w.ID, r.WaiterID)
			require.NotNil(t, r.MessageID)
			require.Equal(t, msg, *r.MessageID)
			require.JSONEq(t, `{"amount":42}`, string(r.EventData))
			require.Equal(t, run, *r.WorkflowRunID)
			require.Equal(t, "wait-paid", *r.StepName)
			require.NotNil(t, r.NotifiedAt)
		}
		require.Empty(t, e.waiters(ev), "re-subscribing to an ended step registers nothing")

		// The step is recorded once and completed.
		var steps []stepView
		for _, s := range e.run(run).Steps {
			if s.StepName == "wait-paid" {
				steps = append(steps, s)
			}
		}
		require.Len(t, steps, 1)
		require.Equal(t, "WAIT_FOR_EVENT", steps[0].Type)
		require.Equal(t, ev, steps[0].EventID)
		require.NotNil(t, steps[0].CompletedAt)

		// The same (run, step) with another event id is a caller's mistake,
		// whether the step has ended or not.
		e.waitFails(c2, "BAD_USER_INPUT", uid("other"), waitOpts{run: run, step: "wait-paid"})
	})
}

// Rule 6: two subscribers attached to the same (run, step) share one waiter
// and both receive the one result; another event id on that step is refused.
func TestRule6TwoSubscribersOneStep(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		ev, probe := uid("ev"), uid("probe")

		c1 := e.dial(gqlclient.TransportWS)
		c2 := e.dial(gqlclient.LegacyWS)
		s1 := e.subscribe(c1, ev, waitOpts{run: run, step: "approval"})
		w := e.awaitWaiting(ev, 1)[0]
		s2 := e.subscribe(c2, ev, waitOpts{run: run, step: "approval"})
		s3 := e.subscribe(c1, ev, waitOpts{run: run, step: "approval"})
		// Subscriptions registered after these on the same connections are
		// visible, so the attaches above have (very likely) run too.
		e.subscribe(c1, probe, waitOpts{})
		e.subscribe(c2, probe, waitOpts{})
		e.awaitWaiting(probe, 2)

		ws := e.waiters(ev)
		require.Len(t, ws, 1, "attaching does not register a second waiter")
		require.Equal(t, w.ID, ws[0].ID)

		// Same step, another event id: refused while it waits, nothing changes.
		e.waitFails(c2, "BAD_USER_INPUT", uid("different"), waitOpts{run: run, step: "approval"})
		require.Len(t, e.waiters(ev), 1)
		for _, s := range []*gqlclient.Sub{s1, s2, s3} {
			quiet(t, s)
		}

		n := e.notify(ev, "approved", run)
		require.Len(t, n.NotifyResponse, 1, "one waiter, one response")
		msg := n.NotifyResponse[0].MessageID
		for _, s := range []*gqlclient.Sub{s1, s2, s3} {
			r := mustResult(t, s)
			require.Equal(t, w.ID, r.WaiterID)
			require.Equal(t, msg, *r.MessageID)
			require.Equal(t, `"approved"`, string(r.EventData))
			require.False(t, r.Timeout)
		}
		require.Empty(t, e.waiters(ev))
	})
}

// Rule 6: a durable waiter survives a restart of the service, and a
// subscription after the restart attaches to it.
func TestRule6DurableSurvivesRestart(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		ev := uid("ev")

		c := e.dial(gqlclient.TransportWS)
		e.subscribe(c, ev, waitOpts{run: run, step: "shipment", timeout: "1h"})
		w := e.awaitWaiting(ev, 1)[0]

		e.restart()

		ws := e.awaitWaiting(ev, 1)
		require.Equal(t, w.ID, ws[0].ID, "the same waiter, still waiting")
		require.Equal(t, w.Deadline, ws[0].Deadline, "with its deadline")
		require.Equal(t, "WAITING", e.runWaiter(run, w.ID).State)

		c2 := e.dial(gqlclient.TransportWS)
		s := e.subscribe(c2, ev, waitOpts{run: run, step: "shipment"})
		quiet(t, s)
		require.Len(t, e.waiters(ev), 1, "re-subscribing attaches; no second waiter")

		n := e.notify(ev, "shipped", run)
		require.Len(t, n.NotifyResponse, 1)
		require.Equal(t, w.ID, n.NotifyResponse[0].Waiter.ID)
		r := mustResult(t, s)
		require.Equal(t, w.ID, r.WaiterID)
		require.Equal(t, n.NotifyResponse[0].MessageID, *r.MessageID)
		require.Equal(t, `"shipped"`, string(r.EventData))

		// And the ended step keeps its result across another restart.
		e.restart()
		c3 := e.dial(gqlclient.LegacyWS)
		again := mustResult(t, e.subscribe(c3, ev, waitOpts{run: run, step: "shipment"}))
		require.Equal(t, w.ID, again.WaiterID)
		require.Equal(t, *r.MessageID, *again.MessageID)
	})
}

// ---------------------------------------------------------------- rule 7

// Rule 7: without stepName a waiter belongs to its subscription: stopping the
// subscription removes it, and a targeted notify then stores a lookback.
func TestRule7EphemeralRemovedWhenSubscriptionStops(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		for _, proto := range []string{gqlclient.TransportWS, gqlclient.LegacyWS} {
			run := e.trigger()
			ev := uid("ev")
			c := e.dial(proto)
			s := e.subscribe(c, ev, waitOpts{run: run})
			runless := e.subscribe(c, ev, waitOpts{})
			ws := e.awaitWaiting(ev, 2)
			var mine string
			for _, w := range ws {
				if w.WorkflowRunID != nil {
					mine = w.ID
				}
			}
			require.NotEmpty(t, mine)
			require.True(t, e.runHasWaiter(run, mine))

			require.NoError(t, s.Stop(ctxT(t)))
			require.NoError(t, runless.Stop(ctxT(t)))
			e.awaitWaiting(ev, 0)
			eventually(t, 10*time.Second, func() bool { return !e.runHasWaiter(run, mine) },
				"%s: workflowRun.waiters still lists %s after its subscription stopped", proto, mine)

			n := e.notify(ev, "late", run)
			require.Empty(t, n.NotifyResponse, "%s: the stopped subscription's waiter must not be notified", proto)
			require.NotNil(t, n.Lookback, "%s: with no waiter the event is stored", proto)
			require.Len(t, e.run(run).LookbackEvents, 1)

			// Nothing is lost: the run's next wait receives it.
			r := mustResult(t, e.subscribe(c, ev, waitOpts{run: run}))
			require.Equal(t, `"late"`, string(r.EventData))
			require.Equal(t, n.Lookback.MessageID, *r.MessageID)
		}
	})
}

// Rule 7: closing the connection (normally, abruptly, or by a restart of the
// service) ends its subscriptions, and their ephemeral waiters go with them.
func TestRule7EphemeralRemovedWhenConnectionCloses(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		closers := map[string]func(*gqlclient.Conn) error{
			"close":     (*gqlclient.Conn).Close,
			"close-now": (*gqlclient.Conn).CloseNow,
		}
		for name, closeConn := range closers {
			run := e.trigger()
			ev := uid("ev")
			c := e.dial(gqlclient.TransportWS)
			e.subscribe(c, ev, waitOpts{run: run})
			e.subscribe(c, ev, waitOpts{})
			ws := e.awaitWaiting(ev, 2)

			closeConn(c)
			e.awaitWaiting(ev, 0)
			for _, w := range ws {
				if w.WorkflowRunID != nil {
					eventually(t, 10*time.Second, func() bool { return !e.runHasWaiter(run, w.ID) },
						"%s: workflowRun.waiters still lists %s", name, w.ID)
				}
			}
			n := e.notify(ev, name, run)
			require.Empty(t, n.NotifyResponse, name)
			require.NotNil(t, n.Lookback, name)
			require.Empty(t, e.notify(ev, name, "").NotifyResponse, "%s: no run-less waiter is left either", name)
		}

		// A restart ends every subscription: ephemeral waiters do not
		// survive it (durable ones do, see rule 6).
		run := e.trigger()
		ev := uid("ev")
		c := e.dial(gqlclient.LegacyWS)
		e.subscribe(c, ev, waitOpts{run: run})
		e.subscribe(c, ev, waitOpts{run: run, step: "durable"})
		ws := e.awaitWaiting(ev, 2)
		e.restart()
		left := e.awaitWaiting(ev, 1)
		require.NotNil(t, left[0].StepName, "only the durable waiter is left: %+v", left)
		for _, w := range ws {
			if w.StepName == nil {
				require.False(t, e.runHasWaiter(run, w.ID), "the ephemeral waiter %s is gone after a restart", w.ID)
			}
		}
	})
}

// Rule 7: a shutdown that overlaps subscriptions still registering must not
// leave their ephemeral waiters behind: no subscription survives it, so no
// waiter without a step may either (a broadcast would "resolve" it for nobody).
func TestRule7EphemeralNotOrphanedByShutdown(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		ev := uid("ev")
		const perConn = 10
		for _, proto := range []string{gqlclient.TransportWS, gqlclient.LegacyWS, gqlclient.TransportWS, gqlclient.LegacyWS} {
			c := e.dial(proto)
			for i := range perConn {
				if i%2 == 0 {
					e.subscribe(c, ev, waitOpts{run: run})
				} else {
					e.subscribe(c, ev, waitOpts{})
				}
			}
		}
		// Shut down while registrations are still arriving.
		eventually(t, 10*time.Second, func() bool { return len(e.waiters(ev)) > 0 }, "no waiter registered")
		e.restart()

		eventually(t, 10*time.Second, func() bool { return len(e.waiters(ev)) == 0 },
			"ephemeral waiters outlived their subscriptions across a restart")
		n := e.notify(ev, "nobody listens", "")
		require.Empty(t, n.NotifyResponse, "a broadcast after the restart must find no waiter")
		for _, w := range e.run(run).Waiters {
			require.NotEqual(t, "WAITING", w.State, "waiter %s of a closed subscription", w.ID)
		}
	})
}

// Rule 7: a waiter without workflowRunId is resolved only by broadcast
// notifies; a targeted notify to any run leaves it waiting.
func TestRule7RunlessOnlyBroadcast(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		ev := uid("ev")
		c := e.dial(gqlclient.TransportWS)
		s := e.subscribe(c, ev, waitOpts{})
		w := e.awaitWaiting(ev, 1)[0]
		require.Nil(t, w.WorkflowRunID)

		n := e.notify(ev, "for the run", run)
		require.Empty(t, n.NotifyResponse, "a targeted notify does not touch a run-less waiter")
		require.NotNil(t, n.Lookback, "the run had no waiter: stored as lookback")
		quiet(t, s)
		ws := e.waiters(ev)
		require.Len(t, ws, 1)
		require.Equal(t, w.ID, ws[0].ID)

		b := e.notify(ev, "for everyone", "")
		require.Len(t, b.NotifyResponse, 1)
		require.Equal(t, w.ID, b.NotifyResponse[0].Waiter.ID)
		r := mustResult(t, s)
		require.Equal(t, `"for everyone"`, string(r.EventData))
		require.Nil(t, r.WorkflowRunID)
		require.Len(t, e.run(run).LookbackEvents, 1, "a broadcast does not consume the run's lookback")
	})
}

// ---------------------------------------------------------------- rule 8

// Rule 8: timeout defaults to 7 days and is at most 365 days by default;
// zero, negative, malformed or too large values are BAD_USER_INPUT; the
// accepted forms give the right deadline.
func TestRule8TimeoutValidation(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		c := e.dial(gqlclient.TransportWS)

		deadlineAfter := func(timeout any) time.Duration {
			t.Helper()
			ev := uid("ev")
			s := e.subscribe(c, ev, waitOpts{timeout: timeout})
			w := e.awaitWaiting(ev, 1)[0]
			require.NoError(t, s.Stop(ctxT(t)))
			return parseTime(t, w.Deadline).Sub(parseTime(t, w.CreatedAt))
		}

		require.Equal(t, 7*24*time.Hour, deadlineAfter(nil), "the default timeout is 7 days")
		accepted := []struct {
			timeout any
			want    time.Duration
		}{
			{"30s", 30 * time.Second},
			{"5m", 5 * time.Minute},
			{"2h", 2 * time.Hour},
			{"1d", 24 * time.Hour},
			{"1h30m", 90 * time.Minute},
			{45, 45 * time.Second},
			{"365d", 365 * 24 * time.Hour},
			{365 * 24 * 3600, 365 * 24 * time.Hour},
		}
		for _, a := range accepted {
			require.Equal(t, a.want, deadlineAfter(a.timeout), "timeout %#v", a.timeout)
		}

		// A durable step's deadline comes from its timeout too.
		run := e.trigger()
		ev := uid("ev")
		e.subscribe(c, ev, waitOpts{run: run, step: "s", timeout: "1h30m"})
		w := e.awaitWaiting(ev, 1)[0]
		require.Equal(t, 90*time.Minute, parseTime(t, w.Deadline).Sub(parseTime(t, w.CreatedAt)))

		rejected := []any{"abc", "5x", "", -5, 0, "0s", 1.5, "-1m", "366d", 365*24*3600 + 1, "1h30", "d"}
		for _, timeout := range rejected {
			ev := uid("bad")
			out := result(t, e.subscribe(c, ev, waitOpts{timeout: timeout}), 15*time.Second)
			require.Nil(t, out.Result, "timeout %#v must be refused", timeout)
			require.Equal(t, "BAD_USER_INPUT", out.code(), "timeout %#v: errors %+v", timeout, out.Errors)
			require.Empty(t, e.waiters(ev), "timeout %#v: no waiter registered", timeout)
			// Refusing a durable step must not record it either.
			out = result(t, e.subscribe(c, ev, waitOpts{run: run, step: "bad-" + ev, timeout: timeout}), 15*time.Second)
			require.Equal(t, "BAD_USER_INPUT", out.code(), "timeout %#v on a step: errors %+v", timeout, out.Errors)
		}
		for _, s := range e.run(run).Steps {
			require.Equal(t, "s", s.StepName, "refused waits record no step")
		}
	})
}

// Rule 8: the maximum timeout is configurable.
func TestRule8ConfigurableMaxTimeout(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db, func(c *service.Config) { c.Engine.MaxTimeout = 2 * time.Hour })
		c := e.dial(gqlclient.LegacyWS)

		for _, ok := range []any{"2h", "1h30m", 7200, "120m"} {
			ev := uid("ok")
			s := e.subscribe(c, ev, waitOpts{timeout: ok})
			w := e.awaitWaiting(ev, 1)[0]
			require.LessOrEqual(t, parseTime(t, w.Deadline).Sub(parseTime(t, w.CreatedAt)), 2*time.Hour, "timeout %#v", ok)
			require.NoError(t, s.Stop(ctxT(t)))
		}
		for _, tooLong := range []any{"2h1s", "121m", 7201, "1d", "7d", "365d"} {
			ev := uid("long")
			out := result(t, e.subscribe(c, ev, waitOpts{timeout: tooLong}), 15*time.Second)
			require.Nil(t, out.Result)
			require.Equal(t, "BAD_USER_INPUT", out.code(), "timeout %#v over a 2h maximum: errors %+v", tooLong, out.Errors)
			require.Empty(t, e.waiters(ev))
		}
	})
}

// Rule 8: at the deadline the waiter ends TIMED_OUT and the subscriber gets
// {timeout: true, eventData: null}.
func TestRule8TimeoutFires(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		ev := uid("ev")
		c := e.dial(gqlclient.TransportWS)
		durable := e.subscribe(c, ev, waitOpts{run: run, step: "slow", timeout: "1s"})
		ephemeral := e.subscribe(c, ev, waitOpts{run: run, timeout: 1})
		runless := e.subscribe(c, ev, waitOpts{timeout: "1s"})

		for name, s := range map[string]*gqlclient.Sub{"durable": durable, "ephemeral": ephemeral, "runless": runless} {
			r := mustResult(t, s)
			require.True(t, r.Timeout, name)
			require.True(t, isNullJSON(r.EventData), "%s: eventData must be null, got %s", name, r.EventData)
			require.Nil(t, r.MessageID, name)
			require.Equal(t, ev, r.EventID, name)
			require.NotEmpty(t, r.WaiterID, name)
			if name != "runless" {
				dl := parseTime(t, e.runWaiter(run, r.WaiterID).Deadline)
				require.False(t, e.clock.Now().Before(dl), "%s fired before its deadline %s", name, dl)
			}
		}
		require.Empty(t, e.waiters(ev))

		var stepWaiter string
		for _, w := range e.run(run).Waiters {
			require.Equal(t, "TIMED_OUT", w.State, "waiter %s", w.ID)
			if w.StepName != nil {
				stepWaiter = w.ID
			}
		}
		require.NotEmpty(t, stepWaiter)

		// A notify after the deadline finds nobody to resolve.
		n := e.notify(ev, "too late", run)
		require.Empty(t, n.NotifyResponse)
		require.NotNil(t, n.Lookback)

		// The timed-out step keeps its result; it does not take the lookback.
		r := mustResult(t, e.subscribe(c, ev, waitOpts{run: run, step: "slow"}))
		require.True(t, r.Timeout)
		require.Equal(t, stepWaiter, r.WaiterID)
		require.True(t, isNullJSON(r.EventData))
		require.Len(t, e.run(run).LookbackEvents, 1)
	})
}

// Rule 8: deadlines hold across restarts. A durable waiter whose deadline
// passed while the service was down is TIMED_OUT when asked (even before any
// sweeper has run); one whose deadline is still ahead fires on time.
func TestRule8DeadlinesAcrossRestart(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		evPast, evUnasked, evAttach, evSwept := uid("past"), uid("unasked"), uid("attach"), uid("swept")

		c := e.dial(gqlclient.TransportWS)
		e.subscribe(c, evPast, waitOpts{run: run, step: "past", timeout: "1h"})
		e.subscribe(c, evUnasked, waitOpts{run: run, step: "unasked", timeout: "1h"})
		e.subscribe(c, evAttach, waitOpts{run: run, step: "attach", timeout: "2h"})
		e.subscribe(c, evSwept, waitOpts{run: run, step: "swept", timeout: "2h"})
		past := e.awaitWaiting(evPast, 1)[0]
		unasked := e.awaitWaiting(evUnasked, 1)[0]
		attach := e.awaitWaiting(evAttach, 1)[0]
		swept := e.awaitWaiting(evSwept, 1)[0]
		require.NoError(t, c.CloseNow())

		// While the service is down, the 1h deadlines pass; the 2h ones are
		// left a few seconds ahead.
		const margin = 5 * time.Second
		e.stop()
		attachDeadline := parseTime(t, attach.Deadline)
		sweptDeadline := parseTime(t, swept.Deadline)
		e.clock.Advance(attachDeadline.Sub(e.clock.Now()) - margin)
		require.True(t, e.clock.Now().After(parseTime(t, past.Deadline)))
		e.startWithoutLoops()

		// Asked before any sweeper ran: TIMED_OUT everywhere.
		require.Empty(t, e.waiters(evPast), "waiters must not list a waiter past its deadline")
		require.Empty(t, e.waiters(evUnasked))
		require.Equal(t, "TIMED_OUT", e.runWaiter(run, past.ID).State)
		require.Equal(t, "TIMED_OUT", e.runWaiter(run, unasked.ID).State)
		c2 := e.dial(gqlclient.LegacyWS)
		o := result(t, e.subscribe(c2, evPast, waitOpts{run: run, step: "past"}), 5*time.Second)
		require.Empty(t, o.Errors)
		require.NotNil(t, o.Result, "re-subscribing to a timed-out step returns at once")
		require.True(t, o.Result.Timeout)
		require.True(t, isNullJSON(o.Result.EventData))
		require.Equal(t, past.ID, o.Result.WaiterID)
		// A notify now finds no waiter: the event is stored, not delivered.
		n := e.notify(evPast, "late", run)
		require.Empty(t, n.NotifyResponse)
		require.NotNil(t, n.Lookback)
		n = e.notify(evUnasked, "late", run)
		require.Empty(t, n.NotifyResponse, "a durable waiter past its deadline must not be notified")

		// The 2h ones still wait.
		require.Equal(t, attach.ID, e.awaitWaiting(evAttach, 1)[0].ID)
		require.Equal(t, swept.ID, e.awaitWaiting(evSwept, 1)[0].ID)
		require.Equal(t, "WAITING", e.runWaiter(run, swept.ID).State)

		e.svc.Start(context.Background())
		// The sweeper writes the end of a waiter nobody asks about.
		eventually(t, 10*time.Second, func() bool {
			w, err := e.svc.Store.WaiterGet(ctxT(t), unasked.ID)
			require.NoError(t, err)
			return w.State == models.WaiterTimedOut
		}, "the sweeper should end %s TIMED_OUT in the database", unasked.ID)

		// A subscriber attached after the restart gets its timeout on time.
		s := e.subscribe(c2, evAttach, waitOpts{run: run, step: "attach"})
		quiet(t, s)
		o = result(t, s, margin+15*time.Second)
		now := e.clock.Now()
		require.Empty(t, o.Errors)
		require.NotNil(t, o.Result)
		require.True(t, o.Result.Timeout)
		require.Equal(t, attach.ID, o.Result.WaiterID)
		require.False(t, now.Before(attachDeadline), "fired at %s, before its deadline %s", now, attachDeadline)
		require.Less(t, now.Sub(attachDeadline), 5*time.Second, "fired long after its deadline")

		// Nobody watches the last one: it still ends at its deadline.
		eventually(t, margin+15*time.Second, func() bool {
			return e.runWaiter(run, swept.ID).State == "TIMED_OUT"
		}, "waiter %s should time out", swept.ID)
		require.False(t, e.clock.Now().Before(sweptDeadline))
		eventually(t, 10*time.Second, func() bool {
			w, err := e.svc.Store.WaiterGet(ctxT(t), swept.ID)
			require.NoError(t, err)
			return w.State == models.WaiterTimedOut
		}, "the sweeper should end %s TIMED_OUT in the database", swept.ID)
	})
}

// ---------------------------------------------------------------- rule 11

// Rule 11: cancel moves a started run to RUN_CANCELED, ends its waiters
// CANCELED (live subscribers get RUN_NOT_ACTIVE) and drops its lookback
// events. Afterwards the run refuses new waits, cancel and finishRun; a
// durable step that had ended before still returns its result.
func TestRule11Cancel(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		evLive, evEph, evDone, evSlow, evDetached, evLb := uid("live"), uid("eph"), uid("done"), uid("slow"), uid("detached"), uid("lb")
		c := e.dial(gqlclient.TransportWS)

		// A step that ended NOTIFIED and one that ended TIMED_OUT before the cancel.
		done := e.subscribe(c, evDone, waitOpts{run: run, step: "done"})
		e.awaitWaiting(evDone, 1)
		nDone := e.notify(evDone, "done before", run)
		rDone := mustResult(t, done)
		rSlow := mustResult(t, e.subscribe(c, evSlow, waitOpts{run: run, step: "slow", timeout: "1s"}))
		require.True(t, rSlow.Timeout)

		// A durable waiter nobody watches, live subscribers, a run-less
		// waiter on the same event id, another run's waiter, a lookback event.
		cd := e.dial(gqlclient.LegacyWS)
		e.subscribe(cd, evDetached, waitOpts{run: run, step: "detached"})
		detached := e.awaitWaiting(evDetached, 1)[0]
		require.NoError(t, cd.CloseNow())
		durable := e.subscribe(c, evLive, waitOpts{run: run, step: "live"})
		eph := e.subscribe(c, evEph, waitOpts{run: run})
		runless := e.subscribe(c, evLive, waitOpts{})
		other := e.trigger()
		otherSub := e.subscribe(c, evLive, waitOpts{run: other})
		e.awaitWaiting(evLive, 3)
		e.awaitWaiting(evEph, 1)
		require.NotNil(t, e.notify(evLb, "pending", run).Lookback)
		require.Len(t, e.run(run).LookbackEvents, 1)

		var out struct {
			Cancel runView `json:"cancel"`
		}
		e.ok(cancelMutation, map[string]any{"id": run}, &out)
		require.Equal(t, "RUN_CANCELED", out.Cancel.State)
		require.Equal(t, run, out.Cancel.WorkflowRunID)

		for name, s := range map[string]*gqlclient.Sub{"durable": durable, "ephemeral": eph} {
			o := result(t, s, 15*time.Second)
			require.Nil(t, o.Result, name)
			require.Equal(t, "RUN_NOT_ACTIVE", o.code(), "%s subscriber: errors %+v", name, o.Errors)
		}
		quiet(t, runless)
		quiet(t, otherSub)
		ws := e.waiters(evLive)
		require.Len(t, ws, 2, "the run-less waiter and the other run's waiter still wait")
		for _, w := range ws {
			require.True(t, w.WorkflowRunID == nil || *w.WorkflowRunID == other, "%+v", w)
		}
		require.Empty(t, e.waiters(evEph))
		require.Empty(t, e.waiters(evDetached))

		r := e.run(run)
		require.Equal(t, "RUN_CANCELED", r.State)
		require.Empty(t, r.LookbackEvents)
		require.Empty(t, e.storedLookback(run), "cancel drops the lookback rows")
		states := map[string]string{}
		for _, w := range r.Waiters {
			states[w.ID] = w.State
			require.NotEqual(t, "WAITING", w.State, "waiter %s of a canceled run", w.ID)
		}
		require.Equal(t, "CANCELED", states[detached.ID])
		require.Equal(t, "NOTIFIED", states[rDone.WaiterID], "an ended waiter keeps its end")
		require.Equal(t, "TIMED_OUT", states[rSlow.WaiterID])
		canceled := 0
		for _, s := range states {
			if s == "CANCELED" {
				canceled++
			}
		}
		require.Equal(t, 3, canceled, "detached, live and ephemeral waiters end CANCELED: %v", states)

		// The ended run refuses everything that would change it.
		e.fails("RUN_NOT_ACTIVE", cancelMutation, map[string]any{"id": run})
		e.fails("RUN_NOT_ACTIVE", finishMutation, map[string]any{"id": run, "state": "RUN_SUCCESS"})
		e.fails("RUN_NOT_ACTIVE", notifyMutation, map[string]any{"ev": evLb, "run": run})
		e.waitFails(c, "RUN_NOT_ACTIVE", uid("new"), waitOpts{run: run})
		e.waitFails(c, "RUN_NOT_ACTIVE", uid("new"), waitOpts{run: run, step: "new-step"})
		e.waitFails(c, "RUN_NOT_ACTIVE", evLb, waitOpts{run: run})
		require.Equal(t, "RUN_CANCELED", e.run(run).State)

		// Re-attaching to steps that had ended still returns their results.
		again := mustResult(t, e.subscribe(c, evDone, waitOpts{run: run, step: "done"}))
		require.Equal(t, rDone.WaiterID, again.WaiterID)
		require.Equal(t, nDone.NotifyResponse[0].MessageID, *again.MessageID)
		require.Equal(t, `"done before"`, string(again.EventData))
		slowAgain := mustResult(t, e.subscribe(c, evSlow, waitOpts{run: run, step: "slow"}))
		require.True(t, slowAgain.Timeout)
		require.Equal(t, rSlow.WaiterID, slowAgain.WaiterID)
		// A step the cancel ended answers with the cancel.
		e.waitFails(c, "RUN_NOT_ACTIVE", evDetached, waitOpts{run: run, step: "detached"})
		e.waitFails(c, "RUN_NOT_ACTIVE", evLive, waitOpts{run: run, step: "live"})

		// Unknown run.
		e.fails("NOT_FOUND", cancelMutation, map[string]any{"id": "wfr_" + uid("nope")})
	})
}

// Rule 11: finishRun ends a run with RUN_SUCCESS or RUN_FAILED like cancel
// does and keeps its result; RUN_STARTED is refused; unknown run NOT_FOUND.
func TestRule11FinishRun(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		c := e.dial(gqlclient.TransportWS)
		results := map[string]string{
			"RUN_SUCCESS": `{"total":12.5,"items":[1,"two",null,true],"note":"héllo ✓"}`,
			"RUN_FAILED":  `{"error":"card declined","code":402}`,
		}
		for state, want := range results {
			run := e.trigger()
			ev, evDone, evLb := uid("ev"), uid("done"), uid("lb")

			done := e.subscribe(c, evDone, waitOpts{run: run, step: "done"})
			e.awaitWaiting(evDone, 1)
			nDone := e.notify(evDone, 7, run)
			mustResult(t, done)

			durable := e.subscribe(c, ev, waitOpts{run: run, step: "pending"})
			eph := e.subscribe(c, ev, waitOpts{run: run})
			e.awaitWaiting(ev, 2)
			require.NotNil(t, e.notify(evLb, "pending", run).Lookback)

			// RUN_STARTED is not an end.
			e.fails("BAD_USER_INPUT", finishMutation, map[string]any{"id": run, "state": "RUN_STARTED", "result": rawJSON(want)})
			require.Equal(t, "RUN_STARTED", e.run(run).State)
			require.Len(t, e.waiters(ev), 2, "a refused finishRun changes nothing")
			require.Len(t, e.run(run).LookbackEvents, 1)

			var out struct {
				FinishRun runView `json:"finishRun"`
			}
			e.ok(finishMutation, map[string]any{"id": run, "state": state, "result": rawJSON(want)}, &out)
			require.Equal(t, state, out.FinishRun.State)
			require.JSONEq(t, want, string(out.FinishRun.Result))

			for name, s := range map[string]*gqlclient.Sub{"durable": durable, "ephemeral": eph} {
				o := result(t, s, 15*time.Second)
				require.Nil(t, o.Result, "%s/%s", state, name)
				require.Equal(t, "RUN_NOT_ACTIVE", o.code(), "%s/%s: errors %+v", state, name, o.Errors)
			}
			require.Empty(t, e.waiters(ev))

			r := e.run(run)
			require.Equal(t, state, r.State)
			require.JSONEq(t, want, string(r.Result), "result round-trips")
			require.Empty(t, r.LookbackEvents)
			require.Empty(t, e.storedLookback(run), "%s drops the lookback rows", state)
			for _, w := range r.Waiters {
				if w.StepName != nil && *w.StepName == "done" {
					require.Equal(t, "NOTIFIED", w.State)
				} else {
					require.Equal(t, "CANCELED", w.State, "waiter %s", w.ID)
				}
			}

			// Ended: no more ends, no new waits; an ended step still answers.
			e.fails("RUN_NOT_ACTIVE", finishMutation, map[string]any{"id": run, "state": "RUN_FAILED"})
			e.fails("RUN_NOT_ACTIVE", finishMutation, map[string]any{"id": run, "state": state, "result": rawJSON(want)})
			e.fails("RUN_NOT_ACTIVE", cancelMutation, map[string]any{"id": run})
			e.waitFails(c, "RUN_NOT_ACTIVE", uid("new"), waitOpts{run: run})
			e.waitFails(c, "RUN_NOT_ACTIVE", uid("new"), waitOpts{run: run, step: "new-step"})
			again := mustResult(t, e.subscribe(c, evDone, waitOpts{run: run, step: "done"}))
			require.Equal(t, nDone.NotifyResponse[0].MessageID, *again.MessageID)
			require.Equal(t, `7`, string(again.EventData))

			// Still the first result and state after the refusals.
			r = e.run(run)
			require.Equal(t, state, r.State)
			require.JSONEq(t, want, string(r.Result))
		}

		// Without a result: null.
		run := e.trigger()
		var out struct {
			FinishRun runView `json:"finishRun"`
		}
		e.ok(finishMutation, map[string]any{"id": run, "state": "RUN_SUCCESS"}, &out)
		require.Equal(t, "RUN_SUCCESS", out.FinishRun.State)
		require.True(t, isNullJSON(out.FinishRun.Result))

		e.fails("NOT_FOUND", finishMutation, map[string]any{"id": "wfr_" + uid("nope"), "state": "RUN_SUCCESS"})
		e.fails("NOT_FOUND", cancelMutation, map[string]any{"id": uid("nope")})
	})
}

// ---------------------------------------------------------------- rule 12

// Rule 12: by default a lookback event is kept 7 days: delivered just before,
// not after.
func TestRule12DefaultRetention(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		evIn, evOut := uid("in"), uid("out")

		lbIn := e.notify(evIn, "kept", run).Lookback
		require.NotNil(t, lbIn)
		require.Equal(t, 7*24*time.Hour, parseTime(t, lbIn.ExpiresAt).Sub(parseTime(t, lbIn.CreatedAt)))
		lbOut := e.notify(evOut, "expired", run).Lookback
		require.NotNil(t, lbOut)
		require.Equal(t, 7*24*time.Hour, parseTime(t, lbOut.ExpiresAt).Sub(parseTime(t, lbOut.CreatedAt)))

		c := e.dial(gqlclient.TransportWS)
		e.clock.Advance(7*24*time.Hour - time.Minute)
		require.Len(t, e.run(run).LookbackEvents, 2)
		r := mustResult(t, e.subscribe(c, evIn, waitOpts{run: run}))
		require.Equal(t, `"kept"`, string(r.EventData))
		require.Equal(t, lbIn.MessageID, *r.MessageID)

		e.clock.Advance(2 * time.Minute)
		require.Empty(t, e.run(run).LookbackEvents)
		s := e.subscribe(c, evOut, waitOpts{run: run})
		e.awaitWaiting(evOut, 1)
		quiet(t, s)
		eventually(t, 10*time.Second, func() bool { return len(e.storedLookback(run)) == 0 },
			"the expired lookback event should be purged")
	})
}

// Rule 12: retention is configurable; an expired lookback event is never
// delivered, even before the purge has run, and is then purged; unexpired
// ones are left alone.
func TestRule12ExpiredNeverDeliveredAndPurged(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db, func(c *service.Config) { c.Engine.LookbackRetention = time.Hour })
		run := e.trigger()
		evOld, evLive := uid("old"), uid("live")

		lbOld := e.notify(evOld, "old", run).Lookback
		require.NotNil(t, lbOld)
		require.Equal(t, time.Hour, parseTime(t, lbOld.ExpiresAt).Sub(parseTime(t, lbOld.CreatedAt)))

		// Expire it while the service is down and come back without the purge.
		e.stop()
		e.clock.Advance(time.Hour + time.Second)
		e.startWithoutLoops()
		require.Equal(t, []string{lbOld.ID}, lookbackIDs(e.storedLookback(run)), "not purged yet (no sweeper running)")
		require.Empty(t, e.run(run).LookbackEvents, "an expired lookback event is not listed")

		c := e.dial(gqlclient.TransportWS)
		s := e.subscribe(c, evOld, waitOpts{run: run})
		w := e.awaitWaiting(evOld, 1)[0]
		quiet(t, s)
		require.Equal(t, run, *w.WorkflowRunID)
		n := e.notify(evOld, "new", run)
		require.Len(t, n.NotifyResponse, 1, "the waiter waited: the notify resolves it")
		r := mustResult(t, s)
		require.Equal(t, `"new"`, string(r.EventData), "the expired event is never delivered")
		require.NotEqual(t, lbOld.MessageID, *r.MessageID)

		// A fresh event is stored; the purge removes only the expired one.
		lbLive := e.notify(evLive, "live", run).Lookback
		require.NotNil(t, lbLive)
		e.svc.Start(context.Background())
		eventually(t, 10*time.Second, func() bool {
			ids := lookbackIDs(e.storedLookback(run))
			return len(ids) == 1 && ids[0] == lbLive.ID
		}, "the expired lookback event should be purged, the live one kept")
		lbs := e.run(run).LookbackEvents
		require.Len(t, lbs, 1)
		require.Equal(t, lbLive.ID, lbs[0].ID)

		// Expiry while the service runs: the sweeper purges it too, and a
		// wait after the expiry waits.
		e.clock.Advance(time.Hour + time.Second)
		require.Empty(t, e.run(run).LookbackEvents)
		s2 := e.subscribe(c, evLive, waitOpts{run: run})
		e.awaitWaiting(evLive, 1)
		quiet(t, s2)
		eventually(t, 10*time.Second, func() bool { return len(e.storedLookback(run)) == 0 },
			"the second expired lookback event should be purged")
		e.notify(evLive, "fresh", "")
		require.Equal(t, `"fresh"`, string(mustResult(t, s2).EventData))
	})
}

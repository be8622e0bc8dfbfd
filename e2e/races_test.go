package e2e

// Races: rule 5 (a targeted notify racing a waitForEvent of the same run),
// rule 9 (a waiter ends once: notify, cancel and timeout race by
// compare-and-set) and a broadcast notify racing waiter registrations.
//
// Each test runs hundreds of races in concurrent batches over a handful of
// multiplexed websocket connections. The calls of a race run on goroutines of
// their own, which must not fail the test (only the test's goroutine may), so
// they only record what they saw; the checks run on the test's goroutine
// afterwards and collect every broken race before failing, so that a bug
// shows how often and in which way it happens.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
)

// ---- calls that are safe off the test's goroutine

// raceCtx bounds every call of a race test.
func raceCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// raceNotifyCall is what one notify returned: a result, GraphQL errors, or a
// transport failure.
type raceNotifyCall struct {
	view   notifyView
	errors []gqlclient.Error
	err    error
}

func (c raceNotifyCall) code() string {
	if len(c.errors) == 0 {
		return ""
	}
	return c.errors[0].Code()
}

func (c raceNotifyCall) ok() bool { return c.err == nil && len(c.errors) == 0 }

func (c raceNotifyCall) String() string {
	if c.err != nil {
		return "transport error: " + c.err.Error()
	}
	if len(c.errors) > 0 {
		return fmt.Sprintf("errors %+v", c.errors)
	}
	b, _ := json.Marshal(c.view)
	return string(b)
}

// racePostNotify sends a notify (run "" broadcasts) and records the answer.
func racePostNotify(ctx context.Context, endpoint, eventID string, data any, run string) raceNotifyCall {
	return notifyCallOf(gqlclient.Post(ctx, endpoint, notifyMutation, notifyVars(eventID, data, run)))
}

// notifyVars are notifyMutation's variables; run "" broadcasts.
func notifyVars(eventID string, data any, run string) map[string]any {
	vars := map[string]any{"ev": eventID, "data": data}
	if run != "" {
		vars["run"] = run
	}
	return vars
}

// notifyCallOf records the answer to a notifyMutation.
func notifyCallOf(r *gqlclient.Response, err error) raceNotifyCall {
	if err != nil {
		return raceNotifyCall{err: err}
	}
	c := raceNotifyCall{errors: r.Errors}
	if len(r.Errors) == 0 {
		var out struct {
			Notify notifyView `json:"notify"`
		}
		c.err = r.Decode(&out)
		c.view = out.Notify
	}
	return c
}

const raceCancelMutation = `mutation($id: ID!) { cancel(workflowRunId: $id) { workflowRunId state } }`

// racePostCancel cancels a run; it returns the GraphQL errors, or the transport failure.
func racePostCancel(ctx context.Context, endpoint, run string) ([]gqlclient.Error, error) {
	r, err := gqlclient.Post(ctx, endpoint, raceCancelMutation, map[string]any{"id": run})
	if err != nil {
		return nil, err
	}
	return r.Errors, nil
}

// raceReadOutcome reads a subscription to its end like result does, but reports
// trouble instead of failing the test: a second payload, a stream that does
// not end in time, a dropped connection.
func raceReadOutcome(ctx context.Context, s *gqlclient.Sub) (outcome, error) {
	var o outcome
	for {
		var (
			ev  gqlclient.Event
			err error
		)
		// What has arrived counts even when the deadline has passed (a
		// deadline shared by many reads may have been used up by another).
		select {
		case e, open := <-s.C:
			ev = e
			if !open {
				err = fmt.Errorf("connection closed")
			}
		default:
			ev, err = s.Next(ctx)
		}
		if err != nil {
			return o, fmt.Errorf("subscription %s: %w (so far %s)", s.ID, err, raceDescribe(o))
		}
		switch {
		case ev.Complete:
			o.Completed = true
			return o, nil
		case ev.Errors != nil:
			if o.Result != nil {
				return o, fmt.Errorf("subscription %s: errors %+v after the result %s", s.ID, ev.Errors, raceDescribe(o))
			}
			o.Errors = ev.Errors
			return o, nil
		case ev.Response != nil:
			if o.Result != nil || len(o.Errors) > 0 {
				return o, fmt.Errorf("subscription %s: a second payload %s after %s", s.ID, ev.Response.Data, raceDescribe(o))
			}
			if len(ev.Response.Errors) > 0 {
				o.Errors = ev.Response.Errors
				continue
			}
			var d struct {
				WaitForEvent *waitResult `json:"waitForEvent"`
			}
			if err := ev.Response.Decode(&d); err != nil {
				return o, fmt.Errorf("subscription %s: decode %s: %w", s.ID, ev.Response.Data, err)
			}
			if d.WaitForEvent == nil {
				return o, fmt.Errorf("subscription %s: null payload without errors", s.ID)
			}
			o.Result = d.WaitForEvent
		}
	}
}

func raceDescribe(o outcome) string {
	var parts []string
	if o.Result != nil {
		b, _ := json.Marshal(o.Result)
		parts = append(parts, "result "+string(b))
	}
	if len(o.Errors) > 0 {
		parts = append(parts, fmt.Sprintf("errors %+v", o.Errors))
	}
	if o.Completed {
		parts = append(parts, "completed")
	}
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, ", ")
}

// ---- helpers on the test's goroutine

// raceDial opens n websocket connections, alternating the two protocols.
func (e *env) raceDial(n int) []*gqlclient.Conn {
	e.t.Helper()
	conns := make([]*gqlclient.Conn, n)
	for i := range conns {
		p := gqlclient.TransportWS
		if i%2 == 1 {
			p = gqlclient.LegacyWS
		}
		conns[i] = e.dial(p)
	}
	return conns
}

// raceTrigger creates n runs concurrently and returns their ids.
func (e *env) raceTrigger(ctx context.Context, n int) []string {
	e.t.Helper()
	ids := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			r, err := gqlclient.Post(ctx, e.endpoint, triggerMutation, map[string]any{"id": uid("race")})
			if err == nil && len(r.Errors) > 0 {
				err = fmt.Errorf("trigger: %+v", r.Errors)
			}
			if err != nil {
				errs[i] = err
				return
			}
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			if errs[i] = r.Decode(&out); errs[i] == nil {
				ids[i] = out.Trigger.WorkflowRunID
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(e.t, err)
	}
	return ids
}

// raceRuns reads many runs in one request (aliases), in chunks; the result is
// in the order of ids and every run must exist.
func (e *env) raceRuns(ids []string) []*runView {
	e.t.Helper()
	out := make([]*runView, 0, len(ids))
	for start := 0; start < len(ids); start += 50 {
		chunk := ids[start:min(start+50, len(ids))]
		var q strings.Builder
		q.WriteString("query(")
		vars := map[string]any{}
		for i, id := range chunk {
			fmt.Fprintf(&q, "$id%d: ID! ", i)
			vars[fmt.Sprintf("id%d", i)] = id
		}
		q.WriteString(") {")
		for i := range chunk {
			fmt.Fprintf(&q, " r%d: workflowRun(workflowRunId: $id%d) { ...raceRun }", i, i)
		}
		q.WriteString(` }
fragment raceRun on WorkflowRun {
  workflowRunId state
  waiters { id eventId workflowRunId stepName state deadline createdAt }
  lookbackEvents { id eventId eventData messageId createdAt expiresAt }
  steps { stepName type eventId completedAt }
}`)
		var got map[string]*runView
		e.ok(q.String(), vars, &got)
		for i, id := range chunk {
			v := got[fmt.Sprintf("r%d", i)]
			require.NotNil(e.t, v, "run %s", id)
			out = append(out, v)
		}
	}
	return out
}

// raceProblems collects broken races so that a failure reports all of them.
type raceProblems struct {
	t    *testing.T
	list []string
}

func (p *raceProblems) addf(format string, args ...any) {
	p.list = append(p.list, fmt.Sprintf(format, args...))
}

// report fails the test with the first problems and their number.
func (p *raceProblems) report(what string, total int) {
	p.t.Helper()
	if len(p.list) == 0 {
		return
	}
	shown := p.list[:min(len(p.list), 15)]
	p.t.Errorf("%d problems in %d %s:\n  %s", len(p.list), total, what, strings.Join(shown, "\n  "))
}

// raceSameJSON compares two JSON texts by value.
func raceSameJSON(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xa, _ := json.Marshal(x)
	ya, _ := json.Marshal(y)
	return bytes.Equal(xa, ya)
}

// raceJSON renders v for a failure message.
func raceJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("%+v", v)
	}
	return string(b)
}

func raceIsNull(b json.RawMessage) bool { return len(b) == 0 || string(b) == "null" }

func raceStr(p *string) string {
	if p == nil {
		return "<nil>"
	}
	return *p
}

// raceSpin yields the processor n times: a skew of a few scheduling slots, not
// a wait for anything.
func raceSpin(n int) {
	for range n {
		runtime.Gosched()
	}
}

// ---- rule 5

// race5 is one targeted notify racing one waitForEvent of the same run.
type race5 struct {
	n            int
	run, eventID string
	data         map[string]any
	sub          *gqlclient.Sub
	subErr       error
	notify       raceNotifyCall
	out          outcome
	outErr       error
}

// Rule 5: a targeted notify racing a waitForEvent of the same run (any
// order) delivers the event exactly once: it resolved the waiter, or it was
// stored and the waiter consumed it. Never both, never neither.
func TestRule5TargetedNotifyRacesWait(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		raceRule5(t, newEnv(t, db), "", 320, 40)
	})
}

// Rule 5 with a durable step: the same races, the subscriber a
// waitForEvent with stepName; afterwards re-attaching to the step returns
// the same single delivery.
func TestRule5TargetedNotifyRacesDurableWait(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		raceRule5(t, newEnv(t, db), "await-payment", 200, 40)
	})
}

func raceRule5(t *testing.T, e *env, step string, total, batch int) {
	ctx := raceCtx(t, 3*time.Minute)
	conns := e.raceDial(4)
	p := &raceProblems{t: t}
	var resolved, stored, ran int
	var byHeadStart [3][2]int // [none, subscription, notify][resolved, stored]
	began := time.Now()
	for done := 0; done < total; done += batch {
		n := min(batch, total-done)
		runs := e.raceTrigger(ctx, n)
		races := make([]*race5, n)
		for i := range races {
			races[i] = &race5{
				n: done + i, run: runs[i], eventID: uid("paid"),
				data: map[string]any{"race": done + i, "nonce": uid("data"), "unicode": "ünï ✓"},
			}
		}

		// Release every subscribe and notify of the batch at once; a
		// third of the races give the subscription, a third the notify a
		// few scheduling slots of head start, so both orders happen.
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, r := range races {
			c := conns[i%len(conns)]
			wg.Add(2)
			go func() {
				defer wg.Done()
				<-start
				if r.n%3 == 1 {
					raceSpin(20)
				}
				r.sub, r.subErr = c.Subscribe(ctx, waitSubscription, waitVars(r.eventID, waitOpts{run: r.run, step: step}))
			}()
			go func() {
				defer wg.Done()
				<-start
				if r.n%3 == 2 {
					raceSpin(20)
				}
				r.notify = racePostNotify(ctx, e.endpoint, r.eventID, r.data, r.run)
			}()
		}
		close(start)
		wg.Wait()

		readCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
		for _, r := range races {
			if r.subErr == nil {
				r.out, r.outErr = raceReadOutcome(readCtx, r.sub)
			}
		}
		cancel()

		views := e.raceRuns(runs)
		for i, r := range races {
			switch r.check(p, views[i], step) {
			case "resolved":
				resolved++
				byHeadStart[r.n%3][0]++
			case "stored":
				stored++
				byHeadStart[r.n%3][1]++
			}
		}
		if step != "" {
			raceRule5Reattach(ctx, p, conns, races, step)
		}
		ran += n
		if len(p.list) > 0 {
			break // a broken batch says enough; don't wait out the others
		}
	}
	t.Logf("%s: %d races in %s: %d notifies resolved the waiter, %d were stored and consumed as lookback "+
		"(resolved/stored: released together %d/%d, subscription ahead %d/%d, notify ahead %d/%d)",
		e.dialect, ran, time.Since(began).Round(time.Millisecond), resolved, stored,
		byHeadStart[0][0], byHeadStart[0][1], byHeadStart[1][0], byHeadStart[1][1], byHeadStart[2][0], byHeadStart[2][1])
	p.report("rule 5 races", ran)
	require.Equal(t, ran, resolved+stored, "every race must end one of the two ways")
}

// check returns "resolved" or "stored", or "" after recording why the race
// broke rule 5.
func (r *race5) check(p *raceProblems, run *runView, step string) string {
	before := len(p.list)
	fail := func(format string, args ...any) {
		p.addf("race %d (run %s): %s", r.n, r.run, fmt.Sprintf(format, args...))
	}
	want, _ := json.Marshal(r.data)

	// The notify: exactly one of the two ways.
	var way, messageID, waiterID string
	n := r.notify
	switch {
	case !n.ok():
		fail("notify failed: %s", n)
	case len(n.view.NotifyResponse) == 1 && n.view.Lookback == nil:
		way = "resolved"
		resp := n.view.NotifyResponse[0]
		messageID, waiterID = resp.MessageID, resp.Waiter.ID
		if resp.Waiter.State != "NOTIFIED" || raceStr(resp.Waiter.WorkflowRunID) != r.run || resp.Waiter.EventID != r.eventID {
			fail("notify resolved a waiter that is not this race's, NOTIFIED: %s", n)
		}
		if messageID == "" {
			fail("notify response without messageId: %s", n)
		}
	case len(n.view.NotifyResponse) == 0 && n.view.Lookback != nil:
		way = "stored"
		lb := n.view.Lookback
		messageID = lb.MessageID
		if lb.EventID != r.eventID || !raceSameJSON(lb.EventData, want) || messageID == "" {
			fail("stored lookback is not this race's event: %s", n)
		}
	case len(n.view.NotifyResponse) == 0:
		fail("notify neither resolved a waiter nor stored a lookback event: %s", n)
	default:
		fail("notify both resolved waiters and stored a lookback event, or resolved several: %s", n)
	}

	// The subscriber: exactly one result, this race's event.
	o := r.out
	switch {
	case r.subErr != nil:
		fail("subscribe: %v", r.subErr)
	case r.outErr != nil:
		fail("subscriber: %v", r.outErr)
	case len(o.Errors) > 0 || o.Result == nil || !o.Completed:
		fail("subscriber wanted one result then complete, got %s", raceDescribe(o))
	default:
		res := o.Result
		if res.Timeout || !raceSameJSON(res.EventData, want) {
			fail("subscriber got %s, want eventData %s", raceDescribe(o), want)
		}
		if messageID != "" && raceStr(res.MessageID) != messageID {
			fail("subscriber got messageId %s, the notify (%s) has %s", raceStr(res.MessageID), way, messageID)
		}
		if waiterID != "" && res.WaiterID != waiterID {
			fail("subscriber's waiter is %s, the notify resolved %s", res.WaiterID, waiterID)
		}
		if raceStr(res.WorkflowRunID) != r.run || (step != "" && raceStr(res.StepName) != step) || res.NotifiedAt == nil {
			fail("subscriber's result names the wrong run or step, or no notifiedAt: %s", raceDescribe(o))
		}
		waiterID = res.WaiterID
	}

	// The run: the event was consumed, and its one waiter is NOTIFIED.
	if len(run.LookbackEvents) != 0 {
		fail("lookback events left on the run: %s", raceJSON(run.LookbackEvents))
	}
	for _, w := range run.Waiters {
		if w.State != "NOTIFIED" || (waiterID != "" && w.ID != waiterID) {
			fail("run's waiters should be the subscriber's, NOTIFIED: %s", raceJSON(run.Waiters))
			break
		}
	}
	if step != "" {
		if len(run.Waiters) != 1 {
			fail("a durable step keeps its one waiter; the run has %s", raceJSON(run.Waiters))
		}
		if len(run.Steps) != 1 || run.Steps[0].StepName != step || run.Steps[0].Type != "WAIT_FOR_EVENT" || run.Steps[0].CompletedAt == nil {
			fail("want one completed WAIT_FOR_EVENT step %q, got %s", step, raceJSON(run.Steps))
		}
	}
	if len(p.list) > before {
		return ""
	}
	return way
}

// raceRule5Reattach subscribes again to every race's durable step: each must
// return the same delivery at once, not a second one.
func raceRule5Reattach(ctx context.Context, p *raceProblems, conns []*gqlclient.Conn, races []*race5, step string) {
	subs := make([]*gqlclient.Sub, len(races))
	errs := make([]error, len(races))
	for i, r := range races {
		subs[i], errs[i] = conns[i%len(conns)].Subscribe(ctx, waitSubscription, waitVars(r.eventID, waitOpts{run: r.run, step: step}))
	}
	readCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for i, r := range races {
		if errs[i] != nil {
			p.addf("race %d: re-attach: %v", r.n, errs[i])
			continue
		}
		o, err := raceReadOutcome(readCtx, subs[i])
		if err != nil {
			p.addf("race %d: re-attach: %v", r.n, err)
			continue
		}
		first := r.out.Result
		if first == nil || o.Result == nil || len(o.Errors) > 0 {
			p.addf("race %d: re-attach got %s after %s", r.n, raceDescribe(o), raceDescribe(r.out))
			continue
		}
		if o.Result.WaiterID != first.WaiterID || raceStr(o.Result.MessageID) != raceStr(first.MessageID) || !raceSameJSON(o.Result.EventData, first.EventData) {
			p.addf("race %d: re-attach got %s, the first subscriber %s", r.n, raceDescribe(o), raceDescribe(r.out))
		}
	}
}

// ---- rule 9: notify racing cancel

type raceCancel struct {
	n          int
	run, step  string
	data       map[string]any
	sub        *gqlclient.Sub
	notify     raceNotifyCall
	cancelErrs []gqlclient.Error
	cancelErr  error
	out        outcome
	outErr     error
}

// Rule 9 (and 11): a waiter ends once. A targeted notify and a cancel of the
// run race; the waiter ends NOTIFIED (the subscriber has the notify's
// message, the notify lists the waiter) or CANCELED (the subscriber gets
// RUN_NOT_ACTIVE and the notify failed RUN_NOT_ACTIVE or delivered nothing
// that survives), never both, and the subscriber's outcome is the waiter's
// final state.
func TestRule9NotifyRacesCancel(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ctx := raceCtx(t, 3*time.Minute)
		conns := e.raceDial(4)
		p := &raceProblems{t: t}
		const total, batch = 200, 40
		var notified, canceled, notifyFailed, ran int
		began := time.Now()
		for done := 0; done < total; done += batch {
			eventID := uid("approved")
			runs := e.raceTrigger(ctx, batch)
			races := make([]*raceCancel, batch)
			for i := range races {
				r := &raceCancel{n: done + i, run: runs[i], data: map[string]any{"race": done + i, "nonce": uid("data")}}
				if i%2 == 0 {
					r.step = "await-approval" // half durable, half not
				}
				r.sub = e.subscribe(conns[i%len(conns)], eventID, waitOpts{run: r.run, step: r.step})
				races[i] = r
			}
			e.awaitWaiting(eventID, batch)

			start := make(chan struct{})
			var wg sync.WaitGroup
			for _, r := range races {
				wg.Add(2)
				go func() {
					defer wg.Done()
					<-start
					if r.n%3 == 1 {
						raceSpin(20)
					}
					r.notify = racePostNotify(ctx, e.endpoint, eventID, r.data, r.run)
				}()
				go func() {
					defer wg.Done()
					<-start
					if r.n%3 == 2 {
						raceSpin(20)
					}
					r.cancelErrs, r.cancelErr = racePostCancel(ctx, e.endpoint, r.run)
				}()
			}
			close(start)
			wg.Wait()

			readCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
			for _, r := range races {
				r.out, r.outErr = raceReadOutcome(readCtx, r.sub)
			}
			cancel()

			views := e.raceRuns(runs)
			for i, r := range races {
				switch r.check(p, views[i]) {
				case "NOTIFIED":
					notified++
				case "CANCELED":
					canceled++
					if !r.notify.ok() {
						notifyFailed++
					}
				}
			}
			raceCancelReattach(ctx, p, conns, races, eventID)
			ran += batch
			if len(p.list) > 0 {
				break
			}
		}
		t.Logf("%s: %d notify/cancel races in %s: %d waiters NOTIFIED, %d CANCELED (%d of those with the notify refused RUN_NOT_ACTIVE)",
			e.dialect, ran, time.Since(began).Round(time.Millisecond), notified, canceled, notifyFailed)
		p.report("notify/cancel races", ran)
		require.Equal(t, ran, notified+canceled)
	})
}

// check returns the waiter's final state, or "" after recording why the
// race broke rule 9.
func (r *raceCancel) check(p *raceProblems, run *runView) string {
	before := len(p.list)
	fail := func(format string, args ...any) {
		p.addf("race %d (run %s): %s", r.n, r.run, fmt.Sprintf(format, args...))
	}
	want, _ := json.Marshal(r.data)
	if r.cancelErr != nil || len(r.cancelErrs) > 0 {
		fail("cancel of a started run failed: %v %+v", r.cancelErr, r.cancelErrs)
	}
	if run.State != "RUN_CANCELED" {
		fail("run is %s after cancel", run.State)
	}
	if len(run.LookbackEvents) != 0 {
		fail("cancel drops lookback events, yet the run has %s", raceJSON(run.LookbackEvents))
	}
	if len(run.Waiters) != 1 {
		fail("want the run's one waiter, got %s", raceJSON(run.Waiters))
		return ""
	}
	w := run.Waiters[0]
	o := r.out
	if r.outErr != nil {
		fail("subscriber: %v", r.outErr)
		return ""
	}
	if o.Result != nil && len(o.Errors) > 0 {
		fail("subscriber got both a result and an error: %s", raceDescribe(o))
	}
	n := r.notify
	switch w.State {
	case "NOTIFIED":
		if !n.ok() || len(n.view.NotifyResponse) != 1 || n.view.Lookback != nil {
			fail("waiter NOTIFIED, but the notify did not list exactly it: %s", n)
			break
		}
		resp := n.view.NotifyResponse[0]
		if resp.Waiter.ID != w.ID {
			fail("waiter %s NOTIFIED, the notify lists %s", w.ID, resp.Waiter.ID)
		}
		switch {
		case o.Result == nil || len(o.Errors) > 0 || !o.Completed:
			fail("waiter NOTIFIED, the subscriber got %s", raceDescribe(o))
		case o.Result.Timeout || raceStr(o.Result.MessageID) != resp.MessageID || o.Result.WaiterID != w.ID || !raceSameJSON(o.Result.EventData, want):
			fail("waiter NOTIFIED by %s with %s, the subscriber got %s", resp.MessageID, want, raceDescribe(o))
		}
	case "CANCELED":
		switch {
		case n.err != nil:
			fail("notify: %v", n.err)
		case len(n.errors) > 0:
			if n.code() != "RUN_NOT_ACTIVE" {
				fail("waiter CANCELED; the notify failed with %s, want RUN_NOT_ACTIVE", n)
			}
		case len(n.view.NotifyResponse) > 0:
			fail("waiter CANCELED, yet the notify says it resolved %s", n)
		}
		if o.Result != nil || o.code() != "RUN_NOT_ACTIVE" {
			fail("waiter CANCELED, the subscriber got %s, want an error RUN_NOT_ACTIVE", raceDescribe(o))
		}
	default:
		fail("waiter ended %s; notify %s; subscriber %s", w.State, n, raceDescribe(o))
	}
	if len(p.list) > before {
		return ""
	}
	return w.State
}

// raceCancelReattach subscribes again to the durable steps of the races: a step
// that ended keeps its result (the notification, or RUN_NOT_ACTIVE).
func raceCancelReattach(ctx context.Context, p *raceProblems, conns []*gqlclient.Conn, races []*raceCancel, eventID string) {
	readCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for i, r := range races {
		if r.step == "" || r.outErr != nil {
			continue
		}
		s, err := conns[i%len(conns)].Subscribe(ctx, waitSubscription, waitVars(eventID, waitOpts{run: r.run, step: r.step}))
		if err != nil {
			p.addf("race %d: re-attach: %v", r.n, err)
			continue
		}
		o, err := raceReadOutcome(readCtx, s)
		switch {
		case err != nil:
			p.addf("race %d: re-attach: %v", r.n, err)
		case r.out.Result != nil:
			if o.Result == nil || raceStr(o.Result.MessageID) != raceStr(r.out.Result.MessageID) || o.Result.WaiterID != r.out.Result.WaiterID {
				p.addf("race %d: re-attach got %s, the first subscriber %s", r.n, raceDescribe(o), raceDescribe(r.out))
			}
		default:
			if o.Result != nil || o.code() != r.out.code() {
				p.addf("race %d: re-attach got %s, the first subscriber %s", r.n, raceDescribe(o), raceDescribe(r.out))
			}
		}
	}
}

// ---- rule 9: notify racing timeout

// raceTimeout is one waiter with a short timeout while broadcasts arrive.
type raceTimeout struct {
	n       int
	run     string
	timeout any
	sub     *gqlclient.Sub
	out     outcome
	outErr  error
}

// raceBroadcasts collects the broadcast notifies of a timeout round.
type raceBroadcasts struct {
	mu    sync.Mutex
	calls []raceBroadcast
}

type raceBroadcast struct {
	data []byte
	call raceNotifyCall
}

func (b *raceBroadcasts) send(ctx context.Context, endpoint, eventID string, k int) {
	data := map[string]any{"broadcast": k, "nonce": uid("data")}
	raw, _ := json.Marshal(data)
	c := racePostNotify(ctx, endpoint, eventID, data, "")
	b.mu.Lock()
	b.calls = append(b.calls, raceBroadcast{data: raw, call: c})
	b.mu.Unlock()
}

// Rule 9 (and 8): notify racing timeout. Waiters with short timeouts, spread
// over most of a second, while broadcasts arrive back to back:
// each waiter ends once, TIMED_OUT (the subscriber gets timeout: true,
// eventData null, and no notify lists it) or NOTIFIED (exactly one notify
// lists it and the subscriber has that notify's message and data).
//
// Real time: the subscriber's own timer races the notifies. Clock: timeouts
// of 5 (an Int, seconds), the engine clock advanced a third of the way
// through the deadlines, so that the sweeper and the deadline checks of
// notify race the broadcasts while the subscribers' own timers are still
// seconds away.
func TestRule9NotifyRacesTimeout(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ctx := raceCtx(t, 3*time.Minute)
		conns := e.raceDial(4)
		p := &raceProblems{t: t}
		var notified, timedOut, total int
		began := time.Now()

		// Real time: timeouts of 10..790 ms while broadcasts arrive back to back.
		for round := range 6 {
			const n = 40
			eventID := uid("deadline")
			runs := e.raceTrigger(ctx, n)
			races := make([]*raceTimeout, n)
			for i := range races {
				races[i] = &raceTimeout{n: total + i, run: runs[i], timeout: fmt.Sprintf("%dms", 10+20*((i*7+round*3)%40))}
			}
			roundCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
			var ended atomic.Int64
			var readers sync.WaitGroup
			start := make(chan struct{})
			for i, r := range races {
				readers.Add(1)
				go func() {
					defer readers.Done()
					defer ended.Add(1)
					<-start
					step := ""
					if r.n%2 == 0 {
						step = "await-deadline"
					}
					r.sub, r.outErr = conns[i%len(conns)].Subscribe(roundCtx, waitSubscription, waitVars(eventID, waitOpts{run: r.run, step: step, timeout: r.timeout}))
					if r.outErr == nil {
						r.out, r.outErr = raceReadOutcome(roundCtx, r.sub)
					}
				}()
			}
			var bs raceBroadcasts
			close(start)
			// Broadcast until every subscriber has its outcome.
			for k := 0; ended.Load() < n && roundCtx.Err() == nil; k++ {
				bs.send(roundCtx, e.endpoint, eventID, k)
			}
			readers.Wait()
			cancel()
			a, b := raceCheckTimeoutRound(p, e.raceRuns(runs), races, &bs)
			notified, timedOut, total = notified+a, timedOut+b, total+n
			if len(p.list) > 0 {
				break
			}
		}
		realNotified, realTimedOut := notified, timedOut

		// Clock: Int timeouts, the engine clock moved a third of the way through the deadlines.
		for round := 0; round < 3 && len(p.list) == 0; round++ {
			const n = 30
			eventID := uid("deadline")
			runs := e.raceTrigger(ctx, n)
			races := make([]*raceTimeout, n)
			for i, run := range runs {
				r := &raceTimeout{n: total + i, run: run, timeout: 5}
				step := ""
				if i%2 == 0 {
					step = "await-deadline"
				}
				r.sub = e.subscribe(conns[i%len(conns)], eventID, waitOpts{run: run, step: step, timeout: r.timeout})
				races[i] = r
			}
			ws := e.awaitWaiting(eventID, n)
			deadlines := make([]time.Time, len(ws))
			for i, w := range ws {
				d, err := time.Parse(time.RFC3339Nano, w.Deadline)
				require.NoError(t, err)
				deadlines[i] = d
			}
			sort.Slice(deadlines, func(i, j int) bool { return deadlines[i].Before(deadlines[j]) })
			if ahead := deadlines[n/3].Sub(e.clock.Now()); ahead > 0 {
				e.clock.Advance(ahead)
			}
			roundCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
			var ended atomic.Int64
			var readers sync.WaitGroup
			for _, r := range races {
				readers.Add(1)
				go func() {
					defer readers.Done()
					defer ended.Add(1)
					r.out, r.outErr = raceReadOutcome(roundCtx, r.sub)
				}()
			}
			var bs raceBroadcasts
			for k := 0; ended.Load() < n && roundCtx.Err() == nil; k++ {
				bs.send(roundCtx, e.endpoint, eventID, k)
			}
			readers.Wait()
			cancel()
			a, b := raceCheckTimeoutRound(p, e.raceRuns(runs), races, &bs)
			notified, timedOut, total = notified+a, timedOut+b, total+n
			if len(p.list) > 0 {
				break
			}
		}
		t.Logf("%s: %d notify/timeout races in %s: real time %d NOTIFIED, %d TIMED_OUT; moved clock %d NOTIFIED, %d TIMED_OUT",
			e.dialect, total, time.Since(began).Round(time.Millisecond), realNotified, realTimedOut, notified-realNotified, timedOut-realTimedOut)
		p.report("notify/timeout races", total)
		require.Equal(t, total, notified+timedOut)
	})
}

// raceCheckTimeoutRound matches every waiter's final state with the broadcasts'
// response lists and its subscriber's outcome.
func raceCheckTimeoutRound(p *raceProblems, views []*runView, races []*raceTimeout, bs *raceBroadcasts) (notified, timedOut int) {
	type listing struct {
		messageID string
		data      []byte
	}
	listed := map[string][]listing{}
	for _, b := range bs.calls {
		if !b.call.ok() {
			p.addf("broadcast failed: %s", b.call)
			continue
		}
		if b.call.view.Lookback != nil {
			p.addf("a broadcast stored a lookback event: %s", b.call)
		}
		for _, resp := range b.call.view.NotifyResponse {
			listed[resp.Waiter.ID] = append(listed[resp.Waiter.ID], listing{resp.MessageID, b.data})
		}
	}
	for i, r := range races {
		run := views[i]
		before := len(p.list)
		fail := func(format string, args ...any) {
			p.addf("race %d (run %s, timeout %v): %s", r.n, r.run, r.timeout, fmt.Sprintf(format, args...))
		}
		if r.outErr != nil {
			fail("subscriber: %v", r.outErr)
			continue
		}
		o := r.out
		if len(run.Waiters) != 1 {
			fail("want the run's one waiter, got %s (subscriber %s)", raceJSON(run.Waiters), raceDescribe(o))
			continue
		}
		w := run.Waiters[0]
		if len(o.Errors) > 0 || o.Result == nil || !o.Completed {
			fail("subscriber wanted one result then complete, got %s (waiter %s)", raceDescribe(o), w.State)
			continue
		}
		res := o.Result
		if res.WaiterID != w.ID {
			fail("subscriber's waiter %s is not the run's %s", res.WaiterID, w.ID)
		}
		ls := listed[w.ID]
		if len(ls) > 1 {
			fail("waiter resolved by %d notifies: %+v", len(ls), ls)
		}
		switch w.State {
		case "NOTIFIED":
			switch {
			case len(ls) == 0:
				fail("waiter NOTIFIED, but no notify lists it (subscriber %s)", raceDescribe(o))
			case res.Timeout || raceStr(res.MessageID) != ls[0].messageID || !raceSameJSON(res.EventData, ls[0].data):
				fail("waiter NOTIFIED by %s with %s, the subscriber got %s", ls[0].messageID, ls[0].data, raceDescribe(o))
			}
		case "TIMED_OUT":
			if len(ls) > 0 {
				fail("waiter TIMED_OUT, yet notify %s lists it (subscriber %s)", ls[0].messageID, raceDescribe(o))
			}
			if !res.Timeout || !raceIsNull(res.EventData) || res.MessageID != nil {
				fail("waiter TIMED_OUT, the subscriber got %s, want timeout: true, eventData null", raceDescribe(o))
			}
		default:
			fail("waiter ended %s, subscriber %s", w.State, raceDescribe(o))
		}
		if len(p.list) > before {
			continue
		}
		if w.State == "NOTIFIED" {
			notified++
		} else {
			timedOut++
		}
	}
	return notified, timedOut
}

// ---- broadcast racing registrations

type raceReg struct {
	n        int
	run      string
	step     string
	sub      *gqlclient.Sub
	subErr   error
	done     atomic.Bool
	out      outcome
	outErr   error
	finished chan struct{}
}

// Rule 2 under races: a broadcast notify released together with many
// waitForEvent registrations on its event id. Every waiter was either
// resolved by it (listed in its response, the subscriber has its message)
// or is still WAITING afterwards (the subscriber has nothing); a second
// broadcast then resolves exactly the rest. Nothing in between, nothing
// twice.
func TestRaceBroadcastVsRegistrations(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ctx := raceCtx(t, 3*time.Minute)
		conns := e.raceDial(4)
		p := &raceProblems{t: t}
		const rounds, n = 8, 40
		var first, second, ran int
		began := time.Now()
		for round := range rounds {
			eventID := uid("launch")
			runs := e.raceTrigger(ctx, n)
			races := make([]*raceReg, n)
			for i := range races {
				r := &raceReg{n: round*n + i, finished: make(chan struct{})}
				switch i % 3 {
				case 1:
					r.run = runs[i]
				case 2:
					r.run, r.step = runs[i], "await-launch"
				}
				races[i] = r
			}

			// The broadcast goes once `after` subscriptions were sent: from
			// none in the first round to nearly all in the last.
			after := int64(round * n / rounds)
			var sent atomic.Int64
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i, r := range races {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					r.sub, r.subErr = conns[i%len(conns)].Subscribe(ctx, waitSubscription, waitVars(eventID, waitOpts{run: r.run, step: r.step}))
					sent.Add(1)
					if r.subErr == nil {
						go func() {
							defer close(r.finished)
							r.out, r.outErr = raceReadOutcome(ctx, r.sub)
							r.done.Store(true)
						}()
					} else {
						close(r.finished)
					}
				}()
			}
			var b1 raceNotifyCall
			data1 := map[string]any{"round": round, "broadcast": 1, "nonce": uid("data")}
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				for sent.Load() < after {
					runtime.Gosched()
				}
				b1 = racePostNotify(ctx, e.endpoint, eventID, data1, "")
			}()
			close(start)
			wg.Wait()
			for _, r := range races {
				require.NoError(t, r.subErr)
			}
			require.True(t, b1.ok(), "broadcast: %s", b1)
			require.Nil(t, b1.view.Lookback, "a broadcast stores nothing")

			// Wait until every registration has happened: each waiter is
			// resolved by the broadcast or WAITING.
			inFirst := map[string]string{}
			for _, resp := range b1.view.NotifyResponse {
				if _, dup := inFirst[resp.Waiter.ID]; dup {
					p.addf("round %d: the broadcast lists waiter %s twice", round, resp.Waiter.ID)
				}
				inFirst[resp.Waiter.ID] = resp.MessageID
				if resp.Waiter.State != "NOTIFIED" || resp.Waiter.EventID != eventID {
					p.addf("round %d: the broadcast lists %s", round, raceJSON(resp.Waiter))
				}
			}
			var waiting []waiterView
			eventually(t, 15*time.Second, func() bool {
				waiting = e.waiters(eventID)
				return len(inFirst)+len(waiting) >= n
			}, "round %d: %d resolved + waiting, want %d", round, len(inFirst)+len(waiting), n)
			stillWaiting := map[string]bool{}
			for _, w := range waiting {
				stillWaiting[w.ID] = true
				if _, both := inFirst[w.ID]; both {
					p.addf("round %d: waiter %s listed by the broadcast yet still WAITING", round, w.ID)
				}
			}
			if len(inFirst)+len(waiting) != n {
				p.addf("round %d: %d waiters resolved and %d waiting, want %d in all", round, len(inFirst), len(waiting), n)
			}

			// The resolved subscribers have their message; the others nothing.
			eventually(t, 15*time.Second, func() bool {
				c := 0
				for _, r := range races {
					if r.done.Load() {
						c++
					}
				}
				return c >= len(inFirst)
			}, "round %d: want %d subscribers with the broadcast", round, len(inFirst))
			early := 0
			for _, r := range races {
				if !r.done.Load() {
					continue
				}
				early++
				if r.outErr != nil || r.out.Result == nil {
					p.addf("round %d, subscriber %d: %v %s", round, r.n, r.outErr, raceDescribe(r.out))
					continue
				}
				if id := r.out.Result.WaiterID; inFirst[id] == "" {
					p.addf("round %d, subscriber %d: got %s, but its waiter is not in the broadcast's list", round, r.n, raceDescribe(r.out))
				}
			}
			if early != len(inFirst) {
				p.addf("round %d: %d subscribers got a result, the broadcast resolved %d", round, early, len(inFirst))
			}

			// A second broadcast resolves exactly the waiting ones.
			data2 := map[string]any{"round": round, "broadcast": 2, "nonce": uid("data")}
			b2 := racePostNotify(ctx, e.endpoint, eventID, data2, "")
			require.True(t, b2.ok(), "second broadcast: %s", b2)
			inSecond := map[string]string{}
			for _, resp := range b2.view.NotifyResponse {
				inSecond[resp.Waiter.ID] = resp.MessageID
				if !stillWaiting[resp.Waiter.ID] {
					p.addf("round %d: the second broadcast resolved %s, which was not waiting", round, resp.Waiter.ID)
				}
			}
			if len(inSecond) != len(stillWaiting) {
				p.addf("round %d: the second broadcast resolved %d, %d were waiting", round, len(inSecond), len(stillWaiting))
			}
			waitCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
			for _, r := range races {
				select {
				case <-r.finished:
				case <-waitCtx.Done():
				}
			}
			cancel()
			want1, _ := json.Marshal(data1)
			want2, _ := json.Marshal(data2)
			seen := map[string]int{}
			for _, r := range races {
				if !r.done.Load() || r.outErr != nil || r.out.Result == nil || len(r.out.Errors) > 0 || !r.out.Completed {
					p.addf("round %d, subscriber %d: %v %s", round, r.n, r.outErr, raceDescribe(r.out))
					continue
				}
				res := r.out.Result
				seen[res.WaiterID]++
				if raceStr(res.WorkflowRunID) != raceStr(raceNilIfEmpty(r.run)) {
					p.addf("round %d, subscriber %d: result for run %s, want %q", round, r.n, raceStr(res.WorkflowRunID), r.run)
				}
				switch {
				case inFirst[res.WaiterID] != "":
					first++
					if raceStr(res.MessageID) != inFirst[res.WaiterID] || !raceSameJSON(res.EventData, want1) {
						p.addf("round %d, subscriber %d: listed by the first broadcast, got %s", round, r.n, raceDescribe(r.out))
					}
				case inSecond[res.WaiterID] != "":
					second++
					if raceStr(res.MessageID) != inSecond[res.WaiterID] || !raceSameJSON(res.EventData, want2) {
						p.addf("round %d, subscriber %d: listed by the second broadcast, got %s", round, r.n, raceDescribe(r.out))
					}
				default:
					p.addf("round %d, subscriber %d: got %s, which no broadcast lists", round, r.n, raceDescribe(r.out))
				}
			}
			for id, c := range seen {
				if c > 1 {
					p.addf("round %d: %d subscribers got waiter %s", round, c, id)
				}
			}
			if left := e.waiters(eventID); len(left) != 0 {
				p.addf("round %d: waiters left WAITING after the second broadcast: %s", round, raceJSON(left))
			}
			for i, v := range e.raceRuns(runs) {
				for _, w := range v.Waiters {
					if w.State != "NOTIFIED" {
						p.addf("round %d: waiter %s of run %s (subscriber %d) is %s", round, w.ID, runs[i], round*n+i, w.State)
					}
				}
			}
			ran += n
			if len(p.list) > 0 {
				break
			}
		}
		t.Logf("%s: %d registrations racing a broadcast in %s: %d resolved by it, %d still waiting and resolved by the next",
			e.dialect, ran, time.Since(began).Round(time.Millisecond), first, second)
		p.report("registrations", ran)
	})
}

func raceNilIfEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

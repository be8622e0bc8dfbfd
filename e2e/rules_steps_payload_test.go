package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// rsNotifyVars builds the variables of notifyMutation with a step.
func rsNotifyVars(eventID string, data any, run, stepRun, stepName string) map[string]any {
	vars := map[string]any{"ev": eventID, "data": data}
	if run != "" {
		vars["run"] = run
	}
	if stepRun != "" || stepName != "" {
		vars["step"] = map[string]any{"workflowRunId": stepRun, "stepName": stepName}
	}
	return vars
}

// rsNotifyStep sends a notify that is a step of stepRun and must succeed.
func rsNotifyStep(e *env, eventID string, data any, run, stepRun, stepName string) notifyView {
	e.t.Helper()
	var out struct {
		Notify notifyView `json:"notify"`
	}
	e.ok(notifyMutation, rsNotifyVars(eventID, data, run, stepRun, stepName), &out)
	return out.Notify
}

// Rule 10: notify with step is a durable step of the notifying run. The first
// call notifies; a repeat notifies nobody and returns the first result,
// marked deduplicated.
func TestRule10NotifyStep(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		c := e.dial(gqlclient.TransportWS)
		notifier := e.trigger()

		// First call: a broadcast notify that resolves the one waiter.
		ev := uid("ev")
		w1 := e.subscribe(c, ev, waitOpts{})
		e.awaitWaiting(ev, 1)
		first := rsNotifyStep(e, ev, map[string]any{"n": 1}, "", notifier, "send")
		require.False(t, first.Deduplicated, "the first call is not a repeat")
		require.Len(t, first.NotifyResponse, 1)
		require.False(t, first.NotifyResponse[0].Deduplicated)
		require.Equal(t, "NOTIFIED", first.NotifyResponse[0].Waiter.State)
		require.JSONEq(t, `{"n":1}`, string(first.EventData))
		r1 := mustResult(t, w1)
		require.Equal(t, first.NotifyResponse[0].MessageID, *r1.MessageID)
		require.JSONEq(t, `{"n":1}`, string(r1.EventData))

		// A waiter registered between the two calls.
		w2 := e.subscribe(c, ev, waitOpts{})
		waiting := e.awaitWaiting(ev, 1)

		// The repeat (even with other data) notifies nobody and returns the
		// first call's result, deduplicated.
		again := rsNotifyStep(e, ev, map[string]any{"n": 2}, "", notifier, "send")
		require.True(t, again.Deduplicated, "a repeat is deduplicated")
		require.Equal(t, ev, again.EventID)
		require.JSONEq(t, `{"n":1}`, string(again.EventData), "the first call's data")
		require.Nil(t, again.Lookback)
		require.Len(t, again.NotifyResponse, 1, "the first call's responses")
		for _, r := range again.NotifyResponse {
			require.True(t, r.Deduplicated, "each response of a repeat is deduplicated")
			require.Equal(t, first.NotifyResponse[0].MessageID, r.MessageID)
			require.Equal(t, first.NotifyResponse[0].Waiter.ID, r.Waiter.ID)
			require.NotEqual(t, waiting[0].ID, r.Waiter.ID, "not the new waiter")
		}
		quiet(t, w2)
		still := e.waiters(ev)
		require.Len(t, still, 1, "the waiter registered between the calls stays waiting")
		require.Equal(t, waiting[0].ID, still[0].ID)
		require.Equal(t, "WAITING", still[0].State)
		// Its first and only payload is a later, ordinary notify.
		later := e.notify(ev, "later", "")
		require.Len(t, later.NotifyResponse, 1)
		r2 := mustResult(t, w2)
		require.Equal(t, later.NotifyResponse[0].MessageID, *r2.MessageID)
		require.Equal(t, `"later"`, string(r2.EventData))

		// Same step, another event id: BAD_USER_INPUT, and nothing happens.
		other := uid("other")
		w3 := e.subscribe(c, other, waitOpts{})
		e.awaitWaiting(other, 1)
		e.fails("BAD_USER_INPUT", notifyMutation, rsNotifyVars(other, 1, "", notifier, "send"))
		require.Len(t, e.waiters(other), 1)
		quiet(t, w3)

		// A step of an unknown run: NOT_FOUND, and nothing happens.
		e.fails("NOT_FOUND", notifyMutation, rsNotifyVars(other, 1, "", "wfr_"+uid("ghost"), "send"))
		require.Len(t, e.waiters(other), 1)
		quiet(t, w3)

		// A step name taken by a waitForEvent step: BAD_USER_INPUT.
		wfe := uid("wfe")
		e.subscribe(c, wfe, waitOpts{run: notifier, step: "wait-step"})
		e.awaitWaiting(wfe, 1)
		e.fails("BAD_USER_INPUT", notifyMutation, rsNotifyVars(other, 1, "", notifier, "wait-step"))
		require.Len(t, e.waiters(other), 1)

		// The step shows in workflowRun.steps as a completed NOTIFY step.
		steps := e.run(notifier).Steps
		var found *stepView
		for i := range steps {
			if steps[i].StepName == "send" {
				found = &steps[i]
			}
		}
		require.NotNil(t, found, "steps: %+v", steps)
		require.Equal(t, "NOTIFY", found.Type)
		require.Equal(t, ev, found.EventID)
		require.NotNil(t, found.CompletedAt)
		n := 0
		for _, s := range steps {
			if s.StepName == "send" {
				n++
			}
		}
		require.Equal(t, 1, n, "a repeated step is recorded once")

		// A targeted notify step that stored a lookback returns the same
		// lookback on repeat, and stores no second one.
		target := e.trigger()
		lev := uid("lev")
		stored := rsNotifyStep(e, lev, []any{"x", 1}, target, notifier, "store")
		require.False(t, stored.Deduplicated)
		require.Empty(t, stored.NotifyResponse)
		require.NotNil(t, stored.Lookback)
		rep := rsNotifyStep(e, lev, []any{"y", 2}, target, notifier, "store")
		require.True(t, rep.Deduplicated)
		require.Empty(t, rep.NotifyResponse)
		require.NotNil(t, rep.Lookback)
		require.Equal(t, stored.Lookback.ID, rep.Lookback.ID)
		require.Equal(t, stored.Lookback.MessageID, rep.Lookback.MessageID)
		require.Equal(t, stored.Lookback.EventID, rep.Lookback.EventID)
		require.JSONEq(t, `["x",1]`, string(rep.Lookback.EventData))
		require.Equal(t, stored.Lookback.CreatedAt, rep.Lookback.CreatedAt)
		require.Equal(t, stored.Lookback.ExpiresAt, rep.Lookback.ExpiresAt)
		lbs := e.run(target).LookbackEvents
		require.Len(t, lbs, 1, "the repeat stored nothing")
		require.Equal(t, stored.Lookback.ID, lbs[0].ID)

		// The stored event is consumed once; a repeat after that still
		// returns the first result and stores nothing new.
		got := mustResult(t, e.subscribe(c, lev, waitOpts{run: target}))
		require.Equal(t, stored.Lookback.MessageID, *got.MessageID)
		require.JSONEq(t, `["x",1]`, string(got.EventData))
		rep2 := rsNotifyStep(e, lev, []any{"z", 3}, target, notifier, "store")
		require.True(t, rep2.Deduplicated)
		require.Equal(t, stored.Lookback.ID, rep2.Lookback.ID)
		require.Empty(t, e.run(target).LookbackEvents, "a repeat after consumption stores nothing")
		w4 := e.subscribe(c, lev, waitOpts{run: target})
		e.awaitWaiting(lev, 1)
		quiet(t, w4)

		// After the notifying run ended, a repeat still returns the first
		// result (a step runs once); a new step is RUN_NOT_ACTIVE.
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, map[string]any{"id": notifier}, nil)
		ended := rsNotifyStep(e, ev, nil, "", notifier, "send")
		require.True(t, ended.Deduplicated)
		require.Equal(t, first.NotifyResponse[0].MessageID, ended.NotifyResponse[0].MessageID)
		e.fails("RUN_NOT_ACTIVE", notifyMutation, rsNotifyVars(other, 1, "", notifier, "new-step"))
		require.Len(t, e.waiters(other), 1)
		quiet(t, w3)
	})
}

// Rule 10 under concurrency: many simultaneous calls of the same notify step
// notify once; every other call is deduplicated and carries the same result.
func TestRule10NotifyStepConcurrent(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		c := e.dial(gqlclient.LegacyWS)
		notifier := e.trigger()
		ev := uid("ev")
		w := e.subscribe(c, ev, waitOpts{})
		e.awaitWaiting(ev, 1)

		const callers = 8
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex
			outs []notifyView
			errs []string
		)
		for i := range callers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				r, err := gqlclient.Post(ctx, e.endpoint, notifyMutation, rsNotifyVars(ev, i, "", notifier, "once"))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, err.Error())
					return
				}
				if len(r.Errors) > 0 {
					errs = append(errs, r.Errors[0].Message+" "+r.Errors[0].Code())
					return
				}
				var out struct {
					Notify notifyView `json:"notify"`
				}
				if err := r.Decode(&out); err != nil {
					errs = append(errs, err.Error())
					return
				}
				outs = append(outs, out.Notify)
			}()
		}
		wg.Wait()
		require.Empty(t, errs)
		require.Len(t, outs, callers)
		fresh := 0
		var msg, data string
		for _, o := range outs {
			if !o.Deduplicated {
				fresh++
				data = string(o.EventData)
			}
			require.Len(t, o.NotifyResponse, 1)
			if msg == "" {
				msg = o.NotifyResponse[0].MessageID
			}
			require.Equal(t, msg, o.NotifyResponse[0].MessageID, "every call returns the one notification")
		}
		require.Equal(t, 1, fresh, "exactly one call ran the step")
		for _, o := range outs {
			require.Equal(t, data, string(o.EventData), "repeats return the first call's data")
		}
		r := mustResult(t, w)
		require.Equal(t, msg, *r.MessageID)
		require.Equal(t, data, string(r.EventData))
	})
}

// rsPostRaw sends a query whose variables are spliced in as raw JSON bytes,
// exactly as given (no re-encoding on the client side).
func rsPostRaw(t *testing.T, endpoint, query string, rawVars map[string]string) *gqlclient.Response {
	t.Helper()
	var b bytes.Buffer
	q, err := json.Marshal(query)
	require.NoError(t, err)
	b.WriteString(`{"query":`)
	b.Write(q)
	b.WriteString(`,"variables":{`)
	first := true
	for k, v := range rawVars {
		if !first {
			b.WriteByte(',')
		}
		first = false
		kb, _ := json.Marshal(k)
		b.Write(kb)
		b.WriteByte(':')
		b.WriteString(v)
	}
	b.WriteString(`}}`)
	r, err := gqlclient.PostRaw(ctxT(t), endpoint, b.Bytes())
	require.NoError(t, err)
	return r
}

func rsQuote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func rsCompact(t *testing.T, s string) string {
	t.Helper()
	var b bytes.Buffer
	require.NoError(t, json.Compact(&b, []byte(s)), "test value %q", s)
	return b.String()
}

// rsPayloadCases are JSON values that must come back byte for byte.
var rsPayloadCases = []struct{ name, in string }{
	{"object unsorted keys", `{"z":1,"a":{"y":[1,2,{"b":null,"a":true}],"x":false},"m":"é","B":"b","_":0}`},
	{"object with whitespace", "{ \"zeta\" : [ 1 , 2 ] ,\n\t\"alpha\" : { \"k\" : \"v\" } }"},
	{"nested arrays", `[[],[[1]],[[[[]]]],[{"k":[null,true,false]}],[]]`},
	{"unicode string", `"é 日本 😀 \"quoted\" back\\slash \n newline \t tab \u0000 nul \/ slash"`},
	{"escaped unicode", `"\u00e9\u65e5\ud83d\ude00\u001f"`},
	{"numbers", `[0,-0,1.0,1e3,1E+3,12345678901234567890,3.14159,-1.5e-10,0.000001]`},
	{"empty object", `{}`},
	{"empty array", `[]`},
	{"empty string", `""`},
	{"string", `"plain"`},
	{"zero", `0`},
	{"negative zero", `-0`},
	{"one point zero", `1.0`},
	{"exponent", `1e3`},
	{"big integer", `12345678901234567890`},
	{"pi", `3.14159`},
	{"true", `true`},
	{"false", `false`},
	{"null", `null`},
	{"object of scalars", `{"t":true,"f":false,"n":null,"s":"日本","i":-0,"d":1.0}`},
}

// rsHTMLCases have what an HTML-safe encoder would escape: they come back
// byte for byte too.
var rsHTMLCases = []struct{ name, in string }{
	{"html", `{"html":"<a href=\"x\">&amp;</a>","b":[">","<","&"]}`},
	{"line separators", `"\u2028 \u2029"`},
	{"raw line separators", "\"\u2028\u2029\""},
}

// Rule 13: eventData up to the configured size round-trips byte for byte as
// JSON, directly, via lookback and via workflowRun.lookbackEvents; over the
// limit it is PAYLOAD_TOO_LARGE and nothing is stored or resolved.
func TestRule13Payload(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		const limit = 4096
		e := newEnv(t, db, func(c *service.Config) { c.Engine.MaxPayloadBytes = limit })
		c := e.dial(gqlclient.TransportWS)
		run := e.trigger()

		check := func(name, in string) {
			t.Helper()
			want := rsCompact(t, in)
			same := func(got json.RawMessage, where string) {
				t.Helper()
				require.Equal(t, want, string(got), "%s: %s", name, where)
			}

			// Broadcast to a live subscriber.
			ev := uid("p13")
			s := e.subscribe(c, ev, waitOpts{})
			e.awaitWaiting(ev, 1)
			r := rsPostRaw(t, e.endpoint, notifyMutation, map[string]string{"ev": rsQuote(ev), "data": in})
			require.Empty(t, r.Errors, "%s", name)
			var out struct {
				Notify notifyView `json:"notify"`
			}
			require.NoError(t, r.Decode(&out))
			require.Len(t, out.Notify.NotifyResponse, 1, name)
			same(out.Notify.EventData, "NotifyResult.eventData")
			same(mustResult(t, s).EventData, "subscriber")

			// Targeted notify stored as lookback, then consumed by a wait.
			lev := uid("p13lb")
			r = rsPostRaw(t, e.endpoint, notifyMutation, map[string]string{"ev": rsQuote(lev), "run": rsQuote(run), "data": in})
			require.Empty(t, r.Errors, "%s", name)
			require.NoError(t, r.Decode(&out))
			require.NotNil(t, out.Notify.Lookback, name)
			same(out.Notify.Lookback.EventData, "NotifyResult.lookback.eventData")
			var lb *lookbackView
			for _, l := range e.run(run).LookbackEvents {
				if l.EventID == lev {
					lb = &l
				}
			}
			require.NotNil(t, lb, name)
			same(lb.EventData, "workflowRun.lookbackEvents")
			same(mustResult(t, e.subscribe(c, lev, waitOpts{run: run})).EventData, "lookback consumer")
		}
		for _, tc := range rsPayloadCases {
			check(tc.name, tc.in)
		}
		for _, tc := range rsHTMLCases {
			check(tc.name, tc.in)
		}

		// Exactly the limit (compact bytes) is accepted, with unicode in it.
		head := `{"u":"é日😀","pad":"`
		tail := `"}`
		atLimit := head + strings.Repeat("x", limit-len(head)-len(tail)) + tail
		require.Len(t, atLimit, limit)
		check("at the limit", atLimit)

		// One byte over: PAYLOAD_TOO_LARGE, nobody resolved, nothing stored.
		over := head + strings.Repeat("x", limit-len(head)-len(tail)+1) + tail
		ev := uid("p13over")
		s := e.subscribe(c, ev, waitOpts{})
		e.awaitWaiting(ev, 1)
		r := rsPostRaw(t, e.endpoint, notifyMutation, map[string]string{"ev": rsQuote(ev), "data": over})
		require.Equal(t, "PAYLOAD_TOO_LARGE", r.FirstCode(), "errors: %+v", r.Errors)
		r = rsPostRaw(t, e.endpoint, notifyMutation, map[string]string{"ev": rsQuote(ev), "run": rsQuote(run), "data": over})
		require.Equal(t, "PAYLOAD_TOO_LARGE", r.FirstCode(), "errors: %+v", r.Errors)
		require.Len(t, e.waiters(ev), 1, "the waiter still waits")
		quiet(t, s)
		require.Empty(t, e.run(run).LookbackEvents, "nothing stored")
		// The waiter then gets the next notify that fits.
		n := e.notify(ev, "fits", "")
		require.Len(t, n.NotifyResponse, 1)
		require.Equal(t, `"fits"`, string(mustResult(t, s).EventData))
	})
}

// Rule 13 at the default limit of 1 MiB.
func TestRule13PayloadDefaultLimit(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		const limit = 1 << 20
		c := e.dial(gqlclient.TransportWS)
		run := e.trigger()

		head := `{"z":[1,2.50,{"b":1,"a":2}],"u":"`
		tail := `","a":null}`
		body := strings.Repeat("é日😀a\\n\\\"", (limit-len(head)-len(tail))/14)
		body += strings.Repeat("x", limit-len(head)-len(tail)-len(body))
		big := head + body + tail
		require.Len(t, big, limit)
		require.True(t, json.Valid([]byte(big)))

		// Broadcast to a live subscriber.
		ev := uid("big")
		s := e.subscribe(c, ev, waitOpts{})
		e.awaitWaiting(ev, 1)
		r := rsPostRaw(t, e.endpoint, notifyMutation, map[string]string{"ev": rsQuote(ev), "data": big})
		require.Empty(t, r.Errors)
		got := mustResult(t, s)
		require.Equal(t, len(big), len(got.EventData))
		require.True(t, string(got.EventData) == big, "1 MiB eventData differs")

		// Via lookback and workflowRun.lookbackEvents.
		lev := uid("biglb")
		r = rsPostRaw(t, e.endpoint, notifyMutation, map[string]string{"ev": rsQuote(lev), "run": rsQuote(run), "data": big})
		require.Empty(t, r.Errors)
		lbs := e.run(run).LookbackEvents
		require.Len(t, lbs, 1)
		require.True(t, string(lbs[0].EventData) == big, "1 MiB lookback eventData differs")
		got = mustResult(t, e.subscribe(c, lev, waitOpts{run: run}))
		require.True(t, string(got.EventData) == big, "1 MiB consumed lookback differs")

		// One byte more: PAYLOAD_TOO_LARGE, nothing resolved or stored.
		over := head + body + "x" + tail
		ev2 := uid("bigover")
		s2 := e.subscribe(c, ev2, waitOpts{})
		e.awaitWaiting(ev2, 1)
		r = rsPostRaw(t, e.endpoint, notifyMutation, map[string]string{"ev": rsQuote(ev2), "data": over})
		require.Equal(t, "PAYLOAD_TOO_LARGE", r.FirstCode(), "errors: %+v", r.Errors)
		r = rsPostRaw(t, e.endpoint, notifyMutation, map[string]string{"ev": rsQuote(ev2), "run": rsQuote(run), "data": over})
		require.Equal(t, "PAYLOAD_TOO_LARGE", r.FirstCode(), "errors: %+v", r.Errors)
		require.Len(t, e.waiters(ev2), 1)
		quiet(t, s2)
		require.Empty(t, e.run(run).LookbackEvents)
	})
}

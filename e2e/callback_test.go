package e2e

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/internal/testgalera"
	"rendezvous/service"
	"rendezvous/storage"
)

// Callback waiters (waitForEventCallback): every way a waiter ends reaches
// a real HTTP receiver as one signed POST per delivery id, on SQLite and
// MariaDB.

const callbackMutation = `mutation($ev: String!, $run: ID!, $step: String!, $timeout: Duration, $cb: CallbackInput!) {
  waitForEventCallback(eventId: $ev, workflowRunId: $run, stepName: $step, timeout: $timeout, callback: $cb) {
    id eventId workflowRunId stepName state deadline createdAt
    callback { state url attempts lastStatus lastError nextAttemptAt deliveredAt }
  }
}`

type callbackWaiterView struct {
	waiterView
	Callback *dispatchView `json:"callback"`
}

// callbackBody is the contract's callback body.
type callbackBody struct {
	DeliveryID    string          `json:"deliveryId"`
	WaiterID      string          `json:"waiterId"`
	WorkflowRunID *string         `json:"workflowRunId"`
	StepName      *string         `json:"stepName"`
	EventID       string          `json:"eventId"`
	State         string          `json:"state"`
	Timeout       bool            `json:"timeout"`
	EventData     json.RawMessage `json:"eventData"`
	MessageID     *string         `json:"messageId"`
	NotifiedAt    *string         `json:"notifiedAt"`
	Error         *struct {
		Message    string            `json:"message"`
		Extensions map[string]string `json:"extensions"`
	} `json:"error"`
}

func (e *env) waitCallback(run, step, ev string, timeout any, cb map[string]any) callbackWaiterView {
	e.t.Helper()
	vars := map[string]any{"ev": ev, "run": run, "step": step, "cb": cb}
	if timeout != nil {
		vars["timeout"] = timeout
	}
	var out struct {
		W callbackWaiterView `json:"waitForEventCallback"`
	}
	e.ok(callbackMutation, vars, &out)
	return out.W
}

// callbackOf reads the waiter's callback through workflowRun.waiters.
func (e *env) callbackOf(run, waiterID string) (string, *dispatchView) {
	e.t.Helper()
	var out struct {
		WorkflowRun struct {
			Waiters []callbackWaiterView `json:"waiters"`
		} `json:"workflowRun"`
	}
	e.ok(`query($id: ID!) { workflowRun(workflowRunId: $id) { waiters { id state callback { state url attempts lastStatus lastError nextAttemptAt deliveredAt } } } }`,
		map[string]any{"id": run}, &out)
	for _, w := range out.WorkflowRun.Waiters {
		if w.ID == waiterID {
			return w.State, w.Callback
		}
	}
	e.t.Fatalf("waiter %s not in run %s", waiterID, run)
	return "", nil
}

// callbacks returns the processed callback bodies of the waiter, raw and
// decoded; each delivery id is processed once by the receiver.
func (r *receiver) callbacks(waiterID string) ([]json.RawMessage, []callbackBody) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var raws []json.RawMessage
	var bodies []callbackBody
	for id, raw := range r.processed {
		var b callbackBody
		if json.Unmarshal(raw, &b) != nil || b.WaiterID != waiterID {
			continue
		}
		require.Equal(r.t, id, b.DeliveryID, "the body's deliveryId is the header's")
		raws, bodies = append(raws, raw), append(bodies, b)
	}
	return raws, bodies
}

// awaitCallback waits for the waiter's one callback and returns it (raw and
// decoded), after checking that its Waiter.callback says DELIVERED.
func awaitCallback(t *testing.T, e *env, rcv *receiver, run, waiterID string) (json.RawMessage, callbackBody) {
	t.Helper()
	eventually(t, 20*time.Second, func() bool { raws, _ := rcv.callbacks(waiterID); return len(raws) > 0 }, "the callback of %s", waiterID)
	eventually(t, 10*time.Second, func() bool {
		_, cb := e.callbackOf(run, waiterID)
		return cb != nil && cb.State == "DELIVERED" && cb.DeliveredAt != nil
	}, "callback of %s DELIVERED", waiterID)
	raws, bodies := rcv.callbacks(waiterID)
	require.Len(t, bodies, 1, "one delivery per waiter")
	b := bodies[0]
	require.Equal(t, waiterID, b.WaiterID)
	require.NotNil(t, b.WorkflowRunID)
	require.Equal(t, run, *b.WorkflowRunID)
	return raws[0], b
}

func callbackEnv(t *testing.T, db string) (*env, *receiver, string) {
	rcv := newReceiver(t, nil)
	e := dispatchEnv(t, db, rcv.srv.URL+"/cb")
	return e, rcv, rcv.srv.URL + "/cb/step"
}

// Every path that ends a callback waiter, on both dialects: a lookback
// event consumed at registration (called back at once), a targeted notify,
// a broadcast notify, the deadline, cancel and finishRun. Each body is the
// contract's, eventData byte for byte as the notifier sent it, and
// Waiter.callback goes from PENDING (no next attempt) to DELIVERED.
func TestCallbackEveryPath(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e, rcv, url := callbackEnv(t, db)
		data := byPayloads[3].json // HTML-looking strings and U+2028: what a re-encoding would change
		notifyRaw := func(ev, run string) {
			r, err := gqlclient.PostRaw(ctxT(t), e.endpoint, byBody(notifyMutation, byNotifyVars(ev, run, data)))
			require.NoError(t, err)
			require.Empty(t, r.Errors)
		}
		checkNotified := func(raw json.RawMessage, b callbackBody, ev, step string) {
			require.Equal(t, "NOTIFIED", b.State)
			require.False(t, b.Timeout)
			require.Equal(t, ev, b.EventID)
			require.Equal(t, step, *b.StepName)
			require.Equal(t, data, string(b.EventData), "eventData byte for byte")
			require.Contains(t, string(raw), `"eventData":`+data+`,`)
			require.NotNil(t, b.MessageID)
			require.NotNil(t, b.NotifiedAt)
			require.Nil(t, b.Error)
		}

		t.Run("lookback at registration", func(t *testing.T) {
			run, ev := e.trigger(), uid("cb-lb")
			notifyRaw(ev, run) // stored: nobody waits yet
			w := e.waitCallback(run, "s", ev, nil, map[string]any{"url": url})
			require.Equal(t, "NOTIFIED", w.State)
			require.NotNil(t, w.Callback)
			raw, b := awaitCallback(t, e, rcv, run, w.ID)
			checkNotified(raw, b, ev, "s")
			require.Empty(t, e.run(run).LookbackEvents, "consumed")
		})
		t.Run("targeted notify", func(t *testing.T) {
			run, ev := e.trigger(), uid("cb-t")
			w := e.waitCallback(run, "s", ev, "1h", map[string]any{"url": url, "headers": map[string]any{"X-Tenant": "t1"}, "retries": 2})
			require.Equal(t, "WAITING", w.State)
			require.Equal(t, &dispatchView{State: "PENDING", URL: url}, w.Callback, "held while the waiter waits")
			notifyRaw(ev, run)
			raw, b := awaitCallback(t, e, rcv, run, w.ID)
			checkNotified(raw, b, ev, "s")
			require.Empty(t, e.run(run).LookbackEvents, "resolved the waiter, nothing stored")
		})
		t.Run("broadcast notify", func(t *testing.T) {
			run, ev := e.trigger(), uid("cb-b")
			w := e.waitCallback(run, "s", ev, nil, map[string]any{"url": url})
			notifyRaw(ev, "")
			raw, b := awaitCallback(t, e, rcv, run, w.ID)
			checkNotified(raw, b, ev, "s")
		})
		t.Run("timeout", func(t *testing.T) {
			run, ev := e.trigger(), uid("cb-to")
			w := e.waitCallback(run, "s", ev, "1h", map[string]any{"url": url})
			e.clock.Advance(time.Hour + time.Second)
			raw, b := awaitCallback(t, e, rcv, run, w.ID)
			require.Equal(t, "TIMED_OUT", b.State)
			require.True(t, b.Timeout)
			require.Contains(t, string(raw), `"eventData":null,`)
			require.Nil(t, b.MessageID)
			require.Nil(t, b.Error)
		})
		for _, end := range []struct{ name, mutation, state string }{
			{"cancel", `mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, "RUN_CANCELED"},
			{"finishRun", `mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, "RUN_SUCCESS"},
		} {
			t.Run(end.name, func(t *testing.T) {
				run, ev := e.trigger(), uid("cb-"+end.name)
				w := e.waitCallback(run, "s", ev, nil, map[string]any{"url": url})
				e.ok(end.mutation, map[string]any{"id": run}, nil)
				_, b := awaitCallback(t, e, rcv, run, w.ID)
				require.Equal(t, "CANCELED", b.State)
				require.False(t, b.Timeout)
				require.Equal(t, "null", string(b.EventData))
				require.NotNil(t, b.Error)
				require.Equal(t, "RUN_NOT_ACTIVE", b.Error.Extensions["code"])
				require.Contains(t, b.Error.Message, run)
				require.Equal(t, end.state, e.run(run).State)
			})
		}
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		require.Zero(t, rcv.badSigs)
		require.Zero(t, rcv.dups)
	})
}

// Rule 6 for callback waiters: the same (run, step) again returns the same
// waiter and registers nothing (one callback); a different event id is
// BAD_USER_INPUT; a new step on an ended run is RUN_NOT_ACTIVE, while the
// ended step still answers with its waiter. A live waitForEvent attached to
// the same step gets the one result the callback carries.
func TestCallbackDurableStepAndLiveSubscriber(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e, rcv, url := callbackEnv(t, db)
		run, ev := e.trigger(), uid("cb-step")
		w := e.waitCallback(run, "pay", ev, "1h", map[string]any{"url": url})
		again := e.waitCallback(run, "pay", ev, "1h", map[string]any{"url": url})
		require.Equal(t, w.ID, again.ID)
		require.Equal(t, w.Deadline, again.Deadline, "nothing registered anew")
		require.Len(t, e.run(run).Waiters, 1)
		e.fails("BAD_USER_INPUT", callbackMutation, map[string]any{"ev": ev + "-other", "run": run, "step": "pay", "cb": map[string]any{"url": url}})

		// A live subscriber attaches to the callback waiter's step.
		c := e.dial("graphql-transport-ws")
		sub := e.subscribe(c, ev, waitOpts{run: run, step: "pay"})
		e.awaitWaiting(ev, 1)
		quiet(t, sub)
		n := e.notify(ev, map[string]any{"paid": true}, run)
		require.Len(t, n.NotifyResponse, 1)
		got := mustResult(t, sub)
		_, b := awaitCallback(t, e, rcv, run, w.ID)
		require.Equal(t, w.ID, got.WaiterID)
		require.Equal(t, *got.MessageID, *b.MessageID, "one result for both")
		require.Equal(t, n.NotifyResponse[0].MessageID, *b.MessageID)
		require.JSONEq(t, string(got.EventData), string(b.EventData))
		require.Equal(t, *got.NotifiedAt, *b.NotifiedAt)

		// The ended step answers with its waiter; a new one on an ended run cannot be.
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, map[string]any{"id": run}, nil)
		ended := e.waitCallback(run, "pay", ev, nil, map[string]any{"url": url})
		require.Equal(t, w.ID, ended.ID)
		require.Equal(t, "NOTIFIED", ended.State)
		require.Equal(t, "DELIVERED", ended.Callback.State)
		e.fails("RUN_NOT_ACTIVE", callbackMutation, map[string]any{"ev": ev, "run": run, "step": "later", "cb": map[string]any{"url": url}})
		_, bodies := rcv.callbacks(w.ID)
		require.Len(t, bodies, 1, "repeats registered no second callback")

		// A step a subscription registered first: the same waiter, and no callback.
		run2, ev2 := e.trigger(), uid("cb-subfirst")
		first := e.subscribe(c, ev2, waitOpts{run: run2, step: "s"})
		waiting := e.awaitWaiting(ev2, 1)
		same := e.waitCallback(run2, "s", ev2, nil, map[string]any{"url": url})
		require.Equal(t, waiting[0].ID, same.ID)
		require.Nil(t, same.Callback)
		require.Len(t, e.notify(ev2, "x", run2).NotifyResponse, 1)
		require.Equal(t, `"x"`, string(mustResult(t, first).EventData))
	})
}

// Bad input gets BAD_USER_INPUT (and unknown runs NOT_FOUND), never an
// internal error, and registers nothing.
func TestCallbackBadInput(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e, _, url := callbackEnv(t, db)
		run := e.trigger()
		for _, c := range []struct {
			name string
			cb   map[string]any
			code string
		}{
			{"not a URL", map[string]any{"url": "::nope"}, "BAD_USER_INPUT"},
			{"ftp", map[string]any{"url": "ftp://127.0.0.1/cb"}, "BAD_USER_INPUT"},
			{"not allowed", map[string]any{"url": "http://127.0.0.1:1/elsewhere"}, "BAD_USER_INPUT"},
			{"negative retries", map[string]any{"url": url, "retries": -1}, "BAD_USER_INPUT"},
			{"too many retries", map[string]any{"url": url, "retries": 21}, "BAD_USER_INPUT"},
			{"headers not an object", map[string]any{"url": url, "headers": []string{"x"}}, "BAD_USER_INPUT"},
			{"reserved header", map[string]any{"url": url, "headers": map[string]any{"Rendezvous-Delivery-Id": "x"}}, "BAD_USER_INPUT"},
			{"header with a line break", map[string]any{"url": url, "headers": map[string]any{"X-A": "a\r\nB: c"}}, "BAD_USER_INPUT"},
		} {
			t.Run(c.name, func(t *testing.T) {
				err := e.fails(c.code, callbackMutation, map[string]any{"ev": "ev", "run": run, "step": c.name, "cb": c.cb})
				require.Contains(t, err.Message, "callback")
			})
		}
		e.fails("BAD_USER_INPUT", callbackMutation, map[string]any{"ev": "ev", "run": run, "step": "t", "timeout": "0s", "cb": map[string]any{"url": url}})
		e.fails("BAD_USER_INPUT", callbackMutation, map[string]any{"ev": "", "run": run, "step": "e", "cb": map[string]any{"url": url}})
		e.fails("BAD_USER_INPUT", callbackMutation, map[string]any{"ev": "ev", "run": run, "step": "", "cb": map[string]any{"url": url}})
		e.fails("NOT_FOUND", callbackMutation, map[string]any{"ev": "ev", "run": "no-such-run", "step": "s", "cb": map[string]any{"url": url}})
		e.fails("BAD_USER_INPUT", callbackMutation, map[string]any{"ev": "ev", "run": run, "step": "s"}) // callback missing
		require.Empty(t, e.run(run).Waiters, "nothing registered")

		// Without an allow-list, callbacks are refused, naming the variable.
		bare := newEnv(t, testdb.SQLite(t))
		r := bare.trigger()
		err := bare.fails("BAD_USER_INPUT", callbackMutation, map[string]any{"ev": "ev", "run": r, "step": "s", "cb": map[string]any{"url": url}})
		require.Contains(t, err.Message, "RENDEZVOUS_OUTBOUND_ALLOWED")
	})
}

// A receiver that fails: the callback is retried with the same delivery id
// until a 2xx; one that never answers 2xx fails the callback and the run.
func TestCallbackRetriedThenFailsTheRun(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		rcv := newReceiver(t, func(id string, attempt int) string {
			if attempt <= 2 {
				return "500"
			}
			return ""
		})
		e := dispatchEnv(t, db, rcv.srv.URL+"/cb")
		run, ev := e.trigger(), uid("cb-retry")
		w := e.waitCallback(run, "s", ev, nil, map[string]any{"url": rcv.srv.URL + "/cb/ok", "retries": 3})
		e.notify(ev, 1, run)
		awaitCallback(t, e, rcv, run, w.ID)
		_, cb := e.callbackOf(run, w.ID)
		require.Equal(t, 3, cb.Attempts)
		rcv.mu.Lock()
		var ids []string
		for id, atts := range rcv.attempts {
			if len(atts) == 3 {
				ids = append(ids, id)
				require.Equal(t, []string{"1", "2", "3"}, atts)
			}
		}
		rcv.mu.Unlock()
		require.Len(t, ids, 1, "three attempts, one delivery id")
		// The metrics count them as a callback's attempts, not a dispatch's.
		eventually(t, 10*time.Second, func() bool {
			m := e.scrape(nil)
			return m.value("rendezvous_outbox_attempts_total", "kind", "callback", "result", "failed") == 2 &&
				m.value("rendezvous_outbox_attempts_total", "kind", "callback", "result", "delivered") == 1
		}, "two failed attempts and one delivered, counted as a callback's")
		require.Zero(t, e.scrape(nil).value("rendezvous_outbox_attempts_total", "kind", "dispatch"))

		// Never a 2xx: FAILED after retries+1 attempts, and the run fails saying why.
		e.stop() // its delivery loop, allowed elsewhere, would refuse the next one's rows
		down := newReceiver(t, func(string, int) string { return "500" })
		e2 := dispatchEnv(t, db, down.srv.URL+"/cb")
		run2, ev2 := e2.trigger(), uid("cb-fail")
		w2 := e2.waitCallback(run2, "s", ev2, nil, map[string]any{"url": down.srv.URL + "/cb/x", "retries": 1})
		e2.notify(ev2, 1, run2)
		eventually(t, 20*time.Second, func() bool { _, cb := e2.callbackOf(run2, w2.ID); return cb.State == "FAILED" }, "callback FAILED")
		_, cb2 := e2.callbackOf(run2, w2.ID)
		require.Equal(t, 2, cb2.Attempts)
		require.NotNil(t, cb2.LastStatus, "%+v", cb2)
		require.Equal(t, 500, *cb2.LastStatus)
		r := e2.run(run2)
		require.Equal(t, "RUN_FAILED", r.State)
		var why map[string]any
		require.NoError(t, json.Unmarshal(r.Result, &why))
		require.Equal(t, "callback failed", why["error"])
		require.Equal(t, w2.ID, why["waiterId"])
		require.Equal(t, fmt.Sprint(2), fmt.Sprint(why["attempts"]))
	})
}

// Rule 5 with callback waiters: a targeted notify races
// waitForEventCallback of the same run, 500 times per dialect (on MariaDB
// the registration goes to one replica and the notify to another, each
// with its own delivery loop). Every race ends with the event called back
// exactly once: either the notify resolved the waiter (its messageId in the
// body) or it was stored and the registration consumed it (the waiter was
// born NOTIFIED with that messageId). Never both, never neither; no
// lookback event is left.
func TestCallbackRule5Race(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		rcv := newReceiver(t, nil)
		url := rcv.srv.URL + "/cb/race"
		a := dispatchEnv(t, db, rcv.srv.URL+"/cb")
		b := a
		if a.dialect == storage.DialectMySQL {
			b = dispatchEnv(t, db, rcv.srv.URL+"/cb")
		}
		const races = 500
		var (
			wg                 sync.WaitGroup
			mu                 sync.Mutex
			resolved, lookback int
			waiters            = map[string]string{} // waiter id -> the message id that must be called back
		)
		sem := make(chan struct{}, 12)
		for i := range races {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				run, ev := a.trigger(), uid("cbrace")
				data := fmt.Sprintf(`{"race":%d}`, i)
				var (
					w callbackWaiterView
					n notifyView
				)
				together(
					func() {
						w = a.waitCallback(run, "s", ev, nil, map[string]any{"url": url})
					},
					func() {
						n = b.notify(ev, rawJSON(data), run)
					},
				)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case len(n.NotifyResponse) == 1 && n.Lookback == nil:
					require.Equal(t, w.ID, n.NotifyResponse[0].Waiter.ID)
					waiters[w.ID] = n.NotifyResponse[0].MessageID
					resolved++
				case len(n.NotifyResponse) == 0 && n.Lookback != nil:
					require.Equal(t, "NOTIFIED", w.State, "registered after the notify: born notified")
					waiters[w.ID] = n.Lookback.MessageID
					lookback++
				default:
					t.Errorf("race %d: notify resolved %d waiters and stored lookback %v", i, len(n.NotifyResponse), n.Lookback != nil)
				}
			}()
		}
		wg.Wait()
		require.Equal(t, races, resolved+lookback)
		eventually(t, 60*time.Second, func() bool { return rcv.processedCount() == races }, "every race called back")
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		require.Zero(t, rcv.badSigs)
		got := map[string]int{}
		for _, raw := range rcv.processed {
			var body callbackBody
			require.NoError(t, json.Unmarshal(raw, &body))
			want, ok := waiters[body.WaiterID]
			require.True(t, ok, "a callback for an unknown waiter %s", body.WaiterID)
			require.Equal(t, "NOTIFIED", body.State)
			require.Equal(t, want, *body.MessageID, "the one notification of the race")
			got[body.WaiterID]++
		}
		for id := range waiters {
			require.Equal(t, 1, got[id], "waiter %s called back once", id)
		}
		t.Logf("%s: %d races, %d resolved the waiter, %d went through lookback; %d duplicate arrivals (deduplicated by delivery id)",
			a.dialect, races, resolved, lookback, rcv.dups)
	})
}

// The real binary is SIGKILLed after callback waiters ended and before
// their callbacks were delivered (the receiver refuses until then), and
// again while callbacks are in flight: after restart every callback
// arrives, each waiter has one delivery id, processed once. On SQLite and
// MariaDB.
func TestCallbackCrashKill(t *testing.T) {
	bin := crashBuild(t)
	testdb.Dialects(t, func(t *testing.T, db string) { callbackCrashKill(t, bin, db) })
}

func callbackCrashKill(t *testing.T, bin, db string) {
	var open atomic.Bool
	rcv := newReceiver(t, func(id string, attempt int) string {
		if !open.Load() || rand.IntN(5) == 0 {
			return "500"
		}
		return ""
	})
	inner := rcv.srv.Config.Handler
	rcv.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Duration(20+rand.IntN(200)) * time.Millisecond) // the receiver's own work: kills find attempts in flight
		inner.ServeHTTP(w, r)
	})
	srv := newCrashServer(t, bin, db,
		"RENDEZVOUS_OUTBOUND_ALLOWED="+rcv.srv.URL+"/cb",
		"RENDEZVOUS_SIGNING_SECRET="+signingSecret,
		"RENDEZVOUS_OUTBOUND_TIMEOUT=1s",
		"RENDEZVOUS_OUTBOUND_RETRY_BASE=100ms",
		"RENDEZVOUS_OUTBOUND_RETRY_MAX=500ms",
	)
	srv.start()
	register := func(n int, round int) []string {
		var ids []string
		for i := range n {
			var run struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			sdOK(t, srv.endpoint(), triggerMutation, map[string]any{"id": uid("cbcrash")}, &run)
			id, ev := run.Trigger.WorkflowRunID, uid("cbcrash-ev")
			var w struct {
				W callbackWaiterView `json:"waitForEventCallback"`
			}
			sdOK(t, srv.endpoint(), callbackMutation, map[string]any{"ev": ev, "run": id, "step": "s",
				"cb": map[string]any{"url": rcv.srv.URL + "/cb/step", "retries": 20}}, &w)
			// End it: notified, or the run finished (a canceled callback).
			if i%4 == 3 {
				sdOK(t, srv.endpoint(), `mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, map[string]any{"id": id}, nil)
			} else {
				sdOK(t, srv.endpoint(), notifyMutation, map[string]any{"ev": ev, "run": id, "data": map[string]any{"round": round, "i": i}}, nil)
			}
			ids = append(ids, w.W.ID)
		}
		return ids
	}

	// Ended, not yet called back: the receiver refuses everything.
	ids := register(30, 0)
	srv.kill()
	open.Store(true)
	srv.start()
	eventually(t, 60*time.Second, func() bool { return rcv.processedCount() == len(ids) }, "the callbacks owed at the kill arrive after restart")

	// Killed with callbacks in flight.
	for round := 1; round <= 2; round++ {
		ids = append(ids, register(30, round)...)
		target := len(ids) - 15
		eventually(t, 60*time.Second, func() bool { return rcv.processedCount() >= target }, "callbacks before the kill")
		srv.kill()
		srv.start()
	}
	eventually(t, 90*time.Second, func() bool { return rcv.processedCount() == len(ids) }, "every callback after the kills")
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	require.Zero(t, rcv.badSigs)
	per := map[string]int{}
	for _, raw := range rcv.processed {
		var b callbackBody
		require.NoError(t, json.Unmarshal(raw, &b))
		per[b.WaiterID]++
	}
	for _, id := range ids {
		require.Equal(t, 1, per[id], "waiter %s: one delivery id", id)
	}
	t.Logf("%s: %d callbacks through 3 kills; %d duplicate arrivals deduplicated by delivery id", testdb.Dialect(db), len(ids), rcv.dups)
}

// Retention: a run that ended with a callback still owed is not purged
// (nothing live is); once the callback is delivered, the run goes with its
// waiter and its outbox rows.
func TestCallbackRetention(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		var open atomic.Bool
		rcv := newReceiver(t, func(string, int) string {
			if !open.Load() {
				return "500"
			}
			return ""
		})
		e := dispatchEnv(t, db, rcv.srv.URL+"/cb", func(c *service.Config) {
			c.Engine.RunRetention = 48 * time.Hour
			c.Engine.PurgeInterval = 50 * time.Millisecond
			c.Engine.Outbound.RetryBase = time.Hour // retries wait: the callback stays PENDING
			c.Engine.Outbound.RetryMax = time.Hour
		})
		ctx := ctxT(t)
		run, ev := e.trigger(), uid("cb-ret")
		w := e.waitCallback(run, "s", ev, nil, map[string]any{"url": rcv.srv.URL + "/cb/r", "retries": 20})
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": run}, nil)
		// Attempts counts an attempt from its claim; the clock moves only
		// once the attempt's result is recorded (its claim released), or
		// the retry would be scheduled an hour after the moved clock.
		recorded := func(n int) func() bool {
			return func() bool {
				rec, err := e.svc.Store.OutboxGetByWaiter(ctx, w.ID)
				require.NoError(t, err)
				return rec.Attempts >= n && rec.Claim == "" && rec.LastStatus != nil
			}
		}
		eventually(t, 10*time.Second, recorded(1), "a first, refused attempt, recorded")

		e.clock.Advance(49 * time.Hour) // past the retention, and the retry is due: refused again
		eventually(t, 10*time.Second, recorded(2), "a second, refused attempt, recorded")
		_, err := e.svc.Engine.Purge(ctx)
		require.NoError(t, err)
		_, cb := e.callbackOf(run, w.ID)
		require.Equal(t, "PENDING", cb.State, "still owed")
		require.NotNil(t, e.run(run), "a run with a callback owed is kept")

		open.Store(true)
		e.clock.Advance(2 * time.Hour) // the next retry is due
		eventually(t, 10*time.Second, func() bool { _, b := rcv.callbacks(w.ID); return len(b) == 1 }, "delivered")
		eventually(t, 10*time.Second, func() bool { return e.run(run) == nil }, "then the run is purged")
		_, err = e.svc.Store.OutboxGetByWaiter(ctx, w.ID)
		require.ErrorIs(t, err, storage.ErrNotFound, "its callback row with it")
		_, err = e.svc.Store.WaiterGet(ctx, w.ID)
		require.ErrorIs(t, err, storage.ErrNotFound, "and its waiter")
	})
}

// A run token (what a dispatched workflow receives) may register callback
// waits for its own run only: another run's is FORBIDDEN and registers
// nothing; no token at all is UNAUTHENTICATED.
func TestCallbackRunTokenOwnRunOnly(t *testing.T) {
	rcv := newReceiver(t, nil)
	url := rcv.srv.URL + "/cb/x"
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) {
		c.Outbound.Allowed = rcv.srv.URL + "/cb"
		c.Outbound.SigningSecrets = []string{signingSecret}
	})
	mine, other := e.aTrigger(uid("cbmine")), e.aTrigger(uid("cbother"))
	vars := func(run, step string) map[string]any {
		return map[string]any{"ev": "ev", "run": run, "step": step, "cb": map[string]any{"url": url}}
	}
	var out struct {
		W callbackWaiterView `json:"waitForEventCallback"`
	}
	e.postOK(mine.Token, callbackMutation, vars(mine.ID, "s"), &out)
	require.Equal(t, "WAITING", out.W.State)
	secRefused(t, e.post(mine.Token, callbackMutation, vars(other.ID, "s")), 0, "FORBIDDEN", "another run's callback wait")
	// The short id names the same run, and is refused the same.
	secRefused(t, e.post(mine.Token, callbackMutation, vars(strings.TrimPrefix(other.ID, "wfr_"), "s")), 0, "FORBIDDEN", "another run's, short id")
	secRefused(t, e.post("", callbackMutation, vars(mine.ID, "t")), http.StatusUnauthorized, "UNAUTHENTICATED", "no token")
	require.Empty(t, e.aRun(other.ID).Waiters, "nothing registered on the other run")
	require.Len(t, e.aRun(mine.ID).Waiters, 1)
}

// Rule 5 with callback waiters on a three-node Galera cluster (which
// replicates writes, not row locks): three replica processes, one per
// node; each trial registers the callback waiter on one replica while a
// targeted notify goes to another. Every waiter is called back exactly
// once, with the acknowledged notify's message (a lookback event stored
// beside a waiter left waiting would never be called back). Trials:
// RENDEZVOUS_GALERA_TRIALS, default 500.
func TestGaleraCallbackRace(t *testing.T) {
	testgalera.Require(t)
	rcv := newReceiver(t, nil)
	url := rcv.srv.URL + "/cb/galera"
	g := newGaleraReplicas(t, redisURL(t),
		"RENDEZVOUS_OUTBOUND_ALLOWED="+rcv.srv.URL+"/cb",
		"RENDEZVOUS_SIGNING_SECRET="+signingSecret,
		"RENDEZVOUS_OUTBOUND_RETRY_BASE=100ms",
		"RENDEZVOUS_OUTBOUND_RETRY_MAX=500ms")
	trials := 500
	if v := os.Getenv("RENDEZVOUS_GALERA_TRIALS"); v != "" {
		trials = galeraTrials(t)
	}
	type outcome struct{ waiter, message string } // message "": a failed notify, any one event will do
	var (
		mu                 sync.Mutex
		outcomes           []outcome
		wrong              []string
		resolved, lookback int
		notifyErrors       = map[string]int{}
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		wrong = append(wrong, fmt.Sprintf(format, args...))
	}
	trial := func(k int, rng *rand.Rand) {
		a, b, c := rng.IntN(3), rng.IntN(3), rng.IntN(3)
		if b == c {
			b = (c + 1) % 3 // the notify and the registration on different replicas
		}
		var tr struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		if _, err := galeraPost(g.ep(a), triggerMutation, map[string]any{"id": uid("gcb")}, &tr); err != nil {
			fail("trial %d: trigger: %v", k, err)
			return
		}
		run, ev := tr.Trigger.WorkflowRunID, uid("gcb-ev")
		var (
			nv         notifyView
			nCode      string
			nErr, wErr error
			w          callbackWaiterView
		)
		together(
			func() {
				var out struct {
					Notify notifyView `json:"notify"`
				}
				nCode, nErr = galeraPost(g.ep(b), notifyMutation, map[string]any{"ev": ev, "run": run, "data": map[string]any{"k": k}}, &out)
				nv = out.Notify
			},
			func() {
				var out struct {
					W callbackWaiterView `json:"waitForEventCallback"`
				}
				vars := map[string]any{"ev": ev, "run": run, "step": "s", "cb": map[string]any{"url": url, "retries": 20}}
				for attempt := 0; attempt < 5; attempt++ { // a durable step: registering again is safe
					if _, wErr = galeraPost(g.ep(c), callbackMutation, vars, &out); wErr == nil {
						break
					}
				}
				w = out.W
			},
		)
		if wErr != nil {
			fail("trial %d: register: %v", k, wErr)
			return
		}
		o := outcome{waiter: w.ID}
		switch {
		case nErr != nil:
			mu.Lock()
			notifyErrors[nCode]++
			mu.Unlock()
			if _, err := galeraPost(g.ep(rng.IntN(3)), notifyMutation, map[string]any{"ev": ev, "run": run, "data": "finisher"}, nil); err != nil {
				fail("trial %d: finisher notify: %v", k, err)
				return
			}
		case len(nv.NotifyResponse) == 1 && nv.Lookback == nil && nv.NotifyResponse[0].Waiter.ID == w.ID:
			o.message = nv.NotifyResponse[0].MessageID
		case len(nv.NotifyResponse) == 0 && nv.Lookback != nil && w.State == "NOTIFIED":
			o.message = nv.Lookback.MessageID
		default:
			fail("trial %d: notify answered %s; the registration %+v", k, galeraNotifySummary(nv, nErr), w)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		outcomes = append(outcomes, o)
		switch {
		case nErr != nil:
		case nv.Lookback != nil:
			lookback++
		default:
			resolved++
		}
	}
	seed := uint64(time.Now().UnixNano())
	var wg sync.WaitGroup
	next := make(chan int)
	for wk := range galeraWorkers {
		rng := rand.New(rand.NewPCG(seed, uint64(wk)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range next {
				trial(k, rng)
			}
		}()
	}
	for k := range trials {
		next <- k
	}
	close(next)
	wg.Wait()
	require.Empty(t, wrong)
	require.Len(t, outcomes, trials)
	eventually(t, 120*time.Second, func() bool { return rcv.processedCount() >= trials }, "every waiter called back")
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	require.Zero(t, rcv.badSigs)
	bodies := map[string][]callbackBody{}
	for _, raw := range rcv.processed {
		var b callbackBody
		require.NoError(t, json.Unmarshal(raw, &b))
		bodies[b.WaiterID] = append(bodies[b.WaiterID], b)
	}
	require.Len(t, rcv.processed, trials, "one delivery id per waiter")
	for _, o := range outcomes {
		got := bodies[o.waiter]
		require.Len(t, got, 1, "waiter %s called back once", o.waiter)
		require.Equal(t, "NOTIFIED", got[0].State)
		if o.message != "" {
			require.Equal(t, o.message, *got[0].MessageID, "waiter %s: the acknowledged notify's message", o.waiter)
		}
	}
	t.Logf("%d trials on Galera (seed %d): %d resolved the waiter, %d through lookback, notify errors %v; %d duplicate arrivals (deduplicated by delivery id)",
		trials, seed, resolved, lookback, notifyErrors, rcv.dups)
}

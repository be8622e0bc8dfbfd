package e2e

import (
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/auth"
	"rendezvous/internal/testdb"
	"rendezvous/service"
	"rendezvous/storage"
)

const signingSecret = "test-signing-secret-0123456789"

// receiver is an HTTP endpoint that verifies signatures and deduplicates
// on Rendezvous-Delivery-Id, as the README tells receivers to. fail decides,
// per request, how it misbehaves ("" for a 200).
type receiver struct {
	t    *testing.T
	srv  *httptest.Server
	fail func(id string, attempt int) string

	mu        sync.Mutex
	processed map[string]json.RawMessage // delivery id -> body, first processing
	dups      int
	badSigs   int
	arrivals  map[string][]time.Time // delivery id -> when each attempt arrived
	attempts  map[string][]string
}

func newReceiver(t *testing.T, fail func(id string, attempt int) string) *receiver {
	r := &receiver{t: t, fail: fail, processed: map[string]json.RawMessage{}, arrivals: map[string][]time.Time{}, attempts: map[string][]string{}}
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(func() {
		r.srv.CloseClientConnections()
		r.srv.Close()
	})
	return r
}

func (r *receiver) serve(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	id := req.Header.Get("Rendezvous-Delivery-Id")
	var attempt int
	fmt.Sscan(req.Header.Get("Rendezvous-Attempt"), &attempt)
	r.mu.Lock()
	r.arrivals[id] = append(r.arrivals[id], time.Now())
	r.attempts[id] = append(r.attempts[id], req.Header.Get("Rendezvous-Attempt"))
	if err := auth.VerifyDeliverySignature(req.Header.Get("Rendezvous-Signature"), body, signingSecret, time.Now(), 5*time.Minute); err != nil {
		r.badSigs++
		r.mu.Unlock()
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	r.mu.Unlock()
	mode := ""
	if r.fail != nil {
		mode = r.fail(id, attempt)
	}
	switch mode {
	case "500":
		http.Error(w, "boom", http.StatusInternalServerError)
		return
	case "hang":
		select {
		case <-req.Context().Done():
		case <-time.After(10 * time.Second):
		}
		return
	case "reset":
		hj, _ := w.(http.Hijacker)
		conn, _, err := hj.Hijack()
		if err == nil {
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0) // RST, not FIN
			}
			conn.Close()
		}
		return
	case "redirect":
		http.Redirect(w, req, "/elsewhere", http.StatusFound)
		return
	case "huge":
		w.WriteHeader(http.StatusOK)
		w.Write([]byte(strings.Repeat("x", 200<<10)))
		return
	}
	r.mu.Lock()
	if _, seen := r.processed[id]; seen {
		r.dups++
	} else {
		r.processed[id] = body
	}
	r.mu.Unlock()
	w.WriteHeader(http.StatusOK)
	io.WriteString(w, "ok")
}

func (r *receiver) processedCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.processed)
}

// dispatchEnv is a service allowed to call the receiver's URL, with short
// timeouts and backoff.
func dispatchEnv(t *testing.T, db, allowed string, mods ...func(*service.Config)) *env {
	return newEnv(t, db, append([]func(*service.Config){func(c *service.Config) {
		c.Outbound.Allowed = allowed
		c.Outbound.SigningSecrets = []string{signingSecret}
		c.Outbound.Delivery.Timeout = time.Second
		c.Outbound.Delivery.Poll = 100 * time.Millisecond
		c.Engine.Outbound.RetryBase = 50 * time.Millisecond
		c.Engine.Outbound.RetryMax = 400 * time.Millisecond
	}}, mods...)...)
}

const dispatchTrigger = `mutation($id: ID, $body: JSON, $label: String, $d: DispatchInput) {
  trigger(workflowRunId: $id, body: $body, label: $label, dispatch: $d) { workflowRunId created run { state dispatch { state url attempts } } }
}`

type dispatchView struct {
	State         string  `json:"state"`
	URL           string  `json:"url"`
	Attempts      int     `json:"attempts"`
	LastStatus    *int    `json:"lastStatus"`
	LastError     *string `json:"lastError"`
	NextAttemptAt *string `json:"nextAttemptAt"`
	DeliveredAt   *string `json:"deliveredAt"`
}

func (e *env) dispatchOf(id string) (string, json.RawMessage, *dispatchView) {
	e.t.Helper()
	var out struct {
		WorkflowRun struct {
			State    string          `json:"state"`
			Result   json.RawMessage `json:"result"`
			Dispatch *dispatchView   `json:"dispatch"`
		} `json:"workflowRun"`
	}
	e.ok(`query($id: ID!) { workflowRun(workflowRunId: $id) { state result dispatch { state url attempts lastStatus lastError nextAttemptAt deliveredAt } } }`, map[string]any{"id": id}, &out)
	return out.WorkflowRun.State, out.WorkflowRun.Result, out.WorkflowRun.Dispatch
}

func hashOf(s string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(s))
	return h.Sum32()
}

// Every run triggered with dispatch reaches a receiver that fails at random
// (500, hangs past the timeout, connection resets) before it answers 200:
// each delivery id is processed once, every signature verifies, the body is
// the contract's, retries keep their backoff, and the dispatch ends
// DELIVERED.
func TestDispatchDeliveredOnceThroughFailures(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		modes := []string{"500", "hang", "reset"}
		rcv := newReceiver(t, func(id string, attempt int) string {
			// Deterministic per delivery: the first k attempts fail, k in 0..3.
			h := hashOf(id)
			if attempt <= int(h%4) {
				return modes[(int(h)+attempt)%len(modes)]
			}
			return ""
		})
		e := dispatchEnv(t, db, rcv.srv.URL+"/hooks")
		const n = 12
		ids := make([]string, n)
		for i := range ids {
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
					Run           struct {
						Dispatch dispatchView `json:"dispatch"`
					} `json:"run"`
				} `json:"trigger"`
			}
			e.ok(dispatchTrigger, map[string]any{"id": uid("disp"), "body": map[string]any{"i": i}, "label": "mail",
				"d": map[string]any{"url": rcv.srv.URL + "/hooks/run", "retries": 5, "headers": map[string]any{"X-Tenant": "t1"}}}, &out)
			ids[i] = out.Trigger.WorkflowRunID
		}
		eventually(t, 30*time.Second, func() bool { return rcv.processedCount() == n }, "every run delivered")
		for _, id := range ids {
			eventually(t, 10*time.Second, func() bool {
				_, _, d := e.dispatchOf(id)
				return d != nil && d.State == "DELIVERED"
			}, "dispatch of %s DELIVERED", id)
		}
		rcv.mu.Lock()
		defer rcv.mu.Unlock()
		require.Zero(t, rcv.badSigs, "every signature verifies")
		require.Zero(t, rcv.dups, "no delivery processed twice")
		seen := map[string]bool{}
		for did, body := range rcv.processed {
			var b struct {
				WorkflowRunID string          `json:"workflowRunId"`
				Body          json.RawMessage `json:"body"`
				Label         string          `json:"label"`
				CreatedAt     string          `json:"createdAt"`
				RunToken      string          `json:"runToken"`
			}
			require.NoError(t, json.Unmarshal(body, &b))
			require.Equal(t, "mail", b.Label)
			require.NotEmpty(t, b.CreatedAt)
			require.NotEmpty(t, b.RunToken)
			seen[b.WorkflowRunID] = true
			// Attempts are numbered 1, 2, … under one delivery id, and
			// each retry waits its backoff (base 50ms doubling, ±20%).
			for i, a := range rcv.attempts[did] {
				require.Equal(t, fmt.Sprint(i+1), a)
			}
			arr := rcv.arrivals[did]
			for i := 1; i < len(arr); i++ {
				low := time.Duration(float64(50*time.Millisecond<<(i-1)) * 0.8)
				require.GreaterOrEqual(t, arr[i].Sub(arr[i-1]), low, "retry %d of %s too early", i, did)
				// At most: the attempt itself (a hang lasts the 1s timeout),
				// the backoff, and the loop's wake-up.
				require.Less(t, arr[i].Sub(arr[i-1]), 1*time.Second+480*time.Millisecond+time.Second, "retry %d of %s too late", i, did)
			}
		}
		for _, id := range ids {
			require.True(t, seen[id], id)
		}
	})
}

// Dispatch is refused up front when it cannot be allowed, and a delivery
// that cannot succeed (redirect, oversized response, nobody listening)
// ends FAILED after its retries, its run RUN_FAILED with a result saying
// why. A run that ends first cancels its pending dispatch.
func TestDispatchRefusalsAndFailures(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		// No allow-list: refused, naming the variable.
		plain := newEnv(t, db)
		err := plain.fails("BAD_USER_INPUT", dispatchTrigger, map[string]any{"d": map[string]any{"url": "https://example.com/x"}})
		require.Contains(t, err.Message, "RENDEZVOUS_OUTBOUND_ALLOWED")

		var elsewhere int
		var emu sync.Mutex
		rcv := newReceiver(t, func(id string, attempt int) string { return "" })
		rcv.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/hooks/redirect":
				http.Redirect(w, r, "/hooks/elsewhere", http.StatusFound)
			case "/hooks/huge":
				w.WriteHeader(http.StatusOK)
				w.Write([]byte(strings.Repeat("x", 200<<10)))
			case "/hooks/elsewhere":
				emu.Lock()
				elsewhere++
				emu.Unlock()
			default:
				rcv.serve(w, r)
			}
		})
		down, err2 := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err2)
		downURL := "http://" + down.Addr().String() + "/hooks"
		down.Close() // nobody listens there any more
		e := dispatchEnv(t, db, rcv.srv.URL+"/hooks,"+downURL)

		for _, d := range []map[string]any{
			{"url": "https://example.com/hooks"},
			{"url": rcv.srv.URL + "/hooksx"},
			{"url": rcv.srv.URL + "/hooks/../admin"},
			{"url": strings.Replace(rcv.srv.URL, "127.0.0.1", "127.0.0.1.nip.io", 1) + "/hooks"},
			{"url": rcv.srv.URL + "/hooks", "retries": 21},
			{"url": rcv.srv.URL + "/hooks", "retries": -1},
			{"url": rcv.srv.URL + "/hooks", "headers": map[string]any{"Host": "evil"}},
			{"url": rcv.srv.URL + "/hooks", "headers": map[string]any{"Rendezvous-Signature": "t=1,v1=00"}},
			{"url": rcv.srv.URL + "/hooks", "headers": map[string]any{"X-A": "a\r\nX-B: b"}},
			{"url": rcv.srv.URL + "/hooks", "headers": []any{"x"}},
			{"url": rcv.srv.URL + "/hooks", "headers": map[string]any{"X-N": 1}},
		} {
			plainErr := e.fails("BAD_USER_INPUT", dispatchTrigger, map[string]any{"d": d})
			require.NotContains(t, plainErr.Message, signingSecret)
		}

		trig := func(url string, retries int) string {
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			e.ok(dispatchTrigger, map[string]any{"id": uid("fail"), "d": map[string]any{"url": url, "retries": retries}}, &out)
			return out.Trigger.WorkflowRunID
		}
		redirect := trig(rcv.srv.URL+"/hooks/redirect", 1)
		huge := trig(rcv.srv.URL+"/hooks/huge", 0)
		nobody := trig(downURL, 2)
		for id, want := range map[string]string{redirect: "redirects are not followed", huge: "response body over", nobody: "connect"} {
			eventually(t, 20*time.Second, func() bool {
				state, _, d := e.dispatchOf(id)
				return state == "RUN_FAILED" && d != nil && d.State == "FAILED"
			}, "run %s failed", id)
			_, result, d := e.dispatchOf(id)
			require.NotNil(t, d.LastError)
			require.Contains(t, *d.LastError, want)
			var why map[string]any
			require.NoError(t, json.Unmarshal(result, &why))
			require.Equal(t, "dispatch failed", why["error"])
			require.Equal(t, float64(d.Attempts), why["attempts"])
		}
		_, _, d := e.dispatchOf(redirect)
		require.Equal(t, 2, d.Attempts, "retries: 1 means two attempts")
		require.Equal(t, 302, *d.LastStatus)
		emu.Lock()
		require.Zero(t, elsewhere, "a redirect is never followed")
		emu.Unlock()

		// A run canceled before its (delayed) dispatch cancels it.
		var out struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		e.ok(dispatchTrigger, map[string]any{"d": map[string]any{"url": rcv.srv.URL + "/hooks", "delay": "1h"}}, &out)
		late := out.Trigger.WorkflowRunID
		_, _, d = e.dispatchOf(late)
		require.Equal(t, "PENDING", d.State)
		require.NotNil(t, d.NextAttemptAt)
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": late}, nil)
		_, _, d = e.dispatchOf(late)
		require.Equal(t, "CANCELED", d.State)

		var st struct {
			Stats struct {
				Outbox struct{ Pending, Delivered, Failed, Canceled int } `json:"outbox"`
			} `json:"stats"`
		}
		e.ok(`{ stats { outbox { pending delivered failed canceled } } }`, nil, &st)
		require.Equal(t, 3, st.Stats.Outbox.Failed)
		require.Equal(t, 1, st.Stats.Outbox.Canceled)
		require.NotContains(t, e.logs.String(), signingSecret, "the signing secret is never logged")

		m := e.scrape(nil)
		// redirect: 2 attempts, huge: 1, nobody: 3.
		require.Equal(t, 6.0, m.value("rendezvous_outbox_attempts_total", "result", "failed"))
		require.Equal(t, 0.0, m.value("rendezvous_outbox_pending"), "three failed, one canceled")
		require.Equal(t, 6.0, m.value("rendezvous_outbox_attempt_duration_seconds"))
	})
}

// Outbox rows go with their run when retention purges it, and stay with a
// run that has not ended.
func TestRetentionPurgesDispatch(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		rcv := newReceiver(t, nil)
		e := dispatchEnv(t, db, rcv.srv.URL+"/hooks", func(c *service.Config) {
			c.Engine.RunRetention = 48 * time.Hour
			c.Engine.PurgeInterval = 50 * time.Millisecond
		})
		ctx := ctxT(t)
		trig := func(delay string) string {
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			e.ok(dispatchTrigger, map[string]any{"d": map[string]any{"url": rcv.srv.URL + "/hooks", "delay": delay}}, &out)
			return out.Trigger.WorkflowRunID
		}
		delivered, canceled, live := trig("1s"), trig("100d"), trig("100d")
		eventually(t, 10*time.Second, func() bool { _, _, d := e.dispatchOf(delivered); return d.State == "DELIVERED" }, "delivered")
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, map[string]any{"id": delivered}, nil)
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": canceled}, nil)
		e.clock.Advance(49 * time.Hour)
		for _, id := range []string{delivered, canceled} {
			eventually(t, 10*time.Second, func() bool { return e.run(id) == nil }, "run %s purged", id)
			_, err := e.svc.Store.OutboxGetByRun(ctx, id)
			require.ErrorIs(t, err, storage.ErrNotFound)
		}
		_, _, d := e.dispatchOf(live)
		require.Equal(t, "PENDING", d.State)
	})
}

// A graceful stop during a delivery does not spend one of its attempts:
// with retries 0, the attempt cut short is made again after the restart,
// and the dispatch ends DELIVERED, not FAILED.
func TestDispatchInterruptedByStopIsNotCounted(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		var (
			mu      sync.Mutex
			arrived = make(chan struct{}, 4)
			first   = true
		)
		rcv := newReceiver(t, func(id string, attempt int) string {
			mu.Lock()
			defer mu.Unlock()
			arrived <- struct{}{}
			if first {
				first = false
				return "hang"
			}
			return ""
		})
		e := dispatchEnv(t, db, rcv.srv.URL+"/hooks", func(c *service.Config) { c.Outbound.Delivery.Timeout = 30 * time.Second })
		var out struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		e.ok(dispatchTrigger, map[string]any{"d": map[string]any{"url": rcv.srv.URL + "/hooks", "retries": 0}}, &out)
		select {
		case <-arrived:
		case <-time.After(10 * time.Second):
			t.Fatal("the delivery never arrived")
		}
		e.restart()
		eventually(t, 10*time.Second, func() bool {
			_, _, d := e.dispatchOf(out.Trigger.WorkflowRunID)
			return d.State != "PENDING"
		}, "the dispatch ends")
		state, _, d := e.dispatchOf(out.Trigger.WorkflowRunID)
		require.Equal(t, "DELIVERED", d.State, "%+v", d)
		require.Equal(t, "RUN_STARTED", state)
		require.Equal(t, 1, d.Attempts)
	})
}

package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
)

// hookReceiver records the dispatches it gets.
type hookReceiver struct {
	srv  *httptest.Server
	mu   sync.Mutex
	got  map[string]http.Header // run id -> headers of its first dispatch
	body map[string]json.RawMessage
}

func newHookReceiver(t *testing.T) *hookReceiver {
	r := &hookReceiver{got: map[string]http.Header{}, body: map[string]json.RawMessage{}}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		b, _ := io.ReadAll(req.Body)
		var d struct {
			WorkflowRunID string          `json:"workflowRunId"`
			Body          json.RawMessage `json:"body"`
		}
		json.Unmarshal(b, &d)
		r.mu.Lock()
		if _, ok := r.got[d.WorkflowRunID]; !ok {
			r.got[d.WorkflowRunID], r.body[d.WorkflowRunID] = req.Header.Clone(), d.Body
		}
		r.mu.Unlock()
	}))
	t.Cleanup(func() { r.srv.CloseClientConnections(); r.srv.Close() })
	return r
}

func (r *hookReceiver) dispatched(id string) (http.Header, json.RawMessage, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	h, ok := r.got[id]
	return h, r.body[id], ok
}

// batchMsg is a message as the npm Client's trigger sends it to /v2/batch.
func batchMsg(dest, runID, body string, extra map[string]string) map[string]any {
	h := map[string]string{
		"Upstash-Workflow-Init": "true", "Upstash-Workflow-RunId": runID, "Upstash-Workflow-Url": dest,
		"Upstash-Feature-Set": "LazyFetch,InitialBody,WF_DetectTrigger,WF_TriggerOnConfig", "Upstash-Workflow-Sdk-Version": "1",
		"Upstash-Forward-Upstash-Workflow-Sdk-Version": "1", "Upstash-Failure-Callback": dest, "Upstash-Method": "POST",
		"Upstash-Telemetry-Sdk": "@upstash/workflow@v1.3.2", "content-type": "application/json",
	}
	for k, v := range extra {
		h[k] = v
	}
	return map[string]any{"destination": dest, "headers": h, "body": body}
}

func TestUpstashTrigger(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		recv := newHookReceiver(t)
		e := dispatchEnv(t, db, recv.srv.URL+"/wf")
		type result struct {
			MessageID    string `json:"messageId"`
			URL          string `json:"url"`
			Deduplicated bool   `json:"deduplicated"`
		}
		batch := func(msgs ...map[string]any) []result {
			t.Helper()
			b, _ := json.Marshal(msgs)
			var out []result
			e.restOK(http.MethodPost, "/v2/batch", b, &out)
			return out
		}
		dest := recv.srv.URL + "/wf/orders"
		a, b := uid("wfr_a"), uid("wfr_b")
		label := uid("lbl")
		out := batch(
			batchMsg(dest, a, `hello`, map[string]string{"Upstash-Label": label, "Upstash-Retries": "5", "Upstash-Forward-X-Tenant": "acme"}),
			batchMsg(dest+"/2", b, `{"n":1}`, nil),
		)
		require.Len(t, out, 2)
		assert.Equal(t, []bool{false, false}, []bool{out[0].Deduplicated, out[1].Deduplicated})
		assert.Equal(t, dest, out[0].URL)
		var ra *runView
		eventually(t, 10*time.Second, func() bool { _, _, ok := recv.dispatched(a); ra = e.run(a); return ok })
		h, body, _ := recv.dispatched(a)
		assert.Equal(t, "acme", h.Get("X-Tenant"), "Upstash-Forward-* headers are the dispatch's headers")
		assert.JSONEq(t, `"hello"`, string(body), "a string body stays a string")
		assert.Equal(t, label, *ra.Label)
		_, _, d := e.dispatchOf(a)
		assert.Equal(t, dest, d.URL)
		eventually(t, 10*time.Second, func() bool { _, _, ok := recv.dispatched(b); return ok })
		_, body, _ = recv.dispatched(b)
		assert.JSONEq(t, `{"n":1}`, string(body))

		// The same run id again: deduplicated, nothing changes.
		out = batch(batchMsg(dest, a, `other`, nil))
		assert.True(t, out[0].Deduplicated)
		assert.JSONEq(t, `"hello"`, string(e.run(a).Body))

		// Delay: the dispatch waits.
		c := uid("wfr_c")
		batch(batchMsg(recv.srv.URL+"/wf/later", c, ``, map[string]string{"Upstash-Delay": "1h"}))
		_, _, d = e.dispatchOf(c)
		require.Equal(t, "PENDING", d.State)
		next, err := time.Parse(time.RFC3339Nano, *d.NextAttemptAt)
		require.NoError(t, err)
		assert.WithinDuration(t, time.Now().Add(time.Hour), next, time.Minute)

		// A bad message anywhere: nothing of the batch is created.
		good := uid("wfr_good")
		for name, bad := range map[string]map[string]any{
			"flow control":    batchMsg(dest, uid("wfr_x"), ``, map[string]string{"Upstash-Flow-Control-Key": "k", "Upstash-Flow-Control-Value": "parallelism=1"}),
			"not allowed":     batchMsg("http://elsewhere.example/wf", uid("wfr_x"), ``, nil),
			"two labels":      batchMsg(dest, uid("wfr_x"), ``, map[string]string{"Upstash-Label": "a,b"}),
			"GET":             batchMsg(dest, uid("wfr_x"), ``, map[string]string{"Upstash-Method": "GET"}),
			"retries":         batchMsg(dest, uid("wfr_x"), ``, map[string]string{"Upstash-Retries": "many"}),
			"delay":           batchMsg(dest, uid("wfr_x"), ``, map[string]string{"Upstash-Delay": "soon"}),
			"reserved header": batchMsg(dest, uid("wfr_x"), ``, map[string]string{"Upstash-Forward-Rendezvous-Signature": "x"}),
			"empty run id":    batchMsg(dest, "wfr_", ``, nil),
		} {
			b, _ := json.Marshal([]any{batchMsg(dest, good, `1`, nil), bad})
			msg := e.restFails(http.StatusBadRequest, http.MethodPost, "/v2/batch", b)
			assert.Contains(t, msg, "message 1", name)
			assert.Nil(t, e.run(good), "%s: the good message before it was not created", name)
		}
		e.restFails(http.StatusBadRequest, http.MethodPost, "/v2/batch", []byte(`{"destination":"x"}`))
		e.restFails(http.StatusBadRequest, http.MethodPost, "/v2/batch", []byte(`[]`))

		// Logs show the dispatch URL and filter by it.
		l := upLogs{}
		e.restOK(http.MethodGet, "/v2/workflows/events?groupBy=workflowRunId&workflowUrl="+url.QueryEscape(dest), nil, &l)
		require.Len(t, l.Runs, 1)
		assert.Equal(t, a, l.Runs[0].WorkflowRunID)
		assert.Equal(t, dest, *l.Runs[0].WorkflowURL)

		// Cancel by URL: exact, then by prefix (byte for byte).
		other := e.trigger()
		type cancelled struct {
			Cancelled int `json:"cancelled"`
		}
		var n cancelled
		e.restOK(http.MethodDelete, "/v2/workflows/runs?"+url.Values{"workflowUrl": {dest + "/2"}, "workflowUrlExactMatch": {"true"}, "count": {"100"}}.Encode(), nil, &n)
		assert.Equal(t, 1, n.Cancelled)
		assert.Equal(t, "RUN_CANCELED", e.run(b).State)
		e.restOK(http.MethodDelete, "/v2/workflows/runs?"+url.Values{"workflowUrl": {recv.srv.URL + "/WF"}, "count": {"100"}}.Encode(), nil, &n)
		assert.Equal(t, 0, n.Cancelled, "prefixes compare byte for byte")
		e.restOK(http.MethodDelete, "/v2/workflows/runs?"+url.Values{"workflowUrl": {recv.srv.URL + "/wf/"}, "count": {"100"}}.Encode(), nil, &n)
		assert.Equal(t, 2, n.Cancelled)
		assert.Equal(t, "RUN_CANCELED", e.run(a).State)
		assert.Equal(t, "RUN_CANCELED", e.run(c).State)
		_, _, d = e.dispatchOf(c)
		assert.Equal(t, "CANCELED", d.State, "its pending dispatch is canceled with it")
		assert.Equal(t, "RUN_STARTED", e.run(other).State, "a run without dispatch matches no URL")
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?workflowUrlExactMatch=true", nil)
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?workflowUrl=", nil)
	})
}

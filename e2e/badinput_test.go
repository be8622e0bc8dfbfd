package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// biLimit is the eventData limit of the bad-input tests; the POST body limit
// follows from it (2×limit + 64 KiB).
const biLimit = 4096

func biEnv(t *testing.T, db string) *env {
	t.Helper()
	e := newEnv(t, db, func(c *service.Config) { c.Engine.MaxPayloadBytes = biLimit })
	t.Cleanup(func() {
		// Never a panic, never an internal error, whatever came in.
		logs := e.logs.String()
		assert.NotContains(t, logs, "panic", "the service panicked")
		assert.NotContains(t, logs, "internal error", "an input was treated as an internal error")
	})
	return e
}

// biErr checks that a response failed with errors that all carry a code, the
// first one being code ("" accepts any code).
func biErr(t *testing.T, r *gqlclient.Response, code, what string) {
	t.Helper()
	if !assert.NotEmpty(t, r.Errors, "%s: should fail; data %s", what, r.Data) {
		return
	}
	for _, er := range r.Errors {
		assert.NotEmpty(t, er.Code(), "%s: error without extensions.code: %+v", what, er)
		assert.NotEqual(t, "INTERNAL_SERVER_ERROR", er.Code(), "%s: %+v", what, er)
	}
	if code != "" {
		assert.Equal(t, code, r.FirstCode(), "%s: errors %+v", what, r.Errors)
	}
}

// biHealthy: the process answers and a normal trigger and notify work.
func biHealthy(e *env) {
	e.t.Helper()
	resp, body := httpGet(e.t, e.srv.URL+"/healthz")
	require.Equal(e.t, http.StatusOK, resp.StatusCode, body)
	resp, body = httpGet(e.t, e.srv.URL+"/readyz")
	require.Equal(e.t, http.StatusOK, resp.StatusCode, body)
	run := e.trigger()
	require.Equal(e.t, "RUN_STARTED", e.run(run).State)
	n := e.notify(uid("healthy"), map[string]any{"ok": true}, run)
	require.NotNil(e.t, n.Lookback)
}

// biRawPost sends body with a content type and returns status and parsed body.
func biRawPost(t *testing.T, endpoint, contentType string, body []byte) (int, *gqlclient.Response) {
	t.Helper()
	return biRaw(t, http.MethodPost, endpoint, contentType, body)
}

func biRaw(t *testing.T, method, endpoint, contentType string, body []byte) (int, *gqlclient.Response) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), method, endpoint, bytes.NewReader(body))
	require.NoError(t, err)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	var r gqlclient.Response
	require.NoError(t, json.Unmarshal(b, &r), "%s %s: status %d, body %q is not a GraphQL response", method, contentType, resp.StatusCode, b)
	r.HTTPStatus = resp.StatusCode
	return resp.StatusCode, &r
}

// biSubFails starts waitForEvent on both websocket protocols and over SSE
// and checks each fails with code at once.
func biSubFails(e *env, code, what string, query string, vars map[string]any) {
	e.t.Helper()
	t := e.t
	for _, proto := range []string{gqlclient.TransportWS, gqlclient.LegacyWS} {
		c := e.dial(proto)
		s, err := c.Subscribe(ctxT(t), query, vars)
		require.NoError(t, err)
		o := result(t, s, 10*time.Second)
		require.Nil(t, o.Result, "%s over %s: no result", what, proto)
		require.NotEmpty(t, o.Errors, "%s over %s", what, proto)
		for _, er := range o.Errors {
			assert.NotEmpty(t, er.Code(), "%s over %s: error without code: %+v", what, proto, er)
		}
		if code != "" {
			assert.Equal(t, code, o.code(), "%s over %s: %+v", what, proto, o.Errors)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resps, err := gqlclient.SSE(ctx, e.endpoint, query, vars)
	require.NoError(t, err, "%s over SSE", what)
	require.NotEmpty(t, resps, "%s over SSE", what)
	biErr(t, resps[0], code, what+" over SSE")
}

// Event ids, run ids and step names: empty, too long, exactly at the limit,
// misplaced.
func TestBadInputIDs(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := biEnv(t, db)
		run := e.trigger()
		c := e.dial(gqlclient.TransportWS)

		// Empty event id.
		biErr(t, e.do(notifyMutation, map[string]any{"ev": ""}), "BAD_USER_INPUT", "notify with empty eventId")
		biErr(t, e.do(notifyMutation, map[string]any{"ev": "", "run": run}), "BAD_USER_INPUT", "targeted notify with empty eventId")
		biSubFails(e, "BAD_USER_INPUT", "wait with empty eventId", waitSubscription, map[string]any{"ev": ""})
		biSubFails(e, "BAD_USER_INPUT", "wait on a run with empty eventId", waitSubscription, map[string]any{"ev": "", "run": run})

		// Event ids of 256 bytes work (ASCII and multi-byte), 257 do not.
		for _, id := range []string{strings.Repeat("e", 256), strings.Repeat("é", 128), strings.Repeat("日", 85) + "x"} {
			require.Len(t, id, 256)
			s := e.subscribe(c, id, waitOpts{})
			e.awaitWaiting(id, 1)
			n := e.notify(id, "max", "")
			require.Len(t, n.NotifyResponse, 1)
			r := mustResult(t, s)
			require.Equal(t, id, r.EventID)
			// Stored as lookback, consumed by a durable step.
			lb := e.notify(id, "stored", run)
			require.NotNil(t, lb.Lookback)
			require.Equal(t, id, lb.Lookback.EventID)
			r = mustResult(t, e.subscribe(c, id, waitOpts{run: run, step: uid("s")}))
			require.Equal(t, `"stored"`, string(r.EventData))
			require.Equal(t, id, r.EventID)
		}
		for _, id := range []string{strings.Repeat("e", 257), "a" + strings.Repeat("é", 128)} {
			require.Len(t, id, 257)
			biErr(t, e.do(notifyMutation, map[string]any{"ev": id}), "BAD_USER_INPUT", "notify with a 257-byte eventId")
			biErr(t, e.do(notifyMutation, map[string]any{"ev": id, "run": run}), "BAD_USER_INPUT", "targeted notify with a 257-byte eventId")
			biSubFails(e, "BAD_USER_INPUT", "wait with a 257-byte eventId", waitSubscription, map[string]any{"ev": id})
		}
		require.Empty(t, e.run(run).LookbackEvents, "nothing stored by the refused notifies")

		// NUL in an event id.
		biErr(t, e.do(notifyMutation, map[string]any{"ev": "a\x00b"}), "BAD_USER_INPUT", "eventId with NUL")

		// Run ids: empty, prefix only, 256 bytes of own id works, 257 not.
		ev := uid("ev")
		for _, id := range []string{"", "wfr_"} {
			biErr(t, e.do(notifyMutation, map[string]any{"ev": ev, "run": id}), "BAD_USER_INPUT", "notify with workflowRunId "+id)
			biErr(t, e.do(triggerMutation, map[string]any{"id": id}), "BAD_USER_INPUT", "trigger with workflowRunId "+id)
			biErr(t, e.do(runQuery, map[string]any{"id": id}), "BAD_USER_INPUT", "workflowRun "+id)
			biErr(t, e.do(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": id}), "BAD_USER_INPUT", "cancel "+id)
			biErr(t, e.do(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, map[string]any{"id": id}), "BAD_USER_INPUT", "finishRun "+id)
			biSubFails(e, "BAD_USER_INPUT", "wait with workflowRunId "+id, waitSubscription, map[string]any{"ev": ev, "run": id})
			biErr(t, e.do(notifyMutation, rsNotifyVars(ev, 1, "", id, "step")), "BAD_USER_INPUT", "notify step with workflowRunId "+id)
		}
		long := strings.Repeat("r", 256)
		var trig struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
				Created       bool   `json:"created"`
			} `json:"trigger"`
		}
		e.ok(triggerMutation, map[string]any{"id": long}, &trig)
		require.True(t, trig.Trigger.Created)
		require.Equal(t, "wfr_"+long, trig.Trigger.WorkflowRunID)
		require.Equal(t, "wfr_"+long, e.run("wfr_"+long).WorkflowRunID)
		require.NotNil(t, e.notify(ev, 1, "wfr_"+long).Lookback)
		biErr(t, e.do(triggerMutation, map[string]any{"id": long + "r"}), "BAD_USER_INPUT", "trigger with a 257-byte id")

		// Labels: 256 bytes work, 257 not.
		e.ok(triggerMutation, map[string]any{"label": strings.Repeat("l", 256)}, nil)
		biErr(t, e.do(triggerMutation, map[string]any{"label": strings.Repeat("l", 257)}), "BAD_USER_INPUT", "label of 257 bytes")

		// Step names: without a run, empty, too long.
		biSubFails(e, "BAD_USER_INPUT", "stepName without workflowRunId", waitSubscription, map[string]any{"ev": ev, "step": "s"})
		biSubFails(e, "BAD_USER_INPUT", "empty stepName", waitSubscription, map[string]any{"ev": ev, "run": run, "step": ""})
		biSubFails(e, "BAD_USER_INPUT", "257-byte stepName", waitSubscription, map[string]any{"ev": ev, "run": run, "step": strings.Repeat("s", 257)})
		biErr(t, e.do(notifyMutation, rsNotifyVars(ev, 1, "", run, "")), "BAD_USER_INPUT", "notify step with empty stepName")
		biErr(t, e.do(notifyMutation, rsNotifyVars(ev, 1, "", run, strings.Repeat("s", 257))), "BAD_USER_INPUT", "notify step with a 257-byte stepName")
		s := e.subscribe(c, ev, waitOpts{run: run, step: strings.Repeat("s", 256)})
		e.awaitWaiting(ev, 1)
		require.Len(t, e.notify(ev, "step", run).NotifyResponse, 1)
		require.Equal(t, strings.Repeat("s", 256), *mustResult(t, s).StepName)
		require.Empty(t, e.waiters(ev), "no waiter left behind by refused waits")

		biHealthy(e)
	})
}

// Requests that are not GraphQL: malformed bodies, wrong content types and
// methods, oversized bodies, documents that do not parse or validate.
func TestBadInputRequests(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := biEnv(t, db)

		// Malformed JSON bodies: HTTP 400 with a code.
		for _, body := range []string{`{"query": "{ waiters(eventId: \"x\") { id } }"`, `not json`, ``, `{"query": }`, "{\"query\": \"\xff\"", `{"query": "{ __typename }"} trailing`} {
			status, r := biRawPost(t, e.endpoint, "application/json", []byte(body))
			assert.Equal(t, http.StatusBadRequest, status, "body %q", body)
			biErr(t, r, "", "malformed body "+body)
		}
		// JSON that is not an object.
		for _, body := range []string{`[1,2]`, `"{ __typename }"`, `42`, `true`, `null`, `[]`, `{"query": 42}`, `{"query": {"a": 1}}`, `{"query": "{ __typename }", "variables": [1]}`, `{"query": "{ __typename }", "variables": "x"}`} {
			status, r := biRawPost(t, e.endpoint, "application/json", []byte(body))
			assert.GreaterOrEqual(t, status, 400, "body %q", body)
			assert.Less(t, status, 500, "body %q", body)
			biErr(t, r, "", "non-object body "+body)
		}
		// No query at all.
		status, r := biRawPost(t, e.endpoint, "application/json", []byte(`{}`))
		assert.GreaterOrEqual(t, status, 400)
		biErr(t, r, "", "empty object body")

		// Documents that do not parse or validate.
		biErr(t, e.do(`{ nope }`, nil), "GRAPHQL_VALIDATION_FAILED", "unknown field")
		biErr(t, e.do(`{ waiters(eventId: "x") { id nope } }`, nil), "GRAPHQL_VALIDATION_FAILED", "unknown subfield")
		biErr(t, e.do(`{ waiters(eventId: "x", bogus: 1) { id } }`, nil), "GRAPHQL_VALIDATION_FAILED", "unknown argument")
		biErr(t, e.do(`{ waiters { id } }`, nil), "GRAPHQL_VALIDATION_FAILED", "missing argument")
		biErr(t, e.do(`mutation { nope }`, nil), "GRAPHQL_VALIDATION_FAILED", "unknown mutation")
		biErr(t, e.do(`{ waiters(eventId: "x") { id } `, nil), "GRAPHQL_PARSE_FAILED", "syntax error")
		biErr(t, e.do(`query A { __typename } query B { __typename }`, nil), "", "two operations, none named")
		biSubFails(e, "GRAPHQL_VALIDATION_FAILED", "unknown subscription field", `subscription { nope }`, nil)
		biSubFails(e, "GRAPHQL_PARSE_FAILED", "subscription syntax error", `subscription { waitForEvent(`, nil)

		// Content types and methods nobody serves.
		query, _ := json.Marshal(map[string]any{"query": "{ __typename }"})
		status, r = biRawPost(t, e.endpoint, "text/plain", query)
		assert.GreaterOrEqual(t, status, 400)
		biErr(t, r, "", "POST text/plain")
		status, r = biRaw(t, http.MethodPut, e.endpoint, "application/json", query)
		assert.GreaterOrEqual(t, status, 400)
		biErr(t, r, "", "PUT")

		// GET with variables that are not JSON.
		u := e.endpoint + "?query=" + url.QueryEscape(`query($ev: String!) { waiters(eventId: $ev) { id } }`) + "&variables=" + url.QueryEscape(`{bad`)
		status, r = biRaw(t, http.MethodGet, u, "", nil)
		assert.Equal(t, http.StatusBadRequest, status)
		biErr(t, r, "", "GET with malformed variables")

		// A POST body over the limit: 413 PAYLOAD_TOO_LARGE, nothing done.
		ev := uid("big")
		big := strings.Repeat("x", 2*biLimit+70<<10)
		body, _ := json.Marshal(map[string]any{"query": notifyMutation, "variables": map[string]any{"ev": ev, "data": big}})
		run := e.trigger()
		c := e.dial(gqlclient.TransportWS)
		s := e.subscribe(c, ev, waitOpts{run: run})
		e.awaitWaiting(ev, 1)
		status, r = biRawPost(t, e.endpoint, "application/json", body)
		assert.Equal(t, http.StatusRequestEntityTooLarge, status)
		biErr(t, r, "PAYLOAD_TOO_LARGE", "body over the limit")
		body, _ = json.Marshal(map[string]any{"query": "{ __typename }" + strings.Repeat(" ", 2*biLimit+70<<10)})
		status, r = biRawPost(t, e.endpoint, "application/json", body)
		assert.Equal(t, http.StatusRequestEntityTooLarge, status)
		biErr(t, r, "PAYLOAD_TOO_LARGE", "query over the limit")
		quiet(t, s)
		require.Len(t, e.waiters(ev), 1)
		// eventData over its own limit inside a body that fits.
		r = e.do(notifyMutation, map[string]any{"ev": ev, "data": strings.Repeat("x", biLimit)})
		biErr(t, r, "PAYLOAD_TOO_LARGE", "eventData over the limit")
		r = e.do(triggerMutation, map[string]any{"body": strings.Repeat("x", biLimit)})
		biErr(t, r, "PAYLOAD_TOO_LARGE", "trigger body over the limit")
		quiet(t, s)
		require.Len(t, e.waiters(ev), 1)

		biHealthy(e)
		// The waiter that watched all this still gets a normal notify.
		n := e.notify(ev, "fine", run)
		require.Len(t, n.NotifyResponse, 1)
		require.Equal(t, `"fine"`, string(mustResult(t, s).EventData))
	})
}

// Variables of the wrong type are BAD_USER_INPUT.
func TestBadInputVariables(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := biEnv(t, db)
		run := e.trigger()
		ev := uid("ev")
		for _, tc := range []struct {
			what string
			vars map[string]any
		}{
			{"eventId a number", map[string]any{"ev": 123}},
			{"eventId an object", map[string]any{"ev": map[string]any{"a": 1}}},
			{"eventId null", map[string]any{"ev": nil}},
			{"eventId missing", map[string]any{}},
			{"workflowRunId a list", map[string]any{"ev": ev, "run": []any{run}}},
			{"workflowRunId a bool", map[string]any{"ev": ev, "run": true}},
			{"step a string", map[string]any{"ev": ev, "step": "s"}},
			{"step without stepName", map[string]any{"ev": ev, "step": map[string]any{"workflowRunId": run}}},
			{"step with an unknown field", map[string]any{"ev": ev, "step": map[string]any{"workflowRunId": run, "stepName": "s", "x": 1}}},
			{"step with a numeric stepName", map[string]any{"ev": ev, "step": map[string]any{"workflowRunId": run, "stepName": 5}}},
		} {
			biErr(t, e.do(notifyMutation, tc.vars), "BAD_USER_INPUT", "notify: "+tc.what)
		}
		for _, tc := range []struct {
			what string
			vars map[string]any
		}{
			{"label a number", map[string]any{"label": 5}},
			{"label an object", map[string]any{"label": map[string]any{}}},
			{"id a float", map[string]any{"id": 1.5}},
		} {
			biErr(t, e.do(triggerMutation, tc.vars), "BAD_USER_INPUT", "trigger: "+tc.what)
		}
		runsQ := `query($state: RunState, $first: Int, $after: String) { workflowRuns(state: $state, first: $first, after: $after) { nodes { workflowRunId } } }`
		for _, tc := range []struct {
			what string
			vars map[string]any
		}{
			{"state not an enum value", map[string]any{"state": "NOPE"}},
			{"state lower case", map[string]any{"state": "run_started"}},
			{"first a string", map[string]any{"first": "2"}},
			{"first a float", map[string]any{"first": 2.5}},
			{"first beyond Int", map[string]any{"first": 1 << 40}},
			{"after a number", map[string]any{"after": 5}},
		} {
			biErr(t, e.do(runsQ, tc.vars), "BAD_USER_INPUT", "workflowRuns: "+tc.what)
		}
		biErr(t, e.do(`mutation($id: ID!, $s: RunState!) { finishRun(workflowRunId: $id, state: $s) { state } }`, map[string]any{"id": run, "s": "RUN_STARTED"}),
			"BAD_USER_INPUT", "finishRun to RUN_STARTED")
		biErr(t, e.do(`mutation($id: ID!, $s: RunState!) { finishRun(workflowRunId: $id, state: $s) { state } }`, map[string]any{"id": run, "s": "DONE"}),
			"BAD_USER_INPUT", "finishRun to an unknown state")
		biErr(t, e.do(`mutation($id: ID!, $s: RunState!) { finishRun(workflowRunId: $id, state: $s) { state } }`, map[string]any{"id": run, "s": "run_success"}),
			"BAD_USER_INPUT", "finishRun to a lower-case state")
		biErr(t, e.do(`query { workflowRuns(state: run_started) { nodes { workflowRunId } } }`, nil),
			"", "workflowRuns with a lower-case enum literal")

		// Timeouts that are not durations.
		for _, to := range []any{"abc", "", "0s", "-5s", -5, 0, true, 1.5, "1x", "99999999999999d", 1e18, map[string]any{}, []any{"1s"}} {
			biSubFails(e, "BAD_USER_INPUT", "timeout "+jsonString(to), waitSubscription, map[string]any{"ev": ev, "timeout": to})
		}
		require.Empty(t, e.waiters(ev))
		require.Equal(t, "RUN_STARTED", e.run(run).State)
		biHealthy(e)
	})
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// workflowRuns paging arguments.
func TestBadInputPaging(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := biEnv(t, db)
		e.trigger()
		q := `query($first: Int, $after: String) { workflowRuns(first: $first, after: $after) { nodes { workflowRunId } pageInfo { hasNextPage endCursor } } }`
		for _, first := range []int{0, -1, 101, 1000} {
			biErr(t, e.do(q, map[string]any{"first": first}), "BAD_USER_INPUT", "first "+jsonString(first))
		}
		for _, after := range []string{"!!!", "%%%", "not a cursor", base64.RawURLEncoding.EncodeToString([]byte("wfr_" + uid("gone"))), "AAAA", "====", strings.Repeat("A", 5000)} {
			biErr(t, e.do(q, map[string]any{"first": 2, "after": after}), "BAD_USER_INPUT", "after "+after[:min(len(after), 20)])
		}
		for _, first := range []int{1, 100} {
			var out struct {
				WorkflowRuns struct {
					Nodes []runView `json:"nodes"`
				} `json:"workflowRuns"`
			}
			e.ok(q, map[string]any{"first": first}, &out)
			require.Len(t, out.WorkflowRuns.Nodes, 1)
		}
		biHealthy(e)
	})
}

// SQL metacharacters, wildcards, quotes, unicode and trailing spaces in ids
// are taken literally, byte for byte.
func TestBadInputMetacharIDs(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := biEnv(t, db)
		ids := []string{
			`'; DROP TABLE runs; --`,
			`Robert'); DROP TABLE waiters;--`,
			`a"b`,
			`%`,
			`_`,
			`a%b_c`,
			`\`,
			`\\%`,
			`a\'b`,
			"日本-é-😀",
			"tab\tnew\nline",
			"case", "CASE",
		}
		biMetacharIDs(t, e, ids)
	})
}

// Ids that differ only by trailing spaces are different ids (byte for byte;
// MySQL's PAD SPACE collations would say they are equal).
func TestBadInputTrailingSpaceIDs(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := biEnv(t, db)
		biMetacharIDs(t, e, []string{"pad", "pad ", "pad  ", " pad"})
	})
}

func biMetacharIDs(t *testing.T, e *env, ids []string) {
	t.Helper()
	c := e.dial(gqlclient.TransportWS)
	subs := map[string][2]*gqlclient.Sub{}
	for _, id := range ids {
		var trig struct {
			Trigger struct {
				WorkflowRunID string  `json:"workflowRunId"`
				Created       bool    `json:"created"`
				Run           runView `json:"run"`
			} `json:"trigger"`
		}
		e.ok(triggerMutation, map[string]any{"id": id, "label": id, "body": map[string]any{"id": id}}, &trig)
		assert.True(t, trig.Trigger.Created, "run id %q must be a new run (byte for byte)", id)
		require.Equal(t, "wfr_"+id, trig.Trigger.WorkflowRunID)
	}
	for _, id := range ids {
		r := e.run("wfr_" + id)
		require.NotNil(t, r, "run %q", id)
		assert.Equal(t, "wfr_"+id, r.WorkflowRunID, "run %q read back", id)
		if assert.NotNil(t, r.Label) {
			assert.Equal(t, id, *r.Label)
		}
		assert.JSONEq(t, jsonString(map[string]any{"id": id}), string(r.Body), "body of %q", id)
		// One run-less waiter and one durable step waiter per event id,
		// the step named like the id too.
		subs[id] = [2]*gqlclient.Sub{
			e.subscribe(c, id, waitOpts{}),
			e.subscribe(c, id, waitOpts{run: "wfr_" + id, step: id}),
		}
	}
	for _, id := range ids {
		eventually(t, 10*time.Second, func() bool { return len(e.waiters(id)) >= 2 }, "waiters on %q", id)
	}
	for _, id := range ids {
		ws := e.waiters(id)
		assert.Len(t, ws, 2, "waiters(%q) matches only its own event id: %+v", id, ws)
		for _, w := range ws {
			assert.Equal(t, id, w.EventID)
		}
	}
	// A targeted notify reaches only the run's waiter, a broadcast the other.
	for _, id := range ids {
		n := e.notify(id, map[string]any{"to": id}, "wfr_"+id)
		if assert.Len(t, n.NotifyResponse, 1, "targeted notify on %q", id) {
			assert.Equal(t, "wfr_"+id, *n.NotifyResponse[0].WorkflowRunID)
			assert.Equal(t, id, *n.NotifyResponse[0].Waiter.StepName)
		}
		r := mustResult(t, subs[id][1])
		assert.Equal(t, id, r.EventID)
		assert.Equal(t, id, *r.StepName)
		assert.Equal(t, "wfr_"+id, *r.WorkflowRunID)
		assert.JSONEq(t, jsonString(map[string]any{"to": id}), string(r.EventData))

		b := e.notify(id, "all", "")
		assert.Len(t, b.NotifyResponse, 1, "broadcast on %q", id)
		r = mustResult(t, subs[id][0])
		assert.Equal(t, id, r.EventID)
	}
	// Lookback by (run, event id), and steps by name.
	for _, id := range ids {
		n := e.notify(id, id, "wfr_"+id)
		require.NotNil(t, n.Lookback, "%q", id)
		assert.Equal(t, id, n.Lookback.EventID)
	}
	for _, id := range ids {
		lbs := e.run("wfr_" + id).LookbackEvents
		if assert.Len(t, lbs, 1, "lookback events of %q", id) {
			assert.Equal(t, id, lbs[0].EventID)
		}
		steps := e.run("wfr_" + id).Steps
		if assert.Len(t, steps, 1, "steps of %q", id) {
			assert.Equal(t, id, steps[0].StepName)
		}
		r := mustResult(t, e.subscribe(c, id, waitOpts{run: "wfr_" + id}))
		assert.Equal(t, jsonString(id), string(r.EventData), "lookback of %q", id)
	}
	// Label filters are literal too.
	for _, id := range ids {
		var out struct {
			WorkflowRuns struct {
				Nodes []runView `json:"nodes"`
			} `json:"workflowRuns"`
		}
		e.ok(`query($l: String) { workflowRuns(label: $l, first: 100) { nodes { workflowRunId label } } }`, map[string]any{"l": id}, &out)
		if assert.Len(t, out.WorkflowRuns.Nodes, 1, "workflowRuns(label: %q)", id) {
			assert.Equal(t, "wfr_"+id, out.WorkflowRuns.Nodes[0].WorkflowRunID)
		}
	}
	biHealthy(e)
}

// A subscription sent as a plain POST (no Accept: text/event-stream) is not
// a stream the server can keep open: it must be refused with a code at once,
// not hang until the event arrives (default timeout 7 days).
func TestBadInputSubscriptionOverPlainPOST(t *testing.T) {
	e := biEnv(t, testdb.SQLite(t))
	ev := uid("post-sub")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := gqlclient.Post(ctx, e.endpoint, waitSubscription, map[string]any{"ev": ev})
	require.NoError(t, err, "a subscription over a plain POST hung (waiters now: %+v)", e.waiters(ev))
	biErr(t, r, "", "subscription over plain POST")
	eventually(t, 5*time.Second, func() bool { return len(e.waiters(ev)) == 0 }, "no waiter left behind")
	biHealthy(e)
}

// Garbage on a websocket closes that connection only.
func TestBadInputWebsocketGarbage(t *testing.T) {
	e := biEnv(t, testdb.SQLite(t))
	for _, proto := range []string{gqlclient.TransportWS, gqlclient.LegacyWS} {
		for _, msg := range []string{"not json", `{"type":"subscribe","id":"1","payload":"x"}`, `[1,2,3]`, `{"type":"nope"}`} {
			func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				ws, resp, err := websocket.Dial(ctx, strings.Replace(e.endpoint, "http://", "ws://", 1), &websocket.DialOptions{Subprotocols: []string{proto}})
				require.NoError(t, err)
				if resp != nil && resp.Body != nil {
					resp.Body.Close()
				}
				defer ws.CloseNow()
				require.NoError(t, ws.Write(ctx, websocket.MessageText, []byte(`{"type":"connection_init"}`)))
				require.NoError(t, ws.Write(ctx, websocket.MessageText, []byte(msg)))
				// The server answers with an error message or closes; it
				// never leaves the client hanging without either.
				for {
					_, b, err := ws.Read(ctx)
					require.NotErrorIs(t, err, context.DeadlineExceeded, "%s %q: no answer", proto, msg)
					if err != nil {
						return // closed by the server
					}
					var m struct{ Type string }
					_ = json.Unmarshal(b, &m)
					if m.Type == "error" || m.Type == "connection_error" {
						return
					}
				}
			}()
		}
	}
	biHealthy(e)
}

type pgConn struct {
	WorkflowRuns struct {
		Nodes    []runView `json:"nodes"`
		PageInfo struct {
			HasNextPage bool    `json:"hasNextPage"`
			EndCursor   *string `json:"endCursor"`
		} `json:"pageInfo"`
	} `json:"workflowRuns"`
}

const pgQuery = `query($state: RunState, $label: String, $first: Int, $after: String) {
  workflowRuns(state: $state, label: $label, first: $first, after: $after) {
    nodes { workflowRunId state label }
    pageInfo { hasNextPage endCursor }
  }
}`

// pgAll pages through workflowRuns two at a time and returns the ids, checking
// hasNextPage and endCursor on every page.
func pgAll(e *env, state, label string) []string {
	e.t.Helper()
	t := e.t
	var ids []string
	var after *string
	for page := 0; ; page++ {
		require.Less(t, page, 100, "paging does not end")
		vars := map[string]any{"first": 2}
		if state != "" {
			vars["state"] = state
		}
		if label != "" {
			vars["label"] = label
		}
		if after != nil {
			vars["after"] = *after
		}
		var out pgConn
		e.ok(pgQuery, vars, &out)
		conn := out.WorkflowRuns
		require.LessOrEqual(t, len(conn.Nodes), 2)
		for _, n := range conn.Nodes {
			if state != "" {
				require.Equal(t, state, n.State)
			}
			if label != "" {
				require.NotNil(t, n.Label)
				require.Equal(t, label, *n.Label)
			}
			ids = append(ids, n.WorkflowRunID)
		}
		if len(conn.Nodes) == 0 {
			require.Nil(t, conn.PageInfo.EndCursor, "an empty page has no endCursor")
		} else {
			require.NotNil(t, conn.PageInfo.EndCursor)
		}
		if !conn.PageInfo.HasNextPage {
			return ids
		}
		require.Len(t, conn.Nodes, 2, "a page that is not the last is full")
		after = conn.PageInfo.EndCursor
	}
}

// workflowRuns pages newest first, with state and label filters.
func TestWorkflowRunsPagination(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		type made struct{ id, state, label string }
		var runs []made
		for i := range 9 {
			label := []string{"alpha", "beta", "gamma"}[i%3]
			var trig struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			e.ok(triggerMutation, map[string]any{"id": uid("pg"), "label": label}, &trig)
			runs = append(runs, made{trig.Trigger.WorkflowRunID, "RUN_STARTED", label})
		}
		// A run without a label.
		runs = append(runs, made{e.trigger(), "RUN_STARTED", ""})
		// Change states, not in creation order.
		for _, i := range []int{4, 1, 7} {
			e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": runs[i].id}, nil)
			runs[i].state = "RUN_CANCELED"
		}
		for _, i := range []int{0, 5} {
			e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS, result: 1) { state } }`, map[string]any{"id": runs[i].id}, nil)
			runs[i].state = "RUN_SUCCESS"
		}
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_FAILED) { state } }`, map[string]any{"id": runs[8].id}, nil)
		runs[8].state = "RUN_FAILED"

		want := func(state, label string) []string {
			var ids []string
			for i := len(runs) - 1; i >= 0; i-- { // newest first
				r := runs[i]
				if (state == "" || r.state == state) && (label == "" || r.label == label) {
					ids = append(ids, r.id)
				}
			}
			return ids
		}
		for _, f := range []struct{ state, label string }{
			{"", ""},
			{"RUN_STARTED", ""},
			{"RUN_CANCELED", ""},
			{"RUN_SUCCESS", ""},
			{"RUN_FAILED", ""},
			{"", "alpha"},
			{"", "beta"},
			{"RUN_CANCELED", "beta"},
			{"RUN_STARTED", "gamma"},
			{"RUN_SUCCESS", "gamma"},
		} {
			require.Equal(t, want(f.state, f.label), pgAll(e, f.state, f.label), "state %q label %q", f.state, f.label)
		}

		// Nothing matches: no nodes, no next page, no cursor.
		var out pgConn
		e.ok(pgQuery, map[string]any{"label": "nobody", "first": 2}, &out)
		require.Empty(t, out.WorkflowRuns.Nodes)
		require.False(t, out.WorkflowRuns.PageInfo.HasNextPage)
		require.Nil(t, out.WorkflowRuns.PageInfo.EndCursor)

		// Exactly one page: hasNextPage false.
		e.ok(pgQuery, map[string]any{"state": "RUN_SUCCESS", "first": 2}, &out)
		require.Len(t, out.WorkflowRuns.Nodes, 2)
		require.False(t, out.WorkflowRuns.PageInfo.HasNextPage, "two matches, first 2: no next page")

		// The default page size holds all ten.
		e.ok(pgQuery, nil, &out)
		require.Len(t, out.WorkflowRuns.Nodes, len(runs))
		require.False(t, out.WorkflowRuns.PageInfo.HasNextPage)

		// A cursor stays valid while new runs arrive: they come before it.
		e.ok(pgQuery, map[string]any{"first": 3}, &out)
		cursor := *out.WorkflowRuns.PageInfo.EndCursor
		e.trigger()
		e.ok(pgQuery, map[string]any{"first": 100, "after": cursor}, &out)
		require.Equal(t, want("", "")[3:], pgIDs(out))

		// A cursor from a run whose state then changed still pages on.
		all := want("", "")
		e.ok(pgQuery, map[string]any{"state": "RUN_STARTED", "first": 1}, &out)
		startedCursor := *out.WorkflowRuns.PageInfo.EndCursor
		first := out.WorkflowRuns.Nodes[0].WorkflowRunID
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": first}, nil)
		e.ok(pgQuery, map[string]any{"state": "RUN_STARTED", "first": 100, "after": startedCursor}, &out)
		var rest []string
		for _, id := range all {
			for _, r := range runs {
				if r.id == id && r.state == "RUN_STARTED" && id != first {
					rest = append(rest, id)
				}
			}
		}
		require.Equal(t, rest, pgIDs(out))
	})
}

func pgIDs(c pgConn) []string {
	var ids []string
	for _, n := range c.WorkflowRuns.Nodes {
		ids = append(ids, n.WorkflowRunID)
	}
	return ids
}

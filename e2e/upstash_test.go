package e2e

// The Upstash REST API (package upstash) over real HTTP, on SQLite and
// MariaDB: the shapes Upstash's npm Client reads, its interplay with
// GraphQL, and bad input answered in Upstash's error shape. The real npm
// Client runs against it in upstash_npm_test.go.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// restResp is one answer of the REST API.
type restResp struct {
	Status int
	Header http.Header
	Body   []byte
}

// errorMessage is the message of an answer in Upstash's error shape; the
// test fails if the answer is not exactly {"error": "..."}.
func (r restResp) errorMessage(t *testing.T) string {
	t.Helper()
	var m map[string]any
	require.NoError(t, json.Unmarshal(r.Body, &m), "error body %s", r.Body)
	require.Len(t, m, 1, "an error is {\"error\": ...} alone: %s", r.Body)
	msg, ok := m["error"].(string)
	require.True(t, ok, "error is a string: %s", r.Body)
	require.NotEmpty(t, msg)
	assert.NotRegexp(t, secInternals, msg, "an error shows internals")
	return msg
}

// rest calls the REST API with the token ("" for none).
func (e *env) rest(method, path, token string, body []byte) restResp {
	e.t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctxT(e.t), method, e.srv.URL+path, rd)
	require.NoError(e.t, err)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(e.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(e.t, err)
	if resp.StatusCode != http.StatusOK {
		require.Equal(e.t, "application/json", resp.Header.Get("Content-Type"), "%s %s: %s", method, path, b)
	}
	return restResp{Status: resp.StatusCode, Header: resp.Header, Body: b}
}

// restOK calls the REST API, requires 200 and decodes the body into v.
func (e *env) restOK(method, path string, body []byte, v any) {
	e.t.Helper()
	r := e.rest(method, path, "", body)
	require.Equal(e.t, http.StatusOK, r.Status, "%s %s: %s", method, path, r.Body)
	if v != nil {
		require.NoError(e.t, json.Unmarshal(r.Body, v), "%s", r.Body)
	}
}

// restFails calls the REST API and requires the status and Upstash's error shape.
func (e *env) restFails(status int, method, path string, body []byte) string {
	e.t.Helper()
	r := e.rest(method, path, "", body)
	require.Equal(e.t, status, r.Status, "%s %s: %s", method, path, r.Body)
	return r.errorMessage(e.t)
}

// upWaiter is Upstash's Waiter with Rendezvous' own fields.
type upWaiter struct {
	URL           string              `json:"url"`
	Deadline      int64               `json:"deadline"`
	Headers       map[string][]string `json:"headers"`
	ID            string              `json:"id"`
	EventID       string              `json:"eventId"`
	WorkflowRunID *string             `json:"workflowRunId"`
	StepName      *string             `json:"stepName"`
	CreatedAt     int64               `json:"createdAt"`
}

type upNotifyResponse struct {
	Waiter        upWaiter `json:"waiter"`
	MessageID     string   `json:"messageId"`
	Deduplicated  bool     `json:"deduplicated"`
	Error         *string  `json:"error"`
	WorkflowRunID *string  `json:"workflowRunId"`
}

type upStep struct {
	StepName            string  `json:"stepName"`
	StepType            string  `json:"stepType"`
	MessageID           string  `json:"messageId"`
	Out                 *string `json:"out"`
	State               string  `json:"state"`
	CreatedAt           int64   `json:"createdAt"`
	WaitEventID         string  `json:"waitEventId"`
	WaitTimeout         *bool   `json:"waitTimeout"`
	WaitTimeoutDeadline int64   `json:"waitTimeoutDeadline"`
}

type upRun struct {
	WorkflowRunID          string  `json:"workflowRunId"`
	WorkflowURL            *string `json:"workflowUrl"`
	WorkflowState          string  `json:"workflowState"`
	WorkflowRunCreatedAt   int64   `json:"workflowRunCreatedAt"`
	WorkflowRunCompletedAt *int64  `json:"workflowRunCompletedAt"`
	WorkflowRunResponse    *string `json:"workflowRunResponse"`
	Label                  *string `json:"label"`
	Steps                  []struct {
		Type  string   `json:"type"`
		Steps []upStep `json:"steps"`
	} `json:"steps"`
}

type upLogs struct {
	Cursor *string `json:"cursor"`
	Runs   []upRun `json:"runs"`
}

func notifyPath(run, eventID string) string {
	if run == "" {
		return "/v2/notify/" + url.PathEscape(eventID)
	}
	return "/v2/notify/" + url.PathEscape(run) + "/" + url.PathEscape(eventID)
}

func TestUpstashNotify(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)

		// Nobody waiting: an empty list, nothing stored.
		var none []upNotifyResponse
		e.restOK(http.MethodPost, notifyPath("", uid("nobody")), []byte(`"x"`), &none)
		require.NotNil(t, none)
		require.Empty(t, none)

		// A string body stays a string, JSON stays JSON byte for byte, an
		// empty body is no data; the event id may hold a slash and unicode.
		for _, c := range []struct{ body, want string }{
			{`hello world`, `"hello world"`},
			{`{"b":[1,2.50,"ü"],"a":null}`, `{"b":[1,2.50,"ü"],"a":null}`},
			{`"quoted"`, `"quoted"`},
			{``, `null`},
		} {
			ev := uid("order/ü")
			run := e.trigger()
			c1 := e.dial("graphql-transport-ws")
			s := e.subscribe(c1, ev, waitOpts{run: run, step: "wait"})
			ws := e.awaitWaiting(ev, 1)
			before := time.Now()
			var got []upNotifyResponse
			e.restOK(http.MethodPost, notifyPath("", ev), []byte(c.body), &got)
			require.Len(t, got, 1, "body %q", c.body)
			r := got[0]
			assert.NotEmpty(t, r.MessageID)
			assert.Equal(t, "", *r.Error)
			assert.False(t, r.Deduplicated)
			assert.Equal(t, run, *r.WorkflowRunID)
			assert.Equal(t, ws[0].ID, r.Waiter.ID)
			assert.Equal(t, ev, r.Waiter.EventID)
			assert.Equal(t, "wait", *r.Waiter.StepName)
			assert.Equal(t, "", r.Waiter.URL)
			assert.NotNil(t, r.Waiter.Headers)
			// Default timeout 7 days, in Unix seconds as Upstash gives it.
			assert.InDelta(t, before.Add(7*24*time.Hour).Unix(), r.Waiter.Deadline, 60)
			res := mustResult(t, s)
			assert.JSONEq(t, c.want, string(res.EventData), "body %q", c.body)
			if c.want != "null" {
				assert.Equal(t, c.want, string(res.EventData), "bytes kept")
			}
			assert.Equal(t, r.MessageID, *res.MessageID)
		}

		// Targeted with nobody waiting: stored as lookback (an empty list,
		// as Upstash answers), seen through GraphQL, consumed by the wait.
		run := e.trigger()
		ev := uid("lookback")
		var stored []upNotifyResponse
		e.restOK(http.MethodPost, notifyPath(run, ev), []byte(`{"paid":true}`), &stored)
		require.Empty(t, stored)
		lb := e.run(run).LookbackEvents
		require.Len(t, lb, 1)
		assert.JSONEq(t, `{"paid":true}`, string(lb[0].EventData))
		res := mustResult(t, e.subscribe(e.dial("graphql-transport-ws"), ev, waitOpts{run: run}))
		assert.JSONEq(t, `{"paid":true}`, string(res.EventData))
		// The short id names the same run.
		e.restOK(http.MethodPost, notifyPath(strings.TrimPrefix(run, "wfr_"), ev), []byte(`1`), &stored)
		require.Len(t, e.run(run).LookbackEvents, 1)

		// Unknown run 404, ended run 400.
		e.restFails(http.StatusNotFound, http.MethodPost, notifyPath(uid("wfr_missing"), ev), []byte(`1`))
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": run}, nil)
		msg := e.restFails(http.StatusBadRequest, http.MethodPost, notifyPath(run, ev), []byte(`1`))
		assert.Contains(t, msg, "RUN_CANCELED")
	})
}

func TestUpstashGetWaiters(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ev := uid("waiters")
		var empty []upWaiter
		e.restOK(http.MethodGet, "/v2/waiters/"+url.PathEscape(ev), nil, &empty)
		require.NotNil(t, empty)
		require.Empty(t, empty)

		// Two waiters registered over GraphQL: a run's durable step and a
		// runless one, oldest first.
		run := e.trigger()
		c := e.dial("graphql-transport-ws")
		s1 := e.subscribe(c, ev, waitOpts{run: run, step: "approve", timeout: "1h"})
		e.awaitWaiting(ev, 1)
		s2 := e.subscribe(c, ev, waitOpts{timeout: 90})
		gw := e.awaitWaiting(ev, 2)
		var ws []upWaiter
		e.restOK(http.MethodGet, "/v2/waiters/"+url.PathEscape(ev), nil, &ws)
		require.Len(t, ws, 2)
		assert.Equal(t, gw[0].ID, ws[0].ID)
		assert.Equal(t, run, *ws[0].WorkflowRunID)
		assert.Equal(t, "approve", *ws[0].StepName)
		assert.InDelta(t, e.clock.Now().Add(time.Hour).Unix(), ws[0].Deadline, 30)
		assert.Equal(t, gw[1].ID, ws[1].ID)
		assert.Nil(t, ws[1].WorkflowRunID)
		assert.InDelta(t, e.clock.Now().Add(90*time.Second).Unix(), ws[1].Deadline, 30)
		for _, w := range ws {
			assert.Equal(t, "", w.URL)
			assert.Equal(t, map[string][]string{}, w.Headers)
			assert.Equal(t, ev, w.EventID)
		}

		// Resolved by the REST notify: both subscribers get it, the list empties.
		var got []upNotifyResponse
		e.restOK(http.MethodPost, notifyPath("", ev), []byte(`"go"`), &got)
		require.Len(t, got, 2)
		assert.Equal(t, `"go"`, string(mustResult(t, s1).EventData))
		assert.Equal(t, `"go"`, string(mustResult(t, s2).EventData))
		e.restOK(http.MethodGet, "/v2/waiters/"+url.PathEscape(ev), nil, &ws)
		assert.Empty(t, ws)
	})
}

func TestUpstashCancel(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		type cancelled struct {
			Cancelled *int `json:"cancelled"`
		}
		bulk := func(q url.Values) int {
			t.Helper()
			var c cancelled
			e.restOK(http.MethodDelete, "/v2/workflows/runs?"+q.Encode(), nil, &c)
			require.NotNil(t, c.Cancelled)
			return *c.Cancelled
		}
		labeled := func(label string) string {
			t.Helper()
			var out struct {
				Trigger struct {
					WorkflowRunID string `json:"workflowRunId"`
				} `json:"trigger"`
			}
			e.ok(triggerMutation, map[string]any{"id": uid("run"), "label": label}, &out)
			return out.Trigger.WorkflowRunID
		}

		// One run: its waiter ends CANCELED, its subscriber hears RUN_NOT_ACTIVE.
		run := e.trigger()
		ev := uid("cancel")
		s := e.subscribe(e.dial("graphql-transport-ws"), ev, waitOpts{run: run, step: "s"})
		e.awaitWaiting(ev, 1)
		e.restOK(http.MethodDelete, "/v2/workflows/runs/"+url.PathEscape(run)+"?cancel=true", nil, nil)
		assert.Equal(t, "RUN_CANCELED", e.run(run).State)
		assert.Equal(t, "RUN_NOT_ACTIVE", result(t, s, 15*time.Second).code())
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs/"+url.PathEscape(run), nil)
		e.restFails(http.StatusNotFound, http.MethodDelete, "/v2/workflows/runs/"+uid("wfr_nope"), nil)

		// Several ids: unknown and ended ones are skipped, not errors; the
		// short form of an id names the same run.
		a, b := e.trigger(), e.trigger()
		n := bulk(url.Values{"workflowRunIds": {a, strings.TrimPrefix(b, "wfr_"), run, uid("wfr_unknown")}})
		assert.Equal(t, 2, n)
		assert.Equal(t, "RUN_CANCELED", e.run(a).State)
		assert.Equal(t, "RUN_CANCELED", e.run(b).State)

		// By label (any of several), within count.
		lab := uid("lab")
		l1, l2, l3 := labeled(lab), labeled(lab), labeled(lab+"-other")
		other := e.trigger()
		assert.Equal(t, 1, bulk(url.Values{"label": {lab}, "count": {"1"}}))
		assert.Equal(t, "RUN_CANCELED", e.run(l2).State, "newest first")
		assert.Equal(t, "RUN_STARTED", e.run(l1).State)
		assert.Equal(t, 2, bulk(url.Values{"label": {lab, lab + "-other"}, "count": {"100"}}))
		assert.Equal(t, "RUN_CANCELED", e.run(l3).State)
		assert.Equal(t, "RUN_STARTED", e.run(other).State)

		// By creation date (Unix ms, inclusive): a run created "later" on
		// the engine's clock is outside toDate.
		cut := e.clock.Now()
		e.clock.Advance(time.Hour)
		later := e.trigger()
		n = bulk(url.Values{"toDate": {fmt.Sprint(cut.UnixMilli())}, "count": {"100"}})
		assert.GreaterOrEqual(t, n, 1)
		assert.Equal(t, "RUN_CANCELED", e.run(other).State)
		assert.Equal(t, "RUN_STARTED", e.run(later).State)
		assert.Equal(t, 0, bulk(url.Values{"fromDate": {fmt.Sprint(e.clock.Now().Add(time.Hour).UnixMilli())}}))
		// All (what cancel({all: true}) sends: only count).
		assert.Equal(t, 1, bulk(url.Values{"count": {"100"}}))
		assert.Equal(t, "RUN_CANCELED", e.run(later).State)
		assert.Equal(t, 0, bulk(url.Values{}))

		// Filters it cannot apply are refused, never ignored.
		for _, f := range []string{"callerIp", "flowControlKey", "host", "path", "workflowCreatedAt", "nonsense"} {
			msg := e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?"+f+"=x&count=100", nil)
			assert.Contains(t, msg, f)
		}
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?count=0", nil)
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?count=1001", nil)
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?fromDate=yesterday", nil)
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs", []byte(`{"workflowRunIds":["x"]}`))
		// A malformed query string must not lose its filter and cancel everything.
		spared := e.trigger()
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?label=%zz&count=100", nil)
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?workflowRunIds=%zz", nil)
		assert.Equal(t, "RUN_STARTED", e.run(spared).State)
	})
}

func TestUpstashLogs(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		logs := func(q url.Values) upLogs {
			t.Helper()
			q.Set("groupBy", "workflowRunId")
			var l upLogs
			e.restOK(http.MethodGet, "/v2/workflows/events?"+q.Encode(), nil, &l)
			return l
		}
		label := uid("logs")
		var out struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		e.ok(triggerMutation, map[string]any{"id": uid("run"), "label": label, "body": map[string]any{"order": 7}}, &out)
		run := out.Trigger.WorkflowRunID

		// Steps: a wait notified, a notify step, a wait timed out, a wait
		// still waiting.
		ev := uid("paid")
		c := e.dial("graphql-transport-ws")
		s := e.subscribe(c, ev, waitOpts{run: run, step: "wait paid"})
		e.awaitWaiting(ev, 1)
		var notified []upNotifyResponse
		e.restOK(http.MethodPost, notifyPath(run, ev), []byte(`paid!`), &notified)
		require.Len(t, notified, 1)
		mustResult(t, s)
		e.ok(notifyMutation, map[string]any{"ev": uid("shipped"), "data": "box", "step": map[string]any{"workflowRunId": run, "stepName": "tell"}}, nil)
		short := e.subscribe(c, uid("never"), waitOpts{run: run, step: "short", timeout: "1s"})
		e.clock.Advance(2 * time.Second)
		require.True(t, result(t, short, 15*time.Second).Result.Timeout)
		e.subscribe(c, uid("later"), waitOpts{run: run, step: "pending"})
		eventually(t, 10*time.Second, func() bool { return len(e.run(run).Steps) == 4 })

		l := logs(url.Values{"workflowRunId": {run}})
		require.Len(t, l.Runs, 1)
		assert.Nil(t, l.Cursor, "one page")
		r := l.Runs[0]
		assert.Equal(t, run, r.WorkflowRunID)
		assert.Equal(t, "RUN_STARTED", r.WorkflowState)
		assert.Equal(t, label, *r.Label)
		assert.Nil(t, r.WorkflowRunCompletedAt)
		assert.InDelta(t, time.Now().UnixMilli(), r.WorkflowRunCreatedAt, float64(time.Minute/time.Millisecond))
		require.Len(t, r.Steps, 5, "%+v", r.Steps)
		init := r.Steps[0]
		assert.Equal(t, "sequential", init.Type)
		assert.Equal(t, "Initial", init.Steps[0].StepType)
		assert.JSONEq(t, `{"order":7}`, *init.Steps[0].Out)
		wait := r.Steps[1].Steps[0]
		assert.Equal(t, "Wait", wait.StepType)
		assert.Equal(t, "wait paid", wait.StepName)
		assert.Equal(t, ev, wait.WaitEventID)
		assert.Equal(t, "paid!", *wait.Out, "a string stays the string the client sent")
		assert.False(t, *wait.WaitTimeout)
		assert.Equal(t, notified[0].MessageID, wait.MessageID)
		assert.Equal(t, "STEP_SUCCESS", wait.State)
		tell := r.Steps[2].Steps[0]
		assert.Equal(t, "Notify", tell.StepType)
		var tellOut struct {
			EventData      string `json:"eventData"`
			NotifyResponse []any  `json:"notifyResponse"`
		}
		require.NoError(t, json.Unmarshal([]byte(*tell.Out), &tellOut))
		assert.Equal(t, "box", tellOut.EventData)
		assert.NotNil(t, tellOut.NotifyResponse)
		timedOut := r.Steps[3].Steps[0]
		assert.Equal(t, "short", timedOut.StepName)
		assert.True(t, *timedOut.WaitTimeout)
		assert.Nil(t, timedOut.Out)
		assert.Equal(t, "next", r.Steps[4].Type)
		assert.Equal(t, "pending", r.Steps[4].Steps[0].StepName)
		assert.Equal(t, "STEP_PROGRESS", r.Steps[4].Steps[0].State)

		// Ended: completedAt and the result as workflowRunResponse.
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS, result: "done") { state } }`, map[string]any{"id": run}, nil)
		r = logs(url.Values{"workflowRunId": {run}}).Runs[0]
		assert.Equal(t, "RUN_SUCCESS", r.WorkflowState)
		require.NotNil(t, r.WorkflowRunCompletedAt)
		assert.Equal(t, "done", *r.WorkflowRunResponse)
		assert.Equal(t, "STEP_CANCELED", r.Steps[4].Steps[0].State, "the pending wait ended with its run")

		// Paging by label: newest first, cursor until the last page.
		var ids []string
		for range 5 {
			e.ok(triggerMutation, map[string]any{"id": uid("run"), "label": label + "-p"}, &out)
			ids = append([]string{out.Trigger.WorkflowRunID}, ids...)
		}
		var seen []string
		q := url.Values{"label": {label + "-p"}, "count": {"2"}}
		for page := 0; ; page++ {
			require.Less(t, page, 5)
			l := logs(q)
			for _, r := range l.Runs {
				seen = append(seen, r.WorkflowRunID)
			}
			if l.Cursor == nil {
				break
			}
			q.Set("cursor", *l.Cursor)
		}
		assert.Equal(t, ids, seen)

		// State and dates.
		l = logs(url.Values{"label": {label, label + "-p"}, "state": {"RUN_SUCCESS"}})
		require.Len(t, l.Runs, 1)
		assert.Equal(t, run, l.Runs[0].WorkflowRunID)
		assert.Empty(t, logs(url.Values{"label": {label}, "fromDate": {fmt.Sprint(e.clock.Now().Add(time.Hour).UnixMilli())}}).Runs)
		assert.Len(t, logs(url.Values{"label": {label}, "toDate": {fmt.Sprint(e.clock.Now().Add(time.Hour).UnixMilli())}}).Runs, 1)
		assert.Empty(t, logs(url.Values{"workflowRunId": {uid("wfr_none")}}).Runs)

		// Bad input.
		for _, q := range []string{
			"groupBy=workflowRunId&state=DONE",
			"groupBy=workflowRunId&count=0",
			"groupBy=workflowRunId&count=101",
			"groupBy=workflowRunId&cursor=%21%21",
			"groupBy=workflowRunId&cursor=" + url.QueryEscape("d2ZyX25vcGU"),
			"groupBy=workflowRunId&workflowUrl=a&workflowUrl=b",
			"groupBy=workflowRunId&messageId=m",
			"groupBy=workflowRunId&toDate=-1",
			"groupBy=workflowRunId&state=RUN_STARTED&state=RUN_SUCCESS",
			"groupBy=workflowRunId&label=%zz",
			"",
		} {
			e.restFails(http.StatusBadRequest, http.MethodGet, "/v2/workflows/events?"+q, nil)
		}
	})
}

// TestUpstashBadInput: what GraphQL refuses, the REST API refuses too, in
// Upstash's error shape, without internals.
func TestUpstashBadInput(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		const limit = 4 << 10
		e := newEnv(t, db, func(c *service.Config) { c.Engine.MaxPayloadBytes = limit })
		before := e.scrape(nil)
		ev := uid("bad")
		big := bytes.Repeat([]byte("a"), limit+1)
		e.restFails(http.StatusRequestEntityTooLarge, http.MethodPost, notifyPath("", ev), []byte(`"`+string(big)+`"`))
		// Over the HTTP body limit: refused before it is read.
		huge := bytes.Repeat([]byte("b"), 2*limit+(64<<10)+1)
		e.restFails(http.StatusRequestEntityTooLarge, http.MethodPost, notifyPath("", ev), huge)
		e.restFails(http.StatusBadRequest, http.MethodPost, notifyPath("", ev), []byte{0xff, 0xfe})
		e.restFails(http.StatusBadRequest, http.MethodPost, notifyPath("", strings.Repeat("e", 257)), []byte(`1`))
		e.restFails(http.StatusBadRequest, http.MethodPost, notifyPath("", "nul\x00"), []byte(`1`))
		e.restFails(http.StatusBadRequest, http.MethodPost, "/v2/notify/%ff", []byte(`1`))
		e.restFails(http.StatusBadRequest, http.MethodPost, notifyPath("wfr_", ev), []byte(`1`))
		e.restFails(http.StatusBadRequest, http.MethodGet, "/v2/waiters/"+strings.Repeat("e", 257), nil)
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs/wfr_", nil)
		e.restFails(http.StatusBadRequest, http.MethodDelete, "/v2/workflows/runs?workflowRunIds=", nil)
		e.restFails(http.StatusNotFound, http.MethodGet, "/v2/nothing/here", nil)
		e.restFails(http.StatusNotFound, http.MethodPut, "/v2/notify/"+ev, nil)
		// Waiters on an event id of exactly 256 bytes is fine.
		e.restOK(http.MethodGet, "/v2/waiters/"+strings.Repeat("e", 256), nil, nil)
		// Nothing was notified or stored by the refused calls.
		assert.Empty(t, e.waiters(ev))

		// Counted with GraphQL's errors and operations, by code.
		after := e.scrape(nil)
		const errs = "rendezvous_graphql_errors_total"
		for code, n := range map[string]float64{"PAYLOAD_TOO_LARGE": 2, "BAD_USER_INPUT": 8, "NOT_FOUND": 2} {
			assert.Equal(t, n, after.value(errs, "code", code)-before.value(errs, "code", code), code)
		}
		const ops = "rendezvous_graphql_operation_duration_seconds"
		assert.Equal(t, 2.0, after.value(ops, "type", "query")-before.value(ops, "type", "query"), "the waiters GET, and GraphQL's waiters query")
		assert.Zero(t, after.value(ops, "type", "mutation")-before.value(ops, "type", "mutation"), "refused calls are errors, not operations")
	})
}

// TestUpstashAuth: the same tokens as GraphQL (Authorization: Bearer), run
// tokens refused, the same rate limit bucket, and request ids.
func TestUpstashAuth(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := secEnv(t, db, func(c *service.Config) { c.HTTP.ServerRateLimit, c.HTTP.ServerRateBurst = 0.001, 3 })
		ev := uid("auth")
		path := notifyPath("", ev)
		for _, tok := range []string{"", "wrong-token", secToken + "x"} {
			r := e.rest(http.MethodPost, path, tok, []byte(`1`))
			require.Equal(t, http.StatusUnauthorized, r.Status, "token %q: %s", tok, r.Body)
			r.errorMessage(t)
			assert.Equal(t, `Bearer realm="rendezvous"`, r.Header.Get("WWW-Authenticate"))
		}
		run := e.aTrigger(uid("run"))
		for _, p := range []string{path, "/v2/waiters/" + ev, "/v2/workflows/events?groupBy=workflowRunId"} {
			method := http.MethodGet
			if strings.HasPrefix(p, "/v2/notify") {
				method = http.MethodPost
			}
			r := e.rest(method, p, run.Token, []byte(``))
			require.Equal(t, http.StatusForbidden, r.Status, "%s: %s", p, r.Body)
			r.errorMessage(t)
		}
		r := e.rest(http.MethodDelete, "/v2/workflows/runs/"+run.ID, run.Token, nil)
		require.Equal(t, http.StatusForbidden, r.Status, "a run token may not cancel even its own run: %s", r.Body)
		assert.Equal(t, "RUN_STARTED", e.aRun(run.ID).State)

		// Reads cost nothing; a mutation takes from the token's bucket, the
		// one its GraphQL mutations use (burst 3).
		r = e.rest(http.MethodGet, "/v2/waiters/"+ev, secToken, nil)
		require.Equal(t, http.StatusOK, r.Status, "%s", r.Body)
		assert.NotEmpty(t, r.Header.Get("X-Request-Id"))
		for i := range 2 {
			r = e.rest(http.MethodPost, path, secToken, []byte(`1`))
			require.Equal(t, http.StatusOK, r.Status, "notify %d: %s", i, r.Body)
		}
		e.postOK(secToken, notifyMutation, map[string]any{"ev": ev}, nil)
		r = e.rest(http.MethodPost, path, secToken, []byte(`1`))
		require.Equal(t, http.StatusTooManyRequests, r.Status, "%s", r.Body)
		r.errorMessage(t)
		assert.NotEmpty(t, r.Header.Get("Retry-After"))
		assert.Equal(t, "0", r.Header.Get("Burst-RateLimit-Remaining"))
		secRefused(t, e.post(secToken, notifyMutation, map[string]any{"ev": ev}), http.StatusTooManyRequests, "RATE_LIMITED", "GraphQL after REST used the bucket")
		// Another token has its own bucket; several run ids cost one each.
		q := url.Values{"workflowRunIds": {uid("a"), uid("b"), uid("c"), uid("d")}}
		r = e.rest(http.MethodDelete, "/v2/workflows/runs?"+q.Encode(), secOtherToken, nil)
		require.Equal(t, http.StatusTooManyRequests, r.Status, "4 cancels with a burst of 3: %s", r.Body)
		q = url.Values{"workflowRunIds": {uid("a"), uid("b")}}
		r = e.rest(http.MethodDelete, "/v2/workflows/runs?"+q.Encode(), secOtherToken, nil)
		require.Equal(t, http.StatusOK, r.Status, "%s", r.Body)
	})
}

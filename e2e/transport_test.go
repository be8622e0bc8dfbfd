package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
)

// tpSSEFrame is one server-sent event.
type tpSSEFrame struct {
	Event string
	Data  string
}

// tpSSEFrames runs a subscription over SSE and returns every frame up to and
// including "complete", or what it had when the stream ended otherwise.
func tpSSEFrames(ctx context.Context, endpoint, query string, vars map[string]any) ([]tpSSEFrame, error) {
	body, _ := json.Marshal(map[string]any{"query": query, "variables": vars})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var frames []tpSSEFrame
	var cur tpSSEFrame
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if cur.Event != "" || cur.Data != "" {
				frames = append(frames, cur)
				if cur.Event == "complete" {
					return frames, nil
				}
			}
			cur = tpSSEFrame{}
		case strings.HasPrefix(line, "event:"):
			cur.Event = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
		case strings.HasPrefix(line, "data:"):
			cur.Data += strings.TrimSpace(strings.TrimPrefix(line, "data:"))
		}
	}
	if cur.Event != "" || cur.Data != "" {
		frames = append(frames, cur)
	}
	return frames, sc.Err()
}

type tpSSEOut struct {
	resps []*gqlclient.Response
	err   error
}

// tpSSE runs gqlclient.SSE in the background; the channel gets its outcome.
func tpSSE(t *testing.T, endpoint string, vars map[string]any) <-chan tpSSEOut {
	t.Helper()
	ch := make(chan tpSSEOut, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	go func() {
		defer cancel()
		r, err := gqlclient.SSE(ctx, endpoint, waitSubscription, vars)
		ch <- tpSSEOut{r, err}
	}()
	return ch
}

func tpAwaitSSE(t *testing.T, ch <-chan tpSSEOut) tpSSEOut {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(20 * time.Second):
		t.Fatal("SSE subscription did not end within 20s")
	}
	return tpSSEOut{}
}

// POST queries and mutations; GET queries; GET refuses mutations.
func TestTransportPostGet(t *testing.T) {
	e := newEnv(t, testdb.SQLite(t))
	id := uid("tp")
	var trig struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
			Created       bool   `json:"created"`
		} `json:"trigger"`
	}
	e.ok(triggerMutation, map[string]any{"id": id, "label": "post"}, &trig)
	require.True(t, trig.Trigger.Created)
	run := trig.Trigger.WorkflowRunID
	require.Equal(t, "RUN_STARTED", e.run(run).State)

	// GET query, with variables.
	q := `query($id: ID!) { workflowRun(workflowRunId: $id) { workflowRunId state label } }`
	r, err := gqlclient.Get(ctxT(t), e.endpoint, q, map[string]any{"id": run})
	require.NoError(t, err)
	require.Empty(t, r.Errors)
	require.Equal(t, http.StatusOK, r.HTTPStatus)
	var got struct {
		WorkflowRun *runView `json:"workflowRun"`
	}
	require.NoError(t, r.Decode(&got))
	require.NotNil(t, got.WorkflowRun)
	require.Equal(t, run, got.WorkflowRun.WorkflowRunID)
	require.Equal(t, "post", *got.WorkflowRun.Label)

	// GET query without variables.
	r, err = gqlclient.Get(ctxT(t), e.endpoint, `{ waiters(eventId: "nobody") { id } }`, nil)
	require.NoError(t, err)
	require.Empty(t, r.Errors)
	require.JSONEq(t, `{"waiters":[]}`, string(r.Data))

	// A mutation over GET is refused and creates nothing.
	other := uid("tp-get")
	r, err = gqlclient.Get(ctxT(t), e.endpoint, triggerMutation, map[string]any{"id": other})
	require.NoError(t, err)
	require.NotEmpty(t, r.Errors, "a mutation over GET must fail; data %s", r.Data)
	// Every error carries extensions.code (DESIGN.md, Errors); checked
	// without stopping the test so the rest still runs.
	assert.NotEmpty(t, r.FirstCode(), "the error of a mutation over GET carries a code: %+v", r.Errors)
	require.GreaterOrEqual(t, r.HTTPStatus, 400)
	require.Nil(t, e.run("wfr_"+other), "nothing created")
	ev := uid("tp-get-ev")
	r, err = gqlclient.Get(ctxT(t), e.endpoint, notifyMutation, map[string]any{"ev": ev, "run": run})
	require.NoError(t, err)
	require.NotEmpty(t, r.Errors)
	require.Empty(t, e.run(run).LookbackEvents, "nothing stored")
}

// waitForEvent over each transport receives the notification and completes.
func TestTransportSubscriptions(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		for _, proto := range []string{gqlclient.TransportWS, gqlclient.LegacyWS} {
			ev := uid("tp-" + proto)
			c := e.dial(proto)
			s := e.subscribe(c, ev, waitOpts{})
			e.awaitWaiting(ev, 1)
			n := e.notify(ev, map[string]any{"via": proto}, "")
			require.Len(t, n.NotifyResponse, 1)
			r := mustResult(t, s) // one payload, then complete
			require.JSONEq(t, `{"via":"`+proto+`"}`, string(r.EventData), proto)
			require.Equal(t, n.NotifyResponse[0].MessageID, *r.MessageID)
			require.Equal(t, ev, r.EventID)
			require.False(t, r.Timeout)
			require.Empty(t, e.waiters(ev))
		}

		// SSE through gqlclient.SSE.
		ev := uid("tp-sse")
		ch := tpSSE(t, e.endpoint, waitVars(ev, waitOpts{}))
		e.awaitWaiting(ev, 1)
		n := e.notify(ev, "sse", "")
		require.Len(t, n.NotifyResponse, 1)
		o := tpAwaitSSE(t, ch)
		require.NoError(t, o.err)
		require.Len(t, o.resps, 1)
		require.Empty(t, o.resps[0].Errors)
		var d struct {
			WaitForEvent waitResult `json:"waitForEvent"`
		}
		require.NoError(t, o.resps[0].Decode(&d))
		require.Equal(t, `"sse"`, string(d.WaitForEvent.EventData))
		require.Equal(t, n.NotifyResponse[0].MessageID, *d.WaitForEvent.MessageID)

		// SSE frames: exactly one "next" with the result, then "complete".
		ev2 := uid("tp-sse2")
		run := e.trigger()
		framesC := make(chan []tpSSEFrame, 1)
		errC := make(chan error, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		go func() {
			f, err := tpSSEFrames(ctx, e.endpoint, waitSubscription, waitVars(ev2, waitOpts{run: run, step: "sse-step"}))
			framesC <- f
			errC <- err
		}()
		e.awaitWaiting(ev2, 1)
		e.notify(ev2, []any{1, "two"}, run)
		var frames []tpSSEFrame
		select {
		case frames = <-framesC:
		case <-time.After(20 * time.Second):
			t.Fatal("SSE stream did not end")
		}
		require.NoError(t, <-errC)
		require.Len(t, frames, 2, "frames: %+v", frames)
		require.Equal(t, "next", frames[0].Event)
		var resp gqlclient.Response
		require.NoError(t, json.Unmarshal([]byte(frames[0].Data), &resp))
		require.Empty(t, resp.Errors)
		require.NoError(t, resp.Decode(&d))
		require.JSONEq(t, `[1,"two"]`, string(d.WaitForEvent.EventData))
		require.Equal(t, "sse-step", *d.WaitForEvent.StepName)
		require.Equal(t, "complete", frames[1].Event)
	})
}

// Playground at /, /healthz and /readyz.
func TestTransportPlaygroundHealth(t *testing.T) {
	e := newEnv(t, testdb.SQLite(t))
	resp, body := httpGet(t, e.srv.URL+"/")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.True(t, strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html"), "content type %q", resp.Header.Get("Content-Type"))
	require.Contains(t, strings.ToLower(body), "<html")
	require.Contains(t, body, "/query", "the playground points at the endpoint")

	resp, body = httpGet(t, e.srv.URL+"/healthz")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)

	resp, body = httpGet(t, e.srv.URL+"/readyz")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)

	// An unknown path is a 404, not the playground.
	resp, _ = httpGet(t, e.srv.URL+"/no-such-page")
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
}

// /readyz on MySQL too: the database is up.
func TestTransportReadyzDialects(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		resp, body := httpGet(t, e.srv.URL+"/readyz")
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
		resp, body = httpGet(t, e.srv.URL+"/healthz")
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
	})
}

// A subscription whose run is canceled gets RUN_NOT_ACTIVE on every transport.
func TestTransportCanceledRunNotActive(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run := e.trigger()
		ev := uid("tp-cancel")
		ws := e.subscribe(e.dial(gqlclient.TransportWS), ev, waitOpts{run: run})
		legacy := e.subscribe(e.dial(gqlclient.LegacyWS), ev, waitOpts{run: run, step: "legacy-step"})
		sse := tpSSE(t, e.endpoint, waitVars(ev, waitOpts{run: run}))
		e.awaitWaiting(ev, 3)

		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": run}, nil)

		for name, s := range map[string]*gqlclient.Sub{"graphql-transport-ws": ws, "graphql-ws": legacy} {
			o := result(t, s, 15*time.Second)
			require.Nil(t, o.Result, "%s: no result", name)
			require.Equal(t, "RUN_NOT_ACTIVE", o.code(), "%s: errors %+v", name, o.Errors)
		}
		o := tpAwaitSSE(t, sse)
		require.NoError(t, o.err)
		require.NotEmpty(t, o.resps, "SSE got nothing")
		var codes []string
		for _, r := range o.resps {
			for _, er := range r.Errors {
				codes = append(codes, er.Code())
			}
		}
		require.Equal(t, []string{"RUN_NOT_ACTIVE"}, codes, "SSE responses")
		require.Empty(t, e.waiters(ev))

		// A new wait on the canceled run, on each transport: RUN_NOT_ACTIVE.
		for _, proto := range []string{gqlclient.TransportWS, gqlclient.LegacyWS} {
			o := result(t, e.subscribe(e.dial(proto), ev, waitOpts{run: run}), 15*time.Second)
			require.Equal(t, "RUN_NOT_ACTIVE", o.code(), "%s: errors %+v", proto, o.Errors)
		}
		resps, err := gqlclient.SSE(ctxT(t), e.endpoint, waitSubscription, waitVars(ev, waitOpts{run: run}))
		require.NoError(t, err)
		require.NotEmpty(t, resps)
		require.Equal(t, "RUN_NOT_ACTIVE", resps[0].FirstCode(), "SSE: %+v", resps[0].Errors)
	})
}

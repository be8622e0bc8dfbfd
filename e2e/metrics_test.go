package e2e

// Operating the service (issue #6): /metrics after a known sequence of
// operations, the gauges going up and back down, /metrics behind a token or
// on an address of its own, request ids in logs and errors (and never a
// payload or a token in the log), and the stats query.

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// metricsInterval: the backlog gauges are sampled this often in these tests.
const metricsInterval = 50 * time.Millisecond

func withFastGauges(c *service.Config) { c.Engine.GaugeInterval = metricsInterval }

// scrape is one read of /metrics, parsed.
type scrape map[string]*dto.MetricFamily

// scrapeURL reads a /metrics endpoint with the headers; it must answer 200.
func scrapeURL(t *testing.T, url string, hdr http.Header) scrape {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), http.MethodGet, url, nil)
	require.NoError(t, err)
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return scrape(fams)
}

func (e *env) scrape(hdr http.Header) scrape {
	e.t.Helper()
	return scrapeURL(e.t, e.srv.URL+"/metrics", hdr)
}

// value is a series' value: a counter's or gauge's value, a histogram's
// sample count. labels are name, value pairs the series must carry; with
// none, the values of every series of the family are added up.
func (s scrape) value(name string, labels ...string) float64 {
	fam := s[name]
	if fam == nil {
		return 0
	}
	total := 0.0
next:
	for _, m := range fam.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			total += m.GetCounter().GetValue()
		case m.Gauge != nil:
			total += m.GetGauge().GetValue()
		case m.Histogram != nil:
			total += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return total
}

// awaitMetric waits until the metric (summed over its series with the labels) is want.
func (e *env) awaitMetric(want float64, name string, labels ...string) {
	e.t.Helper()
	var got float64
	eventually(e.t, 10*time.Second, func() bool {
		got = e.scrape(nil).value(name, labels...)
		return got == want
	}, "%s%v: want %v", name, labels, want)
}

// Every counter moves by exactly what the operations did; the gauges go up
// while subscribers wait and back down when they are gone.
func TestMetricsCountWhatHappened(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db, withFastGauges)
		before := e.scrape(nil)

		runA, runB := e.trigger(), e.trigger()
		e.ok(triggerMutation, map[string]any{"id": runA}, nil) // exists: created false

		// Gauges up: an ephemeral waiter, a durable one, an SSE stream.
		conn := e.dial(gqlclient.TransportWS)
		evBroadcast, evA, evSSE := uid("m-bc"), uid("m-a"), uid("m-sse")
		s1 := e.subscribe(conn, evBroadcast, waitOpts{})
		s2 := e.subscribe(conn, evA, waitOpts{run: runA, step: "await"})
		sse := secSSEAsync(t, e.endpoint, nil, waitSubscription, waitVars(evSSE, waitOpts{}), 20*time.Second)
		e.awaitWaiting(evBroadcast, 1)
		e.awaitWaiting(evA, 1)
		e.awaitWaiting(evSSE, 1)
		e.awaitMetric(3, "rendezvous_live_subscriptions")
		e.awaitMetric(1, "rendezvous_open_connections", "transport", "websocket")
		e.awaitMetric(1, "rendezvous_open_connections", "transport", "sse")
		e.awaitMetric(3, "rendezvous_waiters_waiting")

		require.Len(t, e.notify(evBroadcast, map[string]any{"n": 1}, "").NotifyResponse, 1)
		require.Len(t, e.notify(evSSE, map[string]any{"n": 2}, "").NotifyResponse, 1)
		require.Len(t, e.notify(evA, map[string]any{"n": 3}, runA).NotifyResponse, 1)
		require.False(t, mustResult(t, s1).Timeout)
		require.False(t, mustResult(t, s2).Timeout)
		so := awaitSSE(t, sse, 20*time.Second)
		require.NoError(t, so.err)
		require.Len(t, so.resps, 1)
		require.Empty(t, so.resps[0].Errors)
		e.awaitMetric(0, "rendezvous_live_subscriptions")
		e.awaitMetric(0, "rendezvous_open_connections", "transport", "sse")
		e.awaitMetric(0, "rendezvous_waiters_waiting")

		// A broadcast nobody hears; a lookback stored, then consumed.
		require.Empty(t, e.notify(uid("m-nobody"), 1, "").NotifyResponse)
		evL := uid("m-lb")
		require.NotNil(t, e.notify(evL, "early", runA).Lookback)
		e.awaitMetric(1, "rendezvous_lookback_events_pending")
		require.JSONEq(t, `"early"`, string(mustResult(t, e.subscribe(conn, evL, waitOpts{run: runA})).EventData))
		e.awaitMetric(0, "rendezvous_lookback_events_pending")

		// A notify step, then its repeat.
		stepVars := map[string]any{"ev": uid("m-step"), "data": 1, "step": map[string]any{"workflowRunId": runA, "stepName": "tell"}}
		var first, again struct {
			Notify notifyView `json:"notify"`
		}
		e.ok(notifyMutation, stepVars, &first)
		e.ok(notifyMutation, stepVars, &again)
		require.False(t, first.Notify.Deduplicated)
		require.True(t, again.Notify.Deduplicated)

		// A timeout.
		require.True(t, mustResult(t, e.subscribe(conn, uid("m-to"), waitOpts{timeout: "1s"})).Timeout)

		// A cancel: a lookback dropped, a waiter canceled, its subscriber told.
		require.NotNil(t, e.notify(uid("m-drop"), 1, runB).Lookback)
		evB := uid("m-b")
		s5 := e.subscribe(conn, evB, waitOpts{run: runB})
		e.awaitWaiting(evB, 1)
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": runB}, nil)
		require.Equal(t, "RUN_NOT_ACTIVE", result(t, s5, 15*time.Second).code())

		// Bad input.
		e.fails("BAD_USER_INPUT", notifyMutation, map[string]any{"ev": "", "data": 1})

		require.NoError(t, conn.Close())
		e.awaitMetric(0, "rendezvous_open_connections", "transport", "websocket")
		e.awaitMetric(0, "rendezvous_live_subscriptions")
		e.awaitMetric(0, "rendezvous_waiters_waiting") // sampled: it follows within metricsInterval

		after := e.scrape(nil)
		delta := func(name string, labels ...string) float64 {
			return after.value(name, labels...) - before.value(name, labels...)
		}
		for _, c := range []struct {
			want   float64
			name   string
			labels []string
		}{
			{2, "rendezvous_triggers_total", []string{"created", "true"}},
			{1, "rendezvous_triggers_total", []string{"created", "false"}},

			{2, "rendezvous_notifies_total", []string{"kind", "broadcast", "result", "resolved"}},
			{1, "rendezvous_notifies_total", []string{"kind", "broadcast", "result", "none"}},
			{1, "rendezvous_notifies_total", []string{"kind", "broadcast", "result", "error"}},
			{1, "rendezvous_notifies_total", []string{"kind", "targeted", "result", "resolved"}},
			{2, "rendezvous_notifies_total", []string{"kind", "targeted", "result", "lookback"}},
			{1, "rendezvous_notifies_total", []string{"kind", "step", "result", "none"}},
			{1, "rendezvous_notifies_total", []string{"kind", "step", "result", "deduplicated"}},
			{9, "rendezvous_notifies_total", nil},
			{4, "rendezvous_notify_duration_seconds", []string{"kind", "broadcast"}},
			{3, "rendezvous_notify_duration_seconds", []string{"kind", "targeted"}},
			{2, "rendezvous_notify_duration_seconds", []string{"kind", "step"}},

			// s1, the SSE waiter, s2, and the one born from the lookback.
			{4, "rendezvous_waiters_ended_total", []string{"outcome", "notified"}},
			{1, "rendezvous_waiters_ended_total", []string{"outcome", "timed_out"}},
			{1, "rendezvous_waiters_ended_total", []string{"outcome", "canceled"}},
			{0, "rendezvous_waiters_ended_total", []string{"outcome", "removed"}},

			{2, "rendezvous_lookback_events_total", []string{"event", "stored"}},
			{1, "rendezvous_lookback_events_total", []string{"event", "consumed"}},
			{1, "rendezvous_lookback_events_total", []string{"event", "dropped"}},
			{0, "rendezvous_lookback_events_total", []string{"event", "expired"}},

			{1, "rendezvous_graphql_errors_total", []string{"code", "BAD_USER_INPUT"}},
			{1, "rendezvous_graphql_errors_total", []string{"code", "RUN_NOT_ACTIVE"}},
			{2, "rendezvous_graphql_errors_total", nil},

			// Every subscription's result (or error) handed over: s1, SSE,
			// s2, the lookback, the timeout, the cancel.
			{6, "rendezvous_delivery_duration_seconds", nil},
			// 3 triggers, 9 notifies, 1 cancel.
			{13, "rendezvous_graphql_operation_duration_seconds", []string{"type", "mutation"}},
			{6, "rendezvous_graphql_operation_duration_seconds", []string{"type", "subscription"}},
		} {
			assert.Equal(t, c.want, delta(c.name, c.labels...), "%s%v", c.name, c.labels)
		}
		assert.Positive(t, delta("rendezvous_graphql_operation_duration_seconds", "type", "query"), "awaitWaiting's queries")
		for _, g := range []string{"rendezvous_live_subscriptions", "rendezvous_open_connections", "rendezvous_waiters_waiting", "rendezvous_lookback_events_pending"} {
			assert.Zero(t, after.value(g), g)
		}

		// The runtime and process collectors are there; no series carries an id.
		require.NotNil(t, after["go_goroutines"])
		require.NotNil(t, after["process_cpu_seconds_total"])
		for name, fam := range after {
			for _, m := range fam.GetMetric() {
				for _, lp := range m.GetLabel() {
					assert.NotRegexp(t, `^(wfr|wtr|lbe|msg|m)[_-]`, lp.GetValue(), "%s{%s}: a label holds an id", name, lp.GetName())
				}
			}
		}
	})
}

// The ends that happen without a client: a waiter removed when its
// subscriber leaves, a lookback event expiring unconsumed.
func TestMetricsRemovedAndExpired(t *testing.T) {
	e := newEnv(t, testdb.SQLite(t), withFastGauges)
	conn := e.dial(gqlclient.TransportWS)
	ev := uid("rm")
	s := e.subscribe(conn, ev, waitOpts{})
	e.awaitWaiting(ev, 1)
	require.NoError(t, s.Stop(ctxT(t)))
	e.awaitMetric(1, "rendezvous_waiters_ended_total", "outcome", "removed")
	e.awaitMetric(0, "rendezvous_live_subscriptions")

	run := e.trigger()
	require.NotNil(t, e.notify(uid("exp"), 1, run).Lookback)
	e.awaitMetric(1, "rendezvous_lookback_events_pending")
	e.clock.Advance(8 * 24 * time.Hour) // past the retention: the sweeper purges it
	e.awaitMetric(1, "rendezvous_lookback_events_total", "event", "expired")
	e.awaitMetric(0, "rendezvous_lookback_events_pending")
	after := e.scrape(nil)
	require.Equal(t, 1.0, after.value("rendezvous_lookback_events_total", "event", "stored"))
	require.Zero(t, after.value("rendezvous_lookback_events_total", "event", "consumed"))
	require.Zero(t, after.value("rendezvous_waiters_ended_total", "outcome", "notified"))
}

// /metrics on the main port needs a server token when tokens are
// configured (a run token is not enough), unless turned off.
func TestMetricsNeedAServerToken(t *testing.T) {
	db := testdb.SQLite(t)
	e := secEnv(t, db)
	resp, body := httpGet(t, e.srv.URL+"/metrics")
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode, body)
	require.NotContains(t, body, "rendezvous_")

	run := e.aTrigger(uid("met"))
	r := secHTTP(t, http.MethodGet, e.srv.URL+"/metrics", secHeader("Authorization", "Bearer "+run.Token), nil)
	require.Equal(t, http.StatusForbidden, r.Status, r.Body)
	require.Equal(t, "FORBIDDEN", r.code())
	r = secHTTP(t, http.MethodGet, e.srv.URL+"/metrics", secHeader("Authorization", "Bearer wrong-token-0123456789"), nil)
	require.Equal(t, http.StatusUnauthorized, r.Status, r.Body)

	s := e.scrape(secHeader("Authorization", "Bearer "+secToken))
	require.Equal(t, 1.0, s.value("rendezvous_triggers_total", "created", "true"))
	// The refusals above were counted, under a bounded code.
	require.Equal(t, 2.0, s.value("rendezvous_graphql_errors_total", "code", "UNAUTHENTICATED"))
	require.Equal(t, 1.0, s.value("rendezvous_graphql_errors_total", "code", "FORBIDDEN"))

	off := false
	open := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.MetricsTokenRequired = &off })
	require.NotNil(t, open.scrape(nil)["rendezvous_triggers_total"])

	// Required without any server token: refused at start.
	on := true
	_, err := service.New(t.Context(), service.Config{DatabaseURL: testdb.SQLite(t), MetricsTokenRequired: &on, Logger: slog.New(slog.DiscardHandler)})
	require.ErrorContains(t, err, "RENDEZVOUS_METRICS_TOKEN_REQUIRED")
}

// With RENDEZVOUS_METRICS_ADDR, /metrics is served there (open by default:
// a private port) and not on the API's port.
func TestMetricsOnTheirOwnAddress(t *testing.T) {
	for _, tc := range []struct {
		name    string
		require *bool
	}{{"open", nil}, {"token", func() *bool { b := true; return &b }()}} {
		t.Run(tc.name, func(t *testing.T) {
			logs := &syncBuffer{}
			cfg := service.Config{
				DatabaseURL:          testdb.SQLite(t),
				MetricsAddr:          "127.0.0.1:0",
				MetricsTokenRequired: tc.require,
				Logger:               slog.New(slog.NewTextHandler(logs, nil)),
			}
			secTokens(&cfg)
			svc, err := service.New(t.Context(), cfg)
			require.NoError(t, err)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan error, 1)
			go func() { served <- svc.Serve(ctx, ln) }()
			defer func() {
				cancel()
				require.NoError(t, <-served)
			}()
			eventually(t, 10*time.Second, func() bool { return svc.MetricsAddr() != "" }, "the metrics listener opens")

			metricsURL := "http://" + svc.MetricsAddr() + "/metrics"
			var hdr http.Header
			if tc.require != nil {
				resp, body := httpGet(t, metricsURL)
				require.Equal(t, http.StatusUnauthorized, resp.StatusCode, body)
				hdr = secHeader("Authorization", "Bearer "+secToken)
			}
			s := scrapeURL(t, metricsURL, hdr)
			require.NotNil(t, s["rendezvous_notifies_total"])
			require.NotNil(t, s["go_goroutines"])

			api := "http://" + ln.Addr().String()
			resp, body := httpGet(t, api+"/metrics")
			require.Equal(t, http.StatusNotFound, resp.StatusCode, "not on the API's port: %s", body)
			resp, _ = httpGet(t, api+"/healthz")
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.Contains(t, logs.String(), "metrics listening")
		})
	}
}

// Every error carries the request id; every log line of the request (and of
// a subscription) carries it too; no log line holds event data, a body or a
// token.
func TestLogsCarryRequestIDsNeverPayloads(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := secEnv(t, db)
		secretData := "payload-" + uid("do-not-log")
		secretBody := "body-" + uid("do-not-log")
		reqID := "req-" + uid("log")

		post := func(id, query string, vars map[string]any) secResp {
			h := secJSONHeader(secToken)
			h.Set("X-Request-Id", id)
			return secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(secBody(t, query, vars)))
		}
		r := post(reqID+"-trigger", triggerMutation, map[string]any{"id": uid("log"), "body": map[string]any{"secret": secretBody}})
		require.Empty(t, r.R.Errors, r.Body)
		var trig struct {
			Trigger struct {
				WorkflowRunID string `json:"workflowRunId"`
			} `json:"trigger"`
		}
		require.NoError(t, r.R.Decode(&trig))
		run := trig.Trigger.WorkflowRunID

		// A subscription over SSE with its own request id, resolved by a
		// notify with another.
		ev := uid("log-ev")
		sseHdr := secHeader("Authorization", "Bearer "+secToken, "X-Request-Id", reqID+"-sse")
		sse := secSSEAsync(t, e.endpoint, sseHdr, waitSubscription, waitVars(ev, waitOpts{run: run}), 20*time.Second)
		e.awaitWaitingAs(secAdminToken, ev, 1)
		r = post(reqID, notifyMutation, map[string]any{"ev": ev, "run": run, "data": map[string]any{"secret": secretData}})
		require.Empty(t, r.R.Errors, r.Body)
		require.Equal(t, reqID, r.Header.Get("X-Request-Id"))
		so := awaitSSE(t, sse, 20*time.Second)
		require.NoError(t, so.err)
		require.Len(t, so.resps, 1)
		require.Contains(t, string(so.resps[0].Data), secretData, "the subscriber got the data")

		// Every error carries the request id, not only internal ones.
		r = post(reqID+"-bad", notifyMutation, map[string]any{"ev": "", "data": 1})
		require.Equal(t, "BAD_USER_INPUT", r.code())
		require.Equal(t, reqID+"-bad", r.R.Errors[0].Extensions["requestId"])
		r = post(reqID+"-gone", `mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": uid("nope")})
		require.Equal(t, "NOT_FOUND", r.code())
		require.Equal(t, reqID+"-gone", r.R.Errors[0].Extensions["requestId"])
		r = post(reqID+"-parse", `{ nope`, nil)
		require.Equal(t, "GRAPHQL_PARSE_FAILED", r.code())
		require.Equal(t, reqID+"-parse", r.R.Errors[0].Extensions["requestId"])
		h := secJSONHeader("")
		h.Set("X-Request-Id", reqID+"-anon")
		r = secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(secBody(t, `{ __typename }`, nil)))
		require.Equal(t, "UNAUTHENTICATED", r.code())
		require.Equal(t, reqID+"-anon", r.R.Errors[0].Extensions["requestId"])
		admin := e.aDial(gqlclient.TransportWS)
		o := result(t, e.subscribe(admin, uid("log-ended"), waitOpts{run: uid("no-such-run")}), 10*time.Second)
		require.Equal(t, "NOT_FOUND", o.code())
		require.NotEmpty(t, o.Errors[0].Extensions["requestId"], "a websocket error carries the upgrade request's id")

		logs := e.logs.String()
		linesOf := func(id string) []string {
			var out []string
			for _, l := range strings.Split(logs, "\n") {
				if strings.Contains(l, "request_id="+id+" ") || strings.HasSuffix(l, "request_id="+id) {
					out = append(out, l)
				}
			}
			return out
		}
		mutations := func(id string) []string {
			var out []string
			for _, l := range linesOf(id) {
				if strings.Contains(l, "msg=mutation ") {
					out = append(out, l)
				}
			}
			return out
		}
		mutation := mutations(reqID)
		require.Len(t, mutation, 1, "one line for the notify: %s", logs)
		require.Regexp(t, `msg=mutation fields=notify outcome=ok duration_ms=[0-9.]+`, mutation[0])
		require.Len(t, mutations(reqID+"-trigger"), 1)
		require.Regexp(t, `outcome=BAD_USER_INPUT`, strings.Join(linesOf(reqID+"-bad"), "\n"))
		require.Regexp(t, `outcome=NOT_FOUND`, strings.Join(linesOf(reqID+"-gone"), "\n"))
		sub := strings.Join(linesOf(reqID+"-sse"), "\n")
		require.Regexp(t, `msg="subscription started" event_id=`+regexp.QuoteMeta(ev)+` waiter=wtr_\d+`, sub)
		require.Regexp(t, `msg="subscription ended" waiter=wtr_\d+ reason=notified duration_ms=`, sub)

		for _, secret := range []string{secretData, secretBody, secToken, secOtherToken, secAdminToken, secSecret, "rt1."} {
			require.NotContains(t, logs, secret, "the log holds a payload, a body or a token")
		}
	})
}

// awaitWaitingAs is awaitWaiting on a server that wants a token.
func (e *env) awaitWaitingAs(token, eventID string, n int) {
	e.t.Helper()
	eventually(e.t, 10*time.Second, func() bool {
		var out struct {
			Waiters []waiterView `json:"waiters"`
		}
		e.postOK(token, waitersQuery, map[string]any{"ev": eventID}, &out)
		return len(out.Waiters) == n
	}, "want %d waiters on %s", n, eventID)
}

// Subscription end reasons in the log: timeout, canceled, client_gone, error.
func TestLogsSubscriptionEndReasons(t *testing.T) {
	e := newEnv(t, testdb.SQLite(t))
	conn := e.dial(gqlclient.TransportWS)
	require.True(t, mustResult(t, e.subscribe(conn, uid("r-to"), waitOpts{timeout: "1s"})).Timeout)

	run := e.trigger()
	evC := uid("r-cancel")
	sc := e.subscribe(conn, evC, waitOpts{run: run})
	e.awaitWaiting(evC, 1)
	e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": run}, nil)
	require.Equal(t, "RUN_NOT_ACTIVE", result(t, sc, 10*time.Second).code())

	evG := uid("r-gone")
	sg := e.subscribe(conn, evG, waitOpts{})
	e.awaitWaiting(evG, 1)
	require.NoError(t, sg.Stop(ctxT(t)))
	e.awaitWaiting(evG, 0)

	require.Equal(t, "RUN_NOT_ACTIVE", result(t, e.subscribe(conn, uid("r-err"), waitOpts{run: run}), 10*time.Second).code())

	eventually(t, 10*time.Second, func() bool {
		logs := e.logs.String()
		for _, want := range []string{"reason=timeout", "reason=canceled code=RUN_NOT_ACTIVE", "reason=client_gone", "reason=error code=RUN_NOT_ACTIVE"} {
			if !strings.Contains(logs, want) {
				return false
			}
		}
		return true
	}, "every end reason is logged:\n%s", e.logs.String())
}

// The stats query counts runs and waiters by state, the pending lookback
// events and the nearest deadline; a run token may not read it.
func TestStatsQuery(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		const statsQuery = `{ stats {
		  runs { started success failed canceled }
		  waiters { waiting notified timedOut canceled }
		  pendingLookbackEvents oldestWaitingDeadline
		} }`
		type stats struct {
			Runs struct {
				Started, Success, Failed, Canceled int
			}
			Waiters struct {
				Waiting, Notified, TimedOut, Canceled int
			}
			PendingLookbackEvents int
			OldestWaitingDeadline *string
		}
		read := func() stats {
			var out struct {
				Stats stats `json:"stats"`
			}
			e.ok(statsQuery, nil, &out)
			return out.Stats
		}
		require.Equal(t, stats{}, read(), "an empty database")

		started, done, failed, canceled := e.trigger(), e.trigger(), e.trigger(), e.trigger()
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS) { state } }`, map[string]any{"id": done}, nil)
		e.ok(`mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_FAILED) { state } }`, map[string]any{"id": failed}, nil)

		conn := e.dial(gqlclient.TransportWS)
		// Waiting: a durable step with a deadline in an hour, and one in two.
		evW := uid("st-wait")
		e.subscribe(conn, evW, waitOpts{run: started, step: "later", timeout: "2h"})
		e.subscribe(conn, evW, waitOpts{run: started, step: "sooner", timeout: "1h"})
		ws := e.awaitWaiting(evW, 2)
		// Notified, timed out, and canceled with its run.
		evN := uid("st-n")
		sn := e.subscribe(conn, evN, waitOpts{})
		e.awaitWaiting(evN, 1)
		e.notify(evN, 1, "")
		mustResult(t, sn)
		require.True(t, mustResult(t, e.subscribe(conn, uid("st-to"), waitOpts{run: started, step: "brief", timeout: "1s"})).Timeout)
		evC := uid("st-c")
		sc := e.subscribe(conn, evC, waitOpts{run: canceled, step: "never"})
		e.awaitWaiting(evC, 1)
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": canceled}, nil)
		require.Equal(t, "RUN_NOT_ACTIVE", result(t, sc, 10*time.Second).code())
		// Pending lookback events: two stored, one consumed.
		evL := uid("st-lb")
		e.notify(evL, 1, started)
		e.notify(evL, 2, started)
		mustResult(t, e.subscribe(conn, evL, waitOpts{run: started}))

		got := read()
		require.Equal(t, 1, got.Runs.Started)
		require.Equal(t, 1, got.Runs.Success)
		require.Equal(t, 1, got.Runs.Failed)
		require.Equal(t, 1, got.Runs.Canceled)
		require.Equal(t, 2, got.Waiters.Waiting)
		require.Equal(t, 2, got.Waiters.Notified, "the broadcast's and the lookback's")
		require.Equal(t, 1, got.Waiters.TimedOut)
		require.Equal(t, 1, got.Waiters.Canceled)
		require.Equal(t, 1, got.PendingLookbackEvents)
		require.NotNil(t, got.OldestWaitingDeadline)
		sooner := ws[1].Deadline
		if ws[0].Deadline < sooner {
			sooner = ws[0].Deadline
		}
		require.Equal(t, sooner, *got.OldestWaitingDeadline)

		// A waiter past its deadline counts as timed out before the sweeper
		// writes it: move the clock past both deadlines.
		e.clock.Advance(3 * time.Hour)
		got = read()
		require.Zero(t, got.Waiters.Waiting)
		require.Equal(t, 3, got.Waiters.TimedOut)
		require.Nil(t, got.OldestWaitingDeadline)

		// Not for run tokens.
		var trig struct {
			Trigger struct {
				RunToken struct {
					Token string `json:"token"`
				} `json:"runToken"`
			} `json:"trigger"`
		}
		e.ok(`mutation { trigger { runToken { token } } }`, nil, &trig)
		r := secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(trig.Trigger.RunToken.Token), bytes.NewReader(secBody(t, statsQuery, nil)))
		require.Equal(t, "FORBIDDEN", r.code(), r.Body)
		require.NotContains(t, r.Body, "started", "no counts leak")
	})
}

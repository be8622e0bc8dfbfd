package e2e

// Completion URLs (package hooks, engine/complete.go) over real HTTP, on
// SQLite and MariaDB: bodies of every kind reaching a live subscriber and
// a re-attach, replays, refused tokens, limits, races with notify, cancel
// and timeout, CORS, methods, and where the URL's base comes from.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/auth"
	"rendezvous/bus"
	"rendezvous/graph"
	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// hookSecret signs completion URLs in tests that make tokens of their own.
var hookSecret = strings.Repeat("h", 40)

func withHookSecret(c *service.Config) { c.HookSecrets = []string{hookSecret} }

const hookWaitersQuery = `query($id: ID!) { workflowRun(workflowRunId: $id) {
  waiters { id eventId workflowRunId stepName state deadline completionUrl }
} }`

type hookWaiter struct {
	ID            string  `json:"id"`
	StepName      *string `json:"stepName"`
	State         string  `json:"state"`
	Deadline      string  `json:"deadline"`
	CompletionURL *string `json:"completionUrl"`
}

// runWaiters lists a run's waiters with their completion URLs.
func (e *env) runWaiters(run string) []hookWaiter {
	e.t.Helper()
	var out struct {
		WorkflowRun struct {
			Waiters []hookWaiter `json:"waiters"`
		} `json:"workflowRun"`
	}
	e.ok(hookWaitersQuery, map[string]any{"id": run}, &out)
	return out.WorkflowRun.Waiters
}

// stepWaiter waits until the run's waiter of the step exists and returns it.
func (e *env) stepWaiter(run, step string) hookWaiter {
	e.t.Helper()
	var found *hookWaiter
	eventually(e.t, 10*time.Second, func() bool {
		for _, w := range e.runWaiters(run) {
			if w.StepName != nil && *w.StepName == step {
				found = &w
				return true
			}
		}
		return false
	}, "no waiter for step %s of %s", step, run)
	require.NotNil(e.t, found.CompletionURL, "a durable waiter has a completion URL")
	return *found
}

// hookResp is a completion URL's answer.
type hookResp struct {
	Status int
	Header http.Header
	Raw    []byte
	Body   map[string]any
}

func (r hookResp) str(k string) string { s, _ := r.Body[k].(string); return s }

// hookCall sends a request to a completion URL; hdr are header name/value pairs.
func hookCall(t *testing.T, method, url string, body []byte, hdr ...string) hookResp {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctxT(t), method, url, rd)
	require.NoError(t, err)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	r := hookResp{Status: resp.StatusCode, Header: resp.Header, Raw: b}
	if len(b) > 0 {
		require.NoError(t, json.Unmarshal(b, &r.Body), "%s %s: %s", method, url, b)
		require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	}
	assert.Empty(t, resp.Header.Values("Set-Cookie"), "a completion URL never sets a cookie")
	secNoInternals(t, method+" completion URL", string(b))
	return r
}

func hookPost(t *testing.T, url, contentType string, body []byte) hookResp {
	t.Helper()
	if contentType == "" {
		return hookCall(t, http.MethodPost, url, body)
	}
	return hookCall(t, http.MethodPost, url, body, "Content-Type", contentType)
}

// requireNotFound: the one answer every refused token gets.
func requireNotFound(t *testing.T, r hookResp, what string) {
	t.Helper()
	require.Equal(t, http.StatusNotFound, r.Status, "%s: %s", what, r.Raw)
	require.JSONEq(t, `{"code":"NOT_FOUND","error":"not found"}`, string(r.Raw), what)
}

// Each kind of body reaches a live subscriber on the durable step, byte
// for byte, and a subscriber re-attaching afterwards gets the same result.
func TestCompletionURLBodies(t *testing.T) {
	cases := []struct {
		name, contentType string
		body              string
		want              string // eventData, byte for byte
	}{
		{"json", "application/json", `{"z":1,"a":[1.50,"é\u00e9 <&>",null,true],"n":1e3}`, `{"z":1,"a":[1.50,"é\u00e9 <&>",null,true],"n":1e3}`},
		{"json without content type", "", `[1, 2.0, "x"]`, `[1,2.0,"x"]`}, // whitespace between tokens aside, as for any eventData
		{"text", "text/plain", `paid by card <ok> & "quoted" é`, `"paid by card <ok> & \"quoted\" é"`},
		{"text that is JSON", "text/plain; charset=utf-8", `42`, `42`},
		{"form", "application/x-www-form-urlencoded", "amount=12.50&status=paid&tag=a&tag=b&note=hello+world%21&empty=&flag&%C3%A9=%E2%82%AC",
			`{"amount":"12.50","status":"paid","tag":["a","b"],"note":"hello world!","empty":"","flag":"","é":"€"}`},
		{"form with charset", "application/x-www-form-urlencoded; charset=UTF-8", "a=1", `{"a":"1"}`},
		{"empty", "text/plain", "", `null`},
	}
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		conn := e.dial("graphql-transport-ws")
		for _, tc := range cases {
			run, ev, step := e.trigger(), uid("paid"), "wait-"+uid("s")
			sub := e.subscribe(conn, ev, waitOpts{run: run, step: step})
			w := e.stepWaiter(run, step)
			r := hookPost(t, *w.CompletionURL, tc.contentType, []byte(tc.body))
			require.Equal(t, http.StatusOK, r.Status, "%s: %s", tc.name, r.Raw)
			require.Equal(t, "NOTIFIED", r.str("state"))
			msg := r.str("messageId")
			require.True(t, strings.HasPrefix(msg, "msg_"), "%s: %s", tc.name, r.Raw)
			require.NotEmpty(t, r.str("notifiedAt"))

			got := mustResult(t, sub)
			require.Equal(t, tc.want, string(orNull(got.EventData)), tc.name)
			require.Equal(t, msg, *got.MessageID)
			require.Equal(t, w.ID, got.WaiterID)

			again := mustResult(t, e.subscribe(conn, ev, waitOpts{run: run, step: step}))
			require.Equal(t, tc.want, string(orNull(again.EventData)), "%s: re-attach", tc.name)
			require.Equal(t, msg, *again.MessageID)
			require.Equal(t, "NOTIFIED", e.stepWaiter(run, step).State)
		}

		// Bodies that cannot be event data: 400, and the waiter still waits.
		run, ev, step := e.trigger(), uid("bad"), "s"
		sub := e.subscribe(conn, ev, waitOpts{run: run, step: step})
		u := *e.stepWaiter(run, step).CompletionURL
		for _, bad := range []struct{ ct, body string }{
			{"text/plain", "\xff\xfe not UTF-8"},
			{"application/json", "{\"a\":\"\xc3\"}"},
			{"application/x-www-form-urlencoded", "a=%zz"},
			{"application/x-www-form-urlencoded", "a=%FF"},
		} {
			r := hookPost(t, u, bad.ct, []byte(bad.body))
			require.Equal(t, http.StatusBadRequest, r.Status, "%q: %s", bad.body, r.Raw)
			require.Equal(t, "BAD_USER_INPUT", r.str("code"))
		}
		quiet(t, sub)
		require.Equal(t, "WAITING", e.stepWaiter(run, step).State)
	})
}

// The first call wins; later calls, and calls after a notify or cancel
// ended the waiter, answer 409 with how it ended.
func TestCompletionURLReplays(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		conn := e.dial("graphql-transport-ws")

		// Replays of the URL.
		run, ev := e.trigger(), uid("ev")
		sub := e.subscribe(conn, ev, waitOpts{run: run, step: "s"})
		u := *e.stepWaiter(run, "s").CompletionURL
		var active struct {
			Waiters []hookWaiter `json:"waiters"`
		}
		e.ok(`query($ev: String!) { waiters(eventId: $ev) { id completionUrl } }`, map[string]any{"ev": ev}, &active)
		require.Len(t, active.Waiters, 1)
		require.Equal(t, u, *active.Waiters[0].CompletionURL, "the same URL wherever the waiter is read")
		first := hookPost(t, u, "application/json", []byte(`{"n":1}`))
		require.Equal(t, http.StatusOK, first.Status, "%s", first.Raw)
		for i := range 3 {
			r := hookPost(t, u, "application/json", []byte(fmt.Sprintf(`{"n":%d}`, i+2)))
			require.Equal(t, http.StatusConflict, r.Status, "%s", r.Raw)
			require.Equal(t, "CONFLICT", r.str("code"))
			require.Equal(t, "NOTIFIED", r.str("state"))
			require.Equal(t, first.str("messageId"), r.str("messageId"), "409 names the first result")
		}
		got := mustResult(t, sub)
		require.JSONEq(t, `{"n":1}`, string(got.EventData))
		// A targeted notify after it finds no waiter: it is stored as lookback, the step is not touched.
		n := e.notify(ev, map[string]any{"late": true}, run)
		require.Empty(t, n.NotifyResponse)

		// A GraphQL notify first: the URL answers 409 with its message id.
		run, ev = e.trigger(), uid("ev")
		e.subscribe(conn, ev, waitOpts{run: run, step: "s"})
		u = *e.stepWaiter(run, "s").CompletionURL
		n = e.notify(ev, "by notify", run)
		require.Len(t, n.NotifyResponse, 1)
		r := hookPost(t, u, "text/plain", []byte("by url"))
		require.Equal(t, http.StatusConflict, r.Status)
		require.Equal(t, n.NotifyResponse[0].MessageID, r.str("messageId"))

		// The run canceled first: 409, CANCELED, no message id.
		run, ev = e.trigger(), uid("ev")
		e.subscribe(conn, ev, waitOpts{run: run, step: "s"})
		u = *e.stepWaiter(run, "s").CompletionURL
		e.ok(`mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": run}, nil)
		r = hookPost(t, u, "text/plain", []byte("too late"))
		require.Equal(t, http.StatusConflict, r.Status)
		require.Equal(t, "CANCELED", r.str("state"))
		require.Nil(t, r.Body["messageId"])
		require.Equal(t, "CANCELED", e.stepWaiter(run, "s").State)
	})
}

// Forged, altered, expired, another waiter's and a non-durable waiter's
// tokens: 404, the same body, and nothing changes.
func TestCompletionURLRefusedTokens(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db, withHookSecret)
		conn := e.dial("graphql-transport-ws")
		run, ev := e.trigger(), uid("ev")
		sub := e.subscribe(conn, ev, waitOpts{run: run, step: "a", timeout: "1h"})
		e.subscribe(conn, ev, waitOpts{run: run, step: "b", timeout: "1h"})
		wa, wb := e.stepWaiter(run, "a"), e.stepWaiter(run, "b")
		ua := *wa.CompletionURL
		base, token, ok := strings.Cut(ua, "/hooks/")
		require.True(t, ok, ua)
		hooks := base + "/hooks/"
		parts := strings.Split(token, ".")
		require.Len(t, parts, 5, token)

		try := func(what, tok string) {
			t.Helper()
			requireNotFound(t, hookPost(t, hooks+tok, "text/plain", []byte("x")), what)
		}
		try("forged", "wh1."+strings.TrimPrefix(wa.ID, "")+".9999999999.AAAAAAAAAAA."+strings.Repeat("A", 43))
		try("empty", "")
		try("garbage", "hello")
		try("another prefix", "wh2."+strings.TrimPrefix(token, "wh1."))
		// Each part altered, one character at a time, in every character class.
		for i := 1; i < len(parts); i++ {
			for _, repl := range []string{"A", "z", "0", "9", "_", "-", "%41", "%2E"} {
				p := append([]string{}, parts...)
				p[i] = p[i][:len(p[i])-1] + repl
				if dec, _ := url.PathUnescape(strings.Join(p, ".")); dec == token {
					continue // the same token, %-encoded
				}
				try(fmt.Sprintf("part %d ends %q", i, repl), strings.Join(p, "."))
			}
		}
		// Another waiter's id in this token, and this token's id in b's: the MAC no longer matches.
		p := append([]string{}, parts...)
		p[1] = wb.ID
		try("waiter id swapped", strings.Join(p, "."))
		try("trailing slash", token+"/")
		try("extra path", token+"/x")

		// A token signed with the right key for the wrong waiter: refused by the binding.
		signer, err := auth.NewHookSigner([]string{hookSecret})
		require.NoError(t, err)
		deadline, err := time.Parse(time.RFC3339Nano, wb.Deadline)
		require.NoError(t, err)
		try("right key, b's id, a's run and step", signer.Sign(wb.ID, run, "a", deadline))
		try("right key, b's id and step, another run", signer.Sign(wb.ID, run+"x", "b", deadline))
		try("right key, b, another deadline", signer.Sign(wb.ID, run, "b", deadline.Add(time.Hour)))
		try("right key, a waiter that does not exist", signer.Sign("wtr_999999999", run, "b", deadline))
		other, err := auth.NewHookSigner([]string{strings.Repeat("o", 40)})
		require.NoError(t, err)
		try("another key", other.Sign(wb.ID, run, "b", deadline))
		// The right token for b works (so the ones above were refused for their fault).
		ok1 := hookPost(t, hooks+signer.Sign(wb.ID, run, "b", deadline), "text/plain", []byte("b"))
		require.Equal(t, http.StatusOK, ok1.Status, "%s", ok1.Raw)

		// A waiter without a step has no URL, and a token made for it is refused.
		ev2 := uid("ephemeral")
		e.subscribe(conn, ev2, waitOpts{run: run})
		var eph hookWaiter
		eventually(t, 10*time.Second, func() bool {
			for _, w := range e.runWaiters(run) {
				if w.StepName == nil && w.State == "WAITING" {
					eph = w
					return true
				}
			}
			return false
		})
		require.Nil(t, eph.CompletionURL, "a waiter without a step has no completion URL")
		dl, _ := time.Parse(time.RFC3339Nano, eph.Deadline)
		try("a waiter without a step", signer.Sign(eph.ID, run, "", dl))

		quiet(t, sub)
		require.Equal(t, "WAITING", e.stepWaiter(run, "a").State, "nothing refused touched a")

		// Expired: at the deadline the token stops working (404, not 409).
		e.clock.Advance(time.Hour + time.Second)
		try("expired", token)
		o := result(t, sub, 15*time.Second)
		require.NotNil(t, o.Result)
		require.True(t, o.Result.Timeout)
	})
}

// A body over the eventData limit is 413 (by its length, or once made
// into JSON); one at the limit is accepted.
func TestCompletionURLOversized(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		const limit = 4096
		e := newEnv(t, db, func(c *service.Config) { c.Engine.MaxPayloadBytes = limit })
		run, ev := e.trigger(), uid("ev")
		conn := e.dial("graphql-transport-ws")
		sub := e.subscribe(conn, ev, waitOpts{run: run, step: "s"})
		u := *e.stepWaiter(run, "s").CompletionURL

		big := []byte(`"` + strings.Repeat("x", limit-1) + `"`)
		r := hookPost(t, u, "application/json", big)
		require.Equal(t, http.StatusRequestEntityTooLarge, r.Status, "%s", r.Raw)
		require.Equal(t, "PAYLOAD_TOO_LARGE", r.str("code"))
		// Chunked: no Content-Length to go by.
		req, err := http.NewRequestWithContext(ctxT(t), http.MethodPost, u, io.MultiReader(bytes.NewReader(big), strings.NewReader("   ")))
		require.NoError(t, err)
		req.ContentLength = -1
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode)
		// Text that fits, but whose JSON string does not (every '"' is escaped).
		r = hookPost(t, u, "text/plain", bytes.Repeat([]byte(`"`), limit/2+1))
		require.Equal(t, http.StatusRequestEntityTooLarge, r.Status, "%s", r.Raw)
		quiet(t, sub)

		exact := []byte(`"` + strings.Repeat("y", limit-2) + `"`)
		r = hookPost(t, u, "application/json", exact)
		require.Equal(t, http.StatusOK, r.Status, "%s", r.Raw)
		require.Equal(t, string(exact), string(mustResult(t, sub).EventData))
	})
}

// Fifty calls to one URL at once: exactly one wins, the others get 409
// with its message id, the subscriber gets its data once.
func TestCompletionURLConcurrent(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		run, ev := e.trigger(), uid("ev")
		conn := e.dial("graphql-transport-ws")
		sub := e.subscribe(conn, ev, waitOpts{run: run, step: "s"})
		u := *e.stepWaiter(run, "s").CompletionURL
		before := e.scrape(nil)
		const n = 50
		resps := make([]hookResp, n)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				resps[i] = hookPost(t, u, "application/json", []byte(fmt.Sprintf(`{"caller":%d}`, i)))
			}()
		}
		close(start)
		wg.Wait()
		winner, msg := -1, ""
		for i, r := range resps {
			if r.Status == http.StatusOK {
				require.Equal(t, -1, winner, "two winners: %d and %d", winner, i)
				winner, msg = i, r.str("messageId")
			}
		}
		require.NotEqual(t, -1, winner, "nobody won")
		for i, r := range resps {
			if i != winner {
				require.Equal(t, http.StatusConflict, r.Status, "%s", r.Raw)
				require.Equal(t, msg, r.str("messageId"))
			}
		}
		got := mustResult(t, sub)
		require.JSONEq(t, fmt.Sprintf(`{"caller":%d}`, winner), string(got.EventData))
		require.Equal(t, msg, *got.MessageID)

		after := e.scrape(nil)
		delta := func(name string, labels ...string) float64 {
			return after.value(name, labels...) - before.value(name, labels...)
		}
		require.Equal(t, 1.0, delta("rendezvous_notifies_total", "kind", "completion_url", "result", "resolved"))
		require.Equal(t, float64(n-1), delta("rendezvous_notifies_total", "kind", "completion_url", "result", "none"))
		require.Equal(t, 1.0, delta("rendezvous_waiters_ended_total", "outcome", "notified"))
		require.Equal(t, float64(n-1), delta("rendezvous_graphql_errors_total", "code", "CONFLICT"))
		require.Equal(t, float64(n), delta("rendezvous_graphql_operation_duration_seconds", "type", "mutation"))
	})
}

// A completion racing a notify, a cancel or the deadline: one result, the
// one the subscriber gets, the database and both callers agree on.
func TestCompletionURLRaces(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		conn := e.dial("graphql-transport-ws")
		trials := 20
		if testing.Short() {
			trials = 5
		}
		type setup struct {
			run, ev, url string
			sub          *gqlclient.Sub
		}
		prepare := func(timeout any) setup {
			run, ev := e.trigger(), uid("race")
			sub := e.subscribe(conn, ev, waitOpts{run: run, step: "s", timeout: timeout})
			return setup{run, ev, *e.stepWaiter(run, "s").CompletionURL, sub}
		}
		urlWins := 0
		for i := range trials {
			// notify
			s := prepare(nil)
			var hr hookResp
			var nr *gqlclient.Response
			together(func() { hr = hookPost(t, s.url, "text/plain", []byte("url")) },
				func() {
					var err error
					nr, err = gqlclient.Post(ctxT(t), e.endpoint, notifyMutation, map[string]any{"ev": s.ev, "data": "notify", "run": s.run})
					require.NoError(t, err)
				})
			require.Empty(t, nr.Errors)
			var nv struct {
				Notify notifyView `json:"notify"`
			}
			require.NoError(t, nr.Decode(&nv))
			got := mustResult(t, s.sub)
			switch hr.Status {
			case http.StatusOK:
				urlWins++
				require.Empty(t, nv.Notify.NotifyResponse, "trial %d: both won", i)
				require.NotNil(t, nv.Notify.Lookback, "the notify found no waiter: stored")
				require.Equal(t, `"url"`, string(got.EventData))
				require.Equal(t, hr.str("messageId"), *got.MessageID)
			case http.StatusConflict:
				require.Len(t, nv.Notify.NotifyResponse, 1, "trial %d: neither won", i)
				require.Equal(t, `"notify"`, string(got.EventData))
				require.Equal(t, nv.Notify.NotifyResponse[0].MessageID, hr.str("messageId"))
				require.Equal(t, *got.MessageID, hr.str("messageId"))
			default:
				t.Fatalf("trial %d: %d %s", i, hr.Status, hr.Raw)
			}

			// cancel
			s = prepare(nil)
			var cr *gqlclient.Response
			together(func() { hr = hookPost(t, s.url, "text/plain", []byte("url")) },
				func() {
					var err error
					cr, err = gqlclient.Post(ctxT(t), e.endpoint, `mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": s.run})
					require.NoError(t, err)
				})
			require.Empty(t, cr.Errors, "cancel of a started run succeeds either way")
			o := result(t, s.sub, 15*time.Second)
			state := e.stepWaiter(s.run, "s").State
			switch hr.Status {
			case http.StatusOK:
				require.NotNil(t, o.Result, "trial %d: %+v", i, o)
				require.Equal(t, `"url"`, string(o.Result.EventData))
				require.Equal(t, "NOTIFIED", state)
			case http.StatusConflict:
				require.Equal(t, "CANCELED", hr.str("state"))
				require.Equal(t, "RUN_NOT_ACTIVE", o.code())
				require.Equal(t, "CANCELED", state)
			default:
				t.Fatalf("trial %d: %d %s", i, hr.Status, hr.Raw)
			}

			// the deadline, on the service's clock
			s = prepare("1h")
			together(func() { hr = hookPost(t, s.url, "text/plain", []byte("url")) },
				func() { e.clock.Advance(time.Hour) })
			o = result(t, s.sub, 15*time.Second)
			require.NotNil(t, o.Result)
			state = e.stepWaiter(s.run, "s").State
			switch hr.Status {
			case http.StatusOK:
				require.False(t, o.Result.Timeout, "trial %d: URL won, subscriber timed out", i)
				require.Equal(t, "NOTIFIED", state)
			case http.StatusNotFound, http.StatusConflict: // expired, or timed out while it was being completed
				require.True(t, o.Result.Timeout, "trial %d: %d %s", i, hr.Status, hr.Raw)
				require.Equal(t, "TIMED_OUT", state)
			default:
				t.Fatalf("trial %d: %d %s", i, hr.Status, hr.Raw)
			}
		}
		t.Logf("%d trials each; the URL won %d of the races with notify", trials, urlWins)
	})
}

// CORS: a browser on an allowed origin may call a URL; on any other it is
// refused before anything is done. No Authorization is needed even where
// tokens are required; a run token may not read the URL.
func TestCompletionURLCORSAndAuth(t *testing.T) {
	const allowed = "https://app.example.com"
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.AllowedOrigins = []string{allowed} })
	var trig struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
			RunToken      struct {
				Token string `json:"token"`
			} `json:"runToken"`
		} `json:"trigger"`
	}
	e.postOK(secAdminToken, `mutation { trigger { workflowRunId runToken { token } } }`, nil, &trig)
	run := trig.Trigger.WorkflowRunID
	conn := e.tokenDial("graphql-transport-ws", map[string]any{"Authorization": "Bearer " + secAdminToken})
	ev := uid("ev")
	sub := e.subscribe(conn, ev, waitOpts{run: run, step: "s"})
	var u string
	eventually(t, 10*time.Second, func() bool {
		var out struct {
			WorkflowRun struct{ Waiters []hookWaiter } `json:"workflowRun"`
		}
		e.postOK(secAdminToken, hookWaitersQuery, map[string]any{"id": run}, &out)
		if len(out.WorkflowRun.Waiters) == 1 && out.WorkflowRun.Waiters[0].CompletionURL != nil {
			u = *out.WorkflowRun.Waiters[0].CompletionURL
			return true
		}
		return false
	})

	// A run token sees its run's waiters, not their URLs.
	r := e.post(trig.Trigger.RunToken.Token, hookWaitersQuery, map[string]any{"id": run})
	require.Equal(t, "FORBIDDEN", r.code(), "%s", r.Body)
	require.Contains(t, r.Body, `"completionUrl":null`)

	// Disallowed origins: refused, the waiter untouched.
	for _, origin := range []string{"https://evil.example.com", "null", "https://app.example.com.evil.com", "http://app.example.com"} {
		pre := hookCall(t, http.MethodOptions, u, nil, "Origin", origin, "Access-Control-Request-Method", "POST")
		require.Equal(t, http.StatusForbidden, pre.Status, origin)
		require.Empty(t, pre.Header.Get("Access-Control-Allow-Origin"))
		post := hookCall(t, http.MethodPost, u, []byte(`"x"`), "Origin", origin, "Content-Type", "application/json")
		require.Equal(t, http.StatusForbidden, post.Status, origin)
		require.Empty(t, post.Header.Get("Access-Control-Allow-Origin"))
	}
	quiet(t, sub)

	// The allowed origin: preflight, then the call, with no Authorization
	// on a server that requires tokens, and a cookie that is ignored.
	pre := hookCall(t, http.MethodOptions, u, nil, "Origin", allowed, "Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "content-type")
	require.Equal(t, http.StatusNoContent, pre.Status)
	require.Equal(t, allowed, pre.Header.Get("Access-Control-Allow-Origin"))
	require.Contains(t, pre.Header.Get("Access-Control-Allow-Methods"), "POST")
	require.Empty(t, pre.Header.Get("Access-Control-Allow-Credentials"), "no credentials across origins")
	post := hookCall(t, http.MethodPost, u, []byte(`{"ok":true}`), "Origin", allowed, "Content-Type", "application/json", "Cookie", "session=abc")
	require.Equal(t, http.StatusOK, post.Status, "%s", post.Raw)
	require.Equal(t, allowed, post.Header.Get("Access-Control-Allow-Origin"))
	require.JSONEq(t, `{"ok":true}`, string(mustResult(t, sub).EventData))

	// A wrong Authorization header is not looked at either: the token is the credential.
	run2 := uid("r2")
	e.postOK(secAdminToken, `mutation($id: ID) { trigger(workflowRunId: $id) { workflowRunId } }`, map[string]any{"id": run2}, nil)
	e.subscribe(conn, ev, waitOpts{run: "wfr_" + run2, step: "s"})
	eventually(t, 10*time.Second, func() bool {
		var out struct {
			WorkflowRun struct{ Waiters []hookWaiter } `json:"workflowRun"`
		}
		e.postOK(secAdminToken, hookWaitersQuery, map[string]any{"id": run2}, &out)
		if len(out.WorkflowRun.Waiters) == 1 {
			u = *out.WorkflowRun.Waiters[0].CompletionURL
			return true
		}
		return false
	})
	r2 := hookCall(t, http.MethodPost, u, []byte(`1`), "Authorization", "Bearer wrong")
	require.Equal(t, http.StatusOK, r2.Status, "%s", r2.Raw)
	assert.NotContains(t, e.logs.String(), "/hooks/wh1.", "the log never holds a completion URL")
	assert.NotContains(t, e.logs.String(), "wh1.", "the log never holds a token")
}

// Only POST (and OPTIONS) are served; the rest get 405 with Allow.
func TestCompletionURLMethods(t *testing.T) {
	e := newEnv(t, testdb.SQLite(t))
	run, ev := e.trigger(), uid("ev")
	conn := e.dial("graphql-transport-ws")
	sub := e.subscribe(conn, ev, waitOpts{run: run, step: "s"})
	u := *e.stepWaiter(run, "s").CompletionURL
	for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPut, http.MethodPatch, http.MethodDelete} {
		req, err := http.NewRequestWithContext(ctxT(t), m, u, strings.NewReader("x"))
		require.NoError(t, err)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode, m)
		require.Equal(t, "POST, OPTIONS", resp.Header.Get("Allow"), m)
	}
	r := hookCall(t, http.MethodOptions, u, nil)
	require.Equal(t, http.StatusNoContent, r.Status)
	require.Equal(t, "POST, OPTIONS", r.Header.Get("Allow"))
	quiet(t, sub)
	require.Equal(t, "WAITING", e.stepWaiter(run, "s").State)
}

// Calls are rate limited per client address, refused ones included.
func TestCompletionURLRateLimited(t *testing.T) {
	e := newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.RateLimit, c.HTTP.RateBurst = 0.5, 3 })
	run, ev := e.trigger(), uid("ev")
	e.subscribe(e.dial("graphql-transport-ws"), ev, waitOpts{run: run, step: "s"})
	u := *e.stepWaiter(run, "s").CompletionURL
	base, _, _ := strings.Cut(u, "/hooks/")
	// The trigger above took one mutation of this address's burst of 3.
	requireNotFound(t, hookPost(t, base+"/hooks/guess-1", "", nil), "a guess")
	requireNotFound(t, hookPost(t, base+"/hooks/guess-2", "", nil), "a guess")
	r := hookPost(t, base+"/hooks/guess-3", "", nil)
	require.Equal(t, http.StatusTooManyRequests, r.Status, "%s", r.Raw)
	require.Equal(t, "RATE_LIMITED", r.str("code"))
	require.NotEmpty(t, r.Header.Get("Retry-After"))
	r = hookPost(t, u, "", []byte("1"))
	require.Equal(t, http.StatusTooManyRequests, r.Status, "a valid URL shares the address's bucket")
}

// Where the URL's base comes from: RENDEZVOUS_PUBLIC_URL when set; else
// the request, with X-Forwarded-Proto/Host believed from trusted proxies
// only.
func TestCompletionURLBase(t *testing.T) {
	urlOf := func(e *env, run string, hdr ...string) string {
		t.Helper()
		body, _ := json.Marshal(map[string]any{"query": hookWaitersQuery, "variables": map[string]any{"id": run}})
		r := hookCall(t, http.MethodPost, e.endpoint, body, append([]string{"Content-Type", "application/json"}, hdr...)...)
		require.Equal(t, http.StatusOK, r.Status, "%s", r.Raw)
		var out struct {
			Data struct {
				WorkflowRun struct{ Waiters []hookWaiter } `json:"workflowRun"`
			} `json:"data"`
		}
		require.NoError(t, json.Unmarshal(r.Raw, &out))
		return *out.Data.WorkflowRun.Waiters[0].CompletionURL
	}
	waitingStep := func(e *env) string {
		run := e.trigger()
		e.subscribe(e.dial("graphql-transport-ws"), uid("ev"), waitOpts{run: run, step: "s"})
		e.stepWaiter(run, "s")
		return run
	}
	fwd := []string{"X-Forwarded-Proto", "https", "X-Forwarded-Host", "hooks.example.com, proxy.internal"}

	public, err := graph.ParsePublicURL("https://api.example.com/rdv/")
	require.NoError(t, err)
	e := newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.PublicURL = public })
	run := waitingStep(e)
	require.True(t, strings.HasPrefix(urlOf(e, run, fwd...), "https://api.example.com/rdv/hooks/wh1."))

	e = newEnv(t, testdb.SQLite(t))
	run = waitingStep(e)
	u := urlOf(e, run, fwd...)
	require.True(t, strings.HasPrefix(u, e.srv.URL+"/hooks/wh1."), "an untrusted peer's X-Forwarded-* is ignored: %s", u)
	r := hookPost(t, u, "", []byte("1"))
	require.Equal(t, http.StatusOK, r.Status, "the URL works as given: %s", r.Raw)

	trusted, err := graph.ParseTrustedProxies("127.0.0.1, ::1")
	require.NoError(t, err)
	e = newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.TrustedProxies = trusted })
	run = waitingStep(e)
	require.True(t, strings.HasPrefix(urlOf(e, run, fwd...), "https://hooks.example.com/hooks/wh1."))
	require.True(t, strings.HasPrefix(urlOf(e, run, "X-Forwarded-Host", "evil.com/x?"), e.srv.URL+"/hooks/"), "a malformed forwarded host is ignored")

	for _, bad := range []string{"ftp://x", "https://", "https://a/b?c", "https://u@a", "not a url"} {
		_, err := graph.ParsePublicURL(bad)
		require.Error(t, err, bad)
	}
	cfg, err := service.ConfigFromEnv(func(k string) string {
		return map[string]string{"RENDEZVOUS_PUBLIC_URL": "http://x", "RENDEZVOUS_HOOK_SECRET": "short"}[k]
	})
	require.ErrorContains(t, err, "RENDEZVOUS_HOOK_SECRET: secret 1 is shorter than 32")
	require.NotContains(t, err.Error(), "short\"")
	require.Equal(t, "http://x", cfg.PublicURL)
}

// Without any secret configured, the key is made once and kept in the
// database: a URL handed out before a restart works after it, and one
// handed out by one replica works on another, whose completion wakes the
// subscriber on the first.
func TestCompletionURLKeyAcrossReplicasAndRestarts(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		a := newEnv(t, db)
		run, ev := a.trigger(), uid("ev")
		conn := a.dial("graphql-transport-ws")
		sub := a.subscribe(conn, ev, waitOpts{run: run, step: "s"})
		u := *a.stepWaiter(run, "s").CompletionURL
		_, token, _ := strings.Cut(u, "/hooks/")
		if testdb.Dialect(db) == "mysql" {
			b := newEnv(t, db)
			require.Equal(t, u[len(a.srv.URL):], (*b.stepWaiter(run, "s").CompletionURL)[len(b.srv.URL):], "replicas sign alike")
			r := hookPost(t, b.srv.URL+"/hooks/"+token, "application/json", []byte(`{"via":"b"}`))
			require.Equal(t, http.StatusOK, r.Status, "%s", r.Raw)
			got := mustResult(t, sub)
			require.JSONEq(t, `{"via":"b"}`, string(got.EventData), "the subscriber on a heard of it")
			run, ev = a.trigger(), uid("ev")
			sub = a.subscribe(conn, ev, waitOpts{run: run, step: "s"})
			u = *a.stepWaiter(run, "s").CompletionURL
			_, token, _ = strings.Cut(u, "/hooks/")
		}
		a.restart()
		r := hookPost(t, a.srv.URL+"/hooks/"+token, "text/plain", []byte("after restart"))
		require.Equal(t, http.StatusOK, r.Status, "%s", r.Raw)
		conn = a.dial("graphql-transport-ws")
		got := mustResult(t, a.subscribe(conn, ev, waitOpts{run: run, step: "s"}))
		require.Equal(t, `"after restart"`, string(got.EventData))
		_ = sub
	})
}

// With Redis, a completion on one replica wakes the subscriber on another
// through the bus (the catch-up poll is made too slow to be what did it).
func TestCompletionURLWakesOtherReplicaThroughRedis(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server is not installed: this test starts its own Redis")
	}
	db := testdb.MySQL(t)
	rp := &redisProc{t: t, port: freePort(t)}
	t.Cleanup(rp.kill)
	rp.start()
	mod := func(c *service.Config) {
		c.RedisURL = fmt.Sprintf("redis://127.0.0.1:%d/0", rp.port)
		c.Engine.CatchUpInterval = time.Hour
	}
	a, b := newEnv(t, db, mod), newEnv(t, db, mod)
	a.awaitRedis(bus.StateUp)
	b.awaitRedis(bus.StateUp)
	run, ev := a.trigger(), uid("ev")
	sub := a.subscribe(a.dial("graphql-transport-ws"), ev, waitOpts{run: run, step: "s"})
	u := *a.stepWaiter(run, "s").CompletionURL
	_, token, _ := strings.Cut(u, "/hooks/")
	before := a.received()
	start := time.Now()
	r := hookPost(t, b.srv.URL+"/hooks/"+token, "application/json", []byte(`{"via":"b"}`))
	require.Equal(t, http.StatusOK, r.Status, "%s", r.Raw)
	got := mustResult(t, sub)
	require.JSONEq(t, `{"via":"b"}`, string(got.EventData))
	require.Greater(t, a.received(), before, "the wake-up came through Redis")
	t.Logf("completed on b, delivered on a after %s", time.Since(start))
}

// Package e2e drives the real HTTP handler over real connections: POST and
// GET, websockets in both protocols, SSE. Every test runs against SQLite and
// MySQL (MariaDB here), each in a database of its own.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// Keep-alive connections of http.DefaultClient, owned by net/http.
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
}

// clock is the engine's clock: real time plus an offset a test may advance,
// so deadlines and retention can pass without sleeping.
type clock struct{ offset atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *clock) Advance(d time.Duration) { c.offset.Add(int64(d)) }

// env is one running service on its own database.
type env struct {
	t        *testing.T
	dbURL    string
	dialect  string
	svc      *service.Service
	srv      *httptest.Server
	endpoint string // http://…/query
	clock    *clock
	logs     *syncBuffer
	cfg      service.Config
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newEnv starts the service on the database; mods adjust its configuration.
func newEnv(t *testing.T, dbURL string, mods ...func(*service.Config)) *env {
	t.Helper()
	e := &env{t: t, dbURL: dbURL, dialect: testdb.Dialect(dbURL), clock: &clock{}, logs: &syncBuffer{}}
	e.cfg = service.Config{
		DatabaseURL: dbURL,
		Playground:  true,
		Logger:      slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	e.cfg.Engine.Now = e.clock.Now
	e.cfg.Engine.SweepInterval = 100 * time.Millisecond
	e.cfg.Engine.CatchUpInterval = 200 * time.Millisecond
	for _, m := range mods {
		m(&e.cfg)
	}
	e.start()
	t.Cleanup(func() {
		e.stop()
		if t.Failed() {
			t.Logf("service log:\n%s", e.logs.String())
		}
	})
	return e
}

func (e *env) start() {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svc, err := service.New(ctx, e.cfg)
	require.NoError(e.t, err)
	svc.Start(context.Background())
	e.svc = svc
	e.srv = httptest.NewServer(svc.Handler)
	e.endpoint = e.srv.URL + "/query"
}

// stop ends the service as a graceful shutdown would; calling it twice is harmless.
func (e *env) stop() {
	if e.svc == nil {
		return
	}
	e.svc.Close()
	e.srv.Close()
	e.svc, e.srv = nil, nil
}

// restart stops the service and starts a new one on the same database.
func (e *env) restart() {
	e.stop()
	e.start()
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// do runs a query or mutation over POST and returns the response.
func (e *env) do(query string, vars map[string]any) *gqlclient.Response {
	e.t.Helper()
	r, err := gqlclient.Post(ctxT(e.t), e.endpoint, query, vars)
	require.NoError(e.t, err)
	return r
}

// ok runs a query or mutation that must succeed and decodes data into v.
func (e *env) ok(query string, vars map[string]any, v any) {
	e.t.Helper()
	r := e.do(query, vars)
	require.Empty(e.t, r.Errors, "query %s", query)
	if v != nil {
		require.NoError(e.t, r.Decode(v))
	}
}

// fails runs a query that must fail with the code.
func (e *env) fails(code, query string, vars map[string]any) gqlclient.Error {
	e.t.Helper()
	r := e.do(query, vars)
	require.NotEmpty(e.t, r.Errors, "query %s should fail with %s; data %s", query, code, r.Data)
	require.Equal(e.t, code, r.FirstCode(), "errors: %+v", r.Errors)
	return r.Errors[0]
}

var idSeq atomic.Int64

// uid returns an id unique in the test binary, for run and event ids.
func uid(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, time.Now().UnixNano()%1e9, idSeq.Add(1))
}

const triggerMutation = `mutation($id: ID, $body: JSON, $label: String) {
  trigger(workflowRunId: $id, body: $body, label: $label) { workflowRunId created run { workflowRunId state body label } }
}`

type runView struct {
	WorkflowRunID  string          `json:"workflowRunId"`
	State          string          `json:"state"`
	Body           json.RawMessage `json:"body"`
	Label          *string         `json:"label"`
	Result         json.RawMessage `json:"result"`
	Waiters        []waiterView    `json:"waiters"`
	LookbackEvents []lookbackView  `json:"lookbackEvents"`
	Steps          []stepView      `json:"steps"`
}

type waiterView struct {
	ID            string  `json:"id"`
	EventID       string  `json:"eventId"`
	WorkflowRunID *string `json:"workflowRunId"`
	StepName      *string `json:"stepName"`
	State         string  `json:"state"`
	Deadline      string  `json:"deadline"`
	CreatedAt     string  `json:"createdAt"`
}

type lookbackView struct {
	ID        string          `json:"id"`
	EventID   string          `json:"eventId"`
	EventData json.RawMessage `json:"eventData"`
	MessageID string          `json:"messageId"`
	CreatedAt string          `json:"createdAt"`
	ExpiresAt string          `json:"expiresAt"`
}

type stepView struct {
	StepName    string  `json:"stepName"`
	Type        string  `json:"type"`
	EventID     string  `json:"eventId"`
	CompletedAt *string `json:"completedAt"`
}

// trigger creates a run with a fresh id and returns the full id.
func (e *env) trigger() string {
	e.t.Helper()
	var out struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
		} `json:"trigger"`
	}
	e.ok(triggerMutation, map[string]any{"id": uid("run")}, &out)
	return out.Trigger.WorkflowRunID
}

const notifyMutation = `mutation($ev: String!, $data: JSON, $run: ID, $step: StepRef) {
  notify(eventId: $ev, eventData: $data, workflowRunId: $run, step: $step) {
    eventId eventData deduplicated
    notifyResponse { messageId workflowRunId deduplicated error waiter { id eventId workflowRunId stepName state } }
    lookback { id workflowRunId eventId eventData messageId createdAt expiresAt }
  }
}`

type notifyView struct {
	EventID        string          `json:"eventId"`
	EventData      json.RawMessage `json:"eventData"`
	Deduplicated   bool            `json:"deduplicated"`
	NotifyResponse []struct {
		MessageID     string     `json:"messageId"`
		WorkflowRunID *string    `json:"workflowRunId"`
		Deduplicated  bool       `json:"deduplicated"`
		Error         *string    `json:"error"`
		Waiter        waiterView `json:"waiter"`
	} `json:"notifyResponse"`
	Lookback *lookbackView `json:"lookback"`
}

// notify sends a notify that must succeed. run may be "" (broadcast).
func (e *env) notify(eventID string, data any, run string) notifyView {
	e.t.Helper()
	vars := map[string]any{"ev": eventID, "data": data}
	if run != "" {
		vars["run"] = run
	}
	var out struct {
		Notify notifyView `json:"notify"`
	}
	e.ok(notifyMutation, vars, &out)
	return out.Notify
}

const runQuery = `query($id: ID!) { workflowRun(workflowRunId: $id) {
  workflowRunId state body label result
  waiters { id eventId workflowRunId stepName state deadline createdAt }
  lookbackEvents { id eventId eventData messageId createdAt expiresAt }
  steps { stepName type eventId completedAt }
} }`

// run reads a run; nil if there is none.
func (e *env) run(id string) *runView {
	e.t.Helper()
	var out struct {
		WorkflowRun *runView `json:"workflowRun"`
	}
	e.ok(runQuery, map[string]any{"id": id}, &out)
	return out.WorkflowRun
}

const waitersQuery = `query($ev: String!) { waiters(eventId: $ev) { id eventId workflowRunId stepName state deadline createdAt } }`

func (e *env) waiters(eventID string) []waiterView {
	e.t.Helper()
	var out struct {
		Waiters []waiterView `json:"waiters"`
	}
	e.ok(waitersQuery, map[string]any{"ev": eventID}, &out)
	return out.Waiters
}

// awaitWaiting waits until n waiters are WAITING on the event id.
func (e *env) awaitWaiting(eventID string, n int) []waiterView {
	e.t.Helper()
	return e.awaitWaitingIn(e.waiters, eventID, n)
}

// awaitWaitingIn is awaitWaiting with the waiters listed by list.
func (e *env) awaitWaitingIn(list func(eventID string) []waiterView, eventID string, n int) []waiterView {
	e.t.Helper()
	var ws []waiterView
	eventually(e.t, 10*time.Second, func() bool {
		ws = list(eventID)
		return len(ws) == n
	}, "want %d waiters on %s", n, eventID)
	return ws
}

// together runs fs each in a goroutine of its own, released at once (the
// two sides of a race), and returns when all have returned.
func together(fs ...func()) {
	var wg sync.WaitGroup
	start := make(chan struct{})
	for _, f := range fs {
		wg.Add(1)
		go func() { defer wg.Done(); <-start; f() }()
	}
	close(start)
	wg.Wait()
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, cond func() bool, msgAndArgs ...any) {
	t.Helper()
	deadline := time.Now().Add(within)
	for delay := time.Millisecond; ; delay = min(delay*2, 50*time.Millisecond) {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			msg := "condition not met"
			if len(msgAndArgs) > 0 {
				msg = fmt.Sprintf(msgAndArgs[0].(string), msgAndArgs[1:]...)
			}
			t.Fatalf("after %s: %s", within, msg)
		}
		time.Sleep(delay) // polling interval of the condition, not a wait for an event
	}
}

// dial opens a websocket with the protocol, closed when the test ends.
func (e *env) dial(protocol string) *gqlclient.Conn {
	e.t.Helper()
	c, err := gqlclient.Dial(ctxT(e.t), e.endpoint, protocol, nil)
	require.NoError(e.t, err)
	e.t.Cleanup(func() { c.CloseNow() })
	return c
}

const waitSubscription = `subscription($ev: String!, $run: ID, $step: String, $timeout: Duration) {
  waitForEvent(eventId: $ev, workflowRunId: $run, stepName: $step, timeout: $timeout) {
    eventId eventData timeout waiterId workflowRunId stepName messageId notifiedAt
  }
}`

type waitOpts struct {
	run, step string
	timeout   any
}

func waitVars(eventID string, o waitOpts) map[string]any {
	v := map[string]any{"ev": eventID}
	if o.run != "" {
		v["run"] = o.run
	}
	if o.step != "" {
		v["step"] = o.step
	}
	if o.timeout != nil {
		v["timeout"] = o.timeout
	}
	return v
}

// subscribe starts a waitForEvent on the connection.
func (e *env) subscribe(c *gqlclient.Conn, eventID string, o waitOpts) *gqlclient.Sub {
	e.t.Helper()
	s, err := c.Subscribe(ctxT(e.t), waitSubscription, waitVars(eventID, o))
	require.NoError(e.t, err)
	return s
}

type waitResult struct {
	EventID       string          `json:"eventId"`
	EventData     json.RawMessage `json:"eventData"`
	Timeout       bool            `json:"timeout"`
	WaiterID      string          `json:"waiterId"`
	WorkflowRunID *string         `json:"workflowRunId"`
	StepName      *string         `json:"stepName"`
	MessageID     *string         `json:"messageId"`
	NotifiedAt    *string         `json:"notifiedAt"`
}

// outcome is what a subscriber saw: one result or errors, and whether the
// stream then completed.
type outcome struct {
	Result    *waitResult
	Errors    []gqlclient.Error
	Completed bool
}

func (o outcome) code() string {
	if len(o.Errors) == 0 {
		return ""
	}
	return o.Errors[0].Code()
}

// result reads the subscription to its end: one payload then complete.
func result(t *testing.T, s *gqlclient.Sub, within time.Duration) outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	var o outcome
	for {
		ev, err := s.Next(ctx)
		require.NoError(t, err, "subscription %s: no end within %s (got %+v)", s.ID, within, o)
		switch {
		case ev.Complete:
			o.Completed = true
			return o
		case ev.Errors != nil:
			o.Errors = ev.Errors
			return o
		case ev.Response != nil:
			require.Nil(t, o.Result, "a second payload on %s", s.ID)
			if len(ev.Response.Errors) > 0 {
				o.Errors = ev.Response.Errors
				continue
			}
			var d struct {
				WaitForEvent *waitResult `json:"waitForEvent"`
			}
			require.NoError(t, ev.Response.Decode(&d))
			o.Result = d.WaitForEvent
		}
	}
}

// mustResult reads a successful result.
func mustResult(t *testing.T, s *gqlclient.Sub) *waitResult {
	t.Helper()
	o := result(t, s, 15*time.Second)
	require.Empty(t, o.Errors)
	require.NotNil(t, o.Result)
	require.True(t, o.Completed, "stream must complete after its result")
	return o.Result
}

// quiet asserts nothing arrives on the subscription while the check runs.
func quiet(t *testing.T, s *gqlclient.Sub) {
	t.Helper()
	select {
	case ev := <-s.C:
		t.Fatalf("unexpected event on %s: %+v", s.ID, ev)
	default:
	}
}

func rawJSON(s string) json.RawMessage { return json.RawMessage(s) }

func httpGet(t *testing.T, url string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctxT(t), http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(b)
}

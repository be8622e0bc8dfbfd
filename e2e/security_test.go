package e2e

// Security suite (issue #3): server tokens, run tokens scoped to one run,
// expiry, limits, origins, rate limiting, and what attackers send. Every
// test drives the real handler over real connections, with the headers a
// client would send; helpers here add the Authorization header that
// gqlclient.Post does not.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime/multipart"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/glebarez/sqlite"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	gormmysql "gorm.io/driver/mysql"
	"gorm.io/gorm"
	gormlogger "gorm.io/gorm/logger"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// Server tokens of the suite. secToken and secOtherToken are the callers
// under test (rate limits, attacks); secAdminToken sets up and checks state
// with a rate-limit bucket of its own.
const (
	secToken      = "s3cret-token-0123456789"
	secOtherToken = "0ther-s3cret-token-9876543210"
	secAdminToken = "adm1n-s3cret-token-abcdefghij"
)

var secSecret = strings.Repeat("k", 32)

func secTokens(c *service.Config) {
	c.Auth.ServerTokens = []string{secToken, secOtherToken, secAdminToken}
	c.Auth.Secrets = []string{secSecret}
}

// secEnv starts a service that requires tokens; mods adjust it further.
func secEnv(t *testing.T, db string, mods ...func(*service.Config)) *env {
	t.Helper()
	e := newEnv(t, db, append([]func(*service.Config){secTokens}, mods...)...)
	t.Cleanup(func() {
		logs := e.logs.String()
		assert.NotContains(t, logs, "panic", "the service panicked")
		// Secrets never reach the log.
		for _, secret := range []string{secToken, secOtherToken, secAdminToken, secSecret, "rt1."} {
			assert.NotContains(t, logs, secret, "the log holds a token or secret")
		}
	})
	return e
}

// secInternals matches what an error sent to a client must never contain:
// SQL, driver and ORM names, Go source positions, stack traces, file paths.
var secInternals = regexp.MustCompile(`(?i)(\bselect\b[^"]{0,200}\bfrom\b|\binsert\s+into\b|\bdelete\s+from\b|\bupdate\s+\S+\s+set\b|\.go:\d+|goroutine \d+|/work/|/root/|/home/|/usr/|/tmp/|rendezvous/[a-z]+|\bgorm\b|sqlite|mysql|mariadb|runtime\.|panic|\bsql:|\berror 1\d{3}\b|\bdatabase/sql\b)`)

// secNoInternals checks a text shown to a client.
func secNoInternals(t *testing.T, what, text string) {
	t.Helper()
	if m := secInternals.FindString(text); m != "" {
		t.Errorf("%s: a client sees internal detail %q in %s", what, m, text)
	}
}

// secCheckErrors checks GraphQL errors: each carries a code and no
// internal detail.
func secCheckErrors(t *testing.T, what string, errs []gqlclient.Error) {
	t.Helper()
	for _, er := range errs {
		assert.NotEmpty(t, er.Code(), "%s: error without extensions.code: %+v", what, er)
	}
	if len(errs) > 0 {
		b, _ := json.Marshal(errs)
		secNoInternals(t, what, string(b))
	}
}

// secResp is an HTTP answer: status, headers, body, and the body parsed
// as a GraphQL response when it is one.
type secResp struct {
	Status int
	Header http.Header
	Body   string
	JSON   bool
	R      gqlclient.Response
}

func (r secResp) code() string { return r.R.FirstCode() }

func secHeader(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

// secJSONHeader: an application/json request with the token ("" for none).
func secJSONHeader(token string) http.Header {
	h := secHeader("Content-Type", "application/json")
	if token != "" {
		h.Set("Authorization", "Bearer "+token)
	}
	return h
}

// secHTTP sends a request and checks what comes back shows no internals.
func secHTTP(t *testing.T, method, target string, hdr http.Header, body io.Reader) secResp {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), method, target, body)
	require.NoError(t, err)
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	r := secResp{Status: resp.StatusCode, Header: resp.Header, Body: string(b)}
	r.JSON = json.Unmarshal(b, &r.R) == nil
	what := method + " " + target
	if r.JSON {
		secCheckErrors(t, what, r.R.Errors)
	} else if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		secNoInternals(t, what, r.Body)
	}
	return r
}

// secBody is a GraphQL request body.
func secBody(t *testing.T, query string, vars map[string]any) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{"query": query, "variables": vars})
	require.NoError(t, err)
	return b
}

// post sends a query or mutation as application/json with the token.
func (e *env) post(token, query string, vars map[string]any) secResp {
	e.t.Helper()
	return secHTTP(e.t, http.MethodPost, e.endpoint, secJSONHeader(token), bytes.NewReader(secBody(e.t, query, vars)))
}

// get sends a query as GET with the token.
func (e *env) get(token, query string, vars map[string]any) secResp {
	e.t.Helper()
	q := url.Values{"query": {query}}
	if vars != nil {
		b, _ := json.Marshal(vars)
		q.Set("variables", string(b))
	}
	h := http.Header{}
	if token != "" {
		h.Set("Authorization", "Bearer "+token)
	}
	return secHTTP(e.t, http.MethodGet, e.endpoint+"?"+q.Encode(), h, nil)
}

// postOK runs a query or mutation that must succeed.
func (e *env) postOK(token, query string, vars map[string]any, v any) {
	e.t.Helper()
	r := e.post(token, query, vars)
	require.Equal(e.t, http.StatusOK, r.Status, "%s: %s", query, r.Body)
	require.Empty(e.t, r.R.Errors, "%s: %s", query, r.Body)
	if v != nil {
		require.NoError(e.t, r.R.Decode(v))
	}
}

// secRefused asserts a response failed with the code (and the status, when
// not 0); it does not stop the test so that every case of a table runs.
func secRefused(t *testing.T, r secResp, status int, code, what string) bool {
	t.Helper()
	ok := assert.NotEmpty(t, r.R.Errors, "%s: must be refused with %s; got %d %s", what, code, r.Status, r.Body)
	ok = assert.Equal(t, code, r.code(), "%s: %s", what, r.Body) && ok
	if status != 0 {
		ok = assert.Equal(t, status, r.Status, "%s: %s", what, r.Body) && ok
	}
	if len(r.R.Data) > 0 && string(r.R.Data) != "null" {
		ok = assert.NotContains(t, string(r.R.Data), "wfr_", "%s: a refused request returned data %s", what, r.R.Data) && ok
	}
	return ok
}

// Admin helpers: state set up and checked with secAdminToken.

func (e *env) aWaiters(eventID string) []waiterView {
	e.t.Helper()
	var out struct {
		Waiters []waiterView `json:"waiters"`
	}
	e.postOK(secAdminToken, waitersQuery, map[string]any{"ev": eventID}, &out)
	return out.Waiters
}

func (e *env) aAwaitWaiting(eventID string, n int) []waiterView {
	e.t.Helper()
	return e.awaitWaitingIn(e.aWaiters, eventID, n)
}

func (e *env) aRun(id string) *runView {
	e.t.Helper()
	var out struct {
		WorkflowRun *runView `json:"workflowRun"`
	}
	e.postOK(secAdminToken, runQuery, map[string]any{"id": id}, &out)
	return out.WorkflowRun
}

func (e *env) aNotify(eventID string, data any, run string) notifyView {
	e.t.Helper()
	vars := map[string]any{"ev": eventID, "data": data}
	if run != "" {
		vars["run"] = run
	}
	var out struct {
		Notify notifyView `json:"notify"`
	}
	e.postOK(secAdminToken, notifyMutation, vars, &out)
	return out.Notify
}

const secTriggerQuery = `mutation($id: ID, $label: String) {
  trigger(workflowRunId: $id, label: $label) { workflowRunId created runToken { token expiresAt } }
}`

// secRun is a run and the run token trigger returned for it.
type secRun struct {
	ID      string
	Token   string
	Expires time.Time
}

func secDecodeTrigger(t *testing.T, r secResp) secRun {
	t.Helper()
	require.Empty(t, r.R.Errors, "trigger: %s", r.Body)
	var out struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
			RunToken      *struct {
				Token     string `json:"token"`
				ExpiresAt string `json:"expiresAt"`
			} `json:"runToken"`
		} `json:"trigger"`
	}
	require.NoError(t, r.R.Decode(&out))
	require.NotNil(t, out.Trigger.RunToken, "trigger returns a run token: %s", r.Body)
	exp, err := time.Parse(time.RFC3339Nano, out.Trigger.RunToken.ExpiresAt)
	require.NoError(t, err)
	return secRun{ID: out.Trigger.WorkflowRunID, Token: out.Trigger.RunToken.Token, Expires: exp}
}

// aTrigger creates a run with the admin token and returns its run token.
func (e *env) aTrigger(id string) secRun {
	e.t.Helper()
	return secDecodeTrigger(e.t, e.post(secAdminToken, secTriggerQuery, map[string]any{"id": id}))
}

// aDial opens a websocket authenticated with the admin token in connection_init.
func (e *env) aDial(proto string) *gqlclient.Conn {
	e.t.Helper()
	return e.tokenDial(proto, map[string]any{"Authorization": "Bearer " + secAdminToken})
}

func (e *env) tokenDial(proto string, payload map[string]any) *gqlclient.Conn {
	e.t.Helper()
	c, err := gqlclient.Dial(ctxT(e.t), e.endpoint, proto, payload)
	require.NoError(e.t, err)
	e.t.Cleanup(func() { c.CloseNow() })
	return c
}

// secSSE runs a subscription over SSE with the headers; a response that is
// not an event stream (a refusal) comes back as one response.
func secSSE(ctx context.Context, endpoint string, hdr http.Header, query string, vars map[string]any) (int, []*gqlclient.Response, error) {
	body, _ := json.Marshal(map[string]any{"query": query, "variables": vars})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		var r gqlclient.Response
		if err := json.Unmarshal(b, &r); err != nil {
			return resp.StatusCode, nil, fmt.Errorf("status %d, body %q: %w", resp.StatusCode, b, err)
		}
		return resp.StatusCode, []*gqlclient.Response{&r}, nil
	}
	var out []*gqlclient.Response
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event:") && strings.TrimSpace(strings.TrimPrefix(line, "event:")) == "complete":
			return resp.StatusCode, out, nil
		case strings.HasPrefix(line, "data:"):
			var r gqlclient.Response
			if err := json.Unmarshal([]byte(strings.TrimSpace(strings.TrimPrefix(line, "data:"))), &r); err != nil {
				return resp.StatusCode, out, fmt.Errorf("bad SSE data %q: %w", line, err)
			}
			out = append(out, &r)
		}
	}
	if err := sc.Err(); err != nil {
		return resp.StatusCode, out, err
	}
	return resp.StatusCode, out, ctx.Err()
}

// sseOut is the outcome of a background SSE subscription.
type sseOut struct {
	status int
	resps  []*gqlclient.Response
	err    error
}

// secSSEAsync runs secSSE in the background until it ends or within passes.
func secSSEAsync(t *testing.T, endpoint string, hdr http.Header, query string, vars map[string]any, within time.Duration) <-chan sseOut {
	t.Helper()
	ch := make(chan sseOut, 1)
	ctx, cancel := context.WithTimeout(context.Background(), within)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer cancel()
		s, r, err := secSSE(ctx, endpoint, hdr, query, vars)
		ch <- sseOut{s, r, err}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ch
}

func awaitSSE(t *testing.T, ch <-chan sseOut, within time.Duration) sseOut {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(within):
		t.Fatalf("SSE subscription did not end within %s", within)
	}
	return sseOut{}
}

// secConn is a raw websocket: the test writes protocol messages itself and
// sees every message and the close status the server sends.
type secConn struct {
	t     *testing.T
	ws    *websocket.Conn
	proto string
	in    chan secMsg
	done  chan struct{}
	// noPong: do not answer the server's pings (a dead client).
	noPong atomic.Bool

	mu  sync.Mutex
	err error
}

type secMsg struct {
	ID      string          `json:"id,omitempty"`
	Type    string          `json:"type"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

// errors are the GraphQL errors a message carries: an error message's list
// (or single error), or the errors of a next/data response.
func (m secMsg) errors() []gqlclient.Error {
	switch m.Type {
	case "next", "data":
		var resp gqlclient.Response
		_ = json.Unmarshal(m.Payload, &resp)
		return resp.Errors
	case "error", "connection_error":
		var errs []gqlclient.Error
		if json.Unmarshal(m.Payload, &errs) == nil {
			return errs
		}
		var one gqlclient.Error
		if json.Unmarshal(m.Payload, &one) == nil {
			return []gqlclient.Error{one}
		}
	}
	return nil
}

func secWSURL(endpoint string) string { return strings.Replace(endpoint, "http://", "ws://", 1) }

// secDial opens a websocket with the protocol and the upgrade headers; it
// does not send connection_init.
func secDial(t *testing.T, endpoint, proto string, hdr http.Header) (*secConn, *http.Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, secWSURL(endpoint), &websocket.DialOptions{Subprotocols: []string{proto}, HTTPHeader: hdr})
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	if err != nil {
		return nil, resp, err
	}
	ws.SetReadLimit(64 << 20)
	c := &secConn{t: t, ws: ws, proto: proto, in: make(chan secMsg, 4096), done: make(chan struct{})}
	go c.read()
	t.Cleanup(func() {
		ws.CloseNow()
		<-c.done
	})
	return c, resp, nil
}

// mustDial is secDial that must succeed.
func mustDial(t *testing.T, endpoint, proto string, hdr http.Header) *secConn {
	t.Helper()
	c, _, err := secDial(t, endpoint, proto, hdr)
	require.NoError(t, err)
	return c
}

func (c *secConn) read() {
	defer close(c.done)
	defer close(c.in)
	for {
		_, b, err := c.ws.Read(context.Background())
		if err != nil {
			c.mu.Lock()
			c.err = err
			c.mu.Unlock()
			return
		}
		var m secMsg
		if json.Unmarshal(b, &m) != nil {
			m = secMsg{Type: "<not json>", Payload: json.RawMessage(strconv.Quote(string(b)))}
		}
		if m.Type == "ping" && !c.noPong.Load() {
			c.ws.Write(context.Background(), websocket.MessageText, []byte(`{"type":"pong"}`))
		}
		select {
		case c.in <- m:
		default: // nobody reads that far; the tests look at the first messages
		}
	}
}

// send writes a message (a value marshaled to JSON, or raw bytes). The
// server may already have closed: tests look at what comes back.
func (c *secConn) send(v any) {
	b, ok := v.([]byte)
	if !ok {
		var err error
		b, err = json.Marshal(v)
		require.NoError(c.t, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = c.ws.Write(ctx, websocket.MessageText, b)
}

// await returns the first message that matches; the connection closing or
// the deadline passing first fails the test.
func (c *secConn) await(within time.Duration, what string, match func(secMsg) bool) secMsg {
	c.t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		select {
		case m, ok := <-c.in:
			if !ok {
				c.t.Fatalf("%s: the connection closed first (%v)", what, c.closeErr())
			}
			secCheckWS(c.t, what, m)
			if match(m) {
				return m
			}
		case <-timer.C:
			c.t.Fatalf("%s: nothing within %s", what, within)
		}
	}
}

func (c *secConn) closeErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// closed waits until the server closes the connection and returns the close
// status (-1: dropped without a close frame), the reason and the messages
// received before.
func (c *secConn) closed(within time.Duration, what string) (websocket.StatusCode, string, []secMsg) {
	c.t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	var msgs []secMsg
	for {
		select {
		case m, ok := <-c.in:
			if !ok {
				var ce websocket.CloseError
				if errors.As(c.closeErr(), &ce) {
					secNoInternals(c.t, what+" (close reason)", ce.Reason)
					return ce.Code, ce.Reason, msgs
				}
				return -1, "", msgs
			}
			secCheckWS(c.t, what, m)
			msgs = append(msgs, m)
		case <-timer.C:
			c.t.Fatalf("%s: the server did not close the connection within %s (messages: %+v)", what, within, msgs)
		}
	}
}

// secCheckWS checks a websocket message: no internal detail anywhere, and a
// code on the errors of operations (connection_error is the protocol's own
// connection-level message and carries none).
func secCheckWS(t *testing.T, what string, m secMsg) {
	t.Helper()
	if m.Type == "connection_error" {
		secNoInternals(t, what, string(m.Payload))
		return
	}
	secCheckErrors(t, what, m.errors())
}

// init sends connection_init with the payload (nil: none) and waits for the ack.
func (c *secConn) init(payload any) {
	c.t.Helper()
	m := map[string]any{"type": "connection_init"}
	if payload != nil {
		m["payload"] = payload
	}
	c.send(m)
	c.await(10*time.Second, "connection_ack", func(m secMsg) bool { return m.Type == "connection_ack" })
}

// subscribe starts an operation with the id.
func (c *secConn) subscribe(id, query string, vars map[string]any) {
	typ := "subscribe"
	if c.proto == gqlclient.LegacyWS {
		typ = "start"
	}
	c.send(map[string]any{"id": id, "type": typ, "payload": map[string]any{"query": query, "variables": vars}})
}

// stop ends the operation with the id from the client side.
func (c *secConn) stop(id string) {
	typ := "complete"
	if c.proto == gqlclient.LegacyWS {
		typ = "stop"
	}
	c.send(map[string]any{"id": id, "type": typ})
}

var secProtocols = []string{gqlclient.TransportWS, gqlclient.LegacyWS}

// secHMAC signs a run token body the way the server does.
func secHMAC(secret, body string) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(body))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

const (
	secCancel = `mutation($id: ID!) { cancel(workflowRunId: $id) { workflowRunId state } }`
	secFinish = `mutation($id: ID!) { finishRun(workflowRunId: $id, state: RUN_SUCCESS, result: "done") { workflowRunId state } }`
)

// Server tokens over POST, GET, SSE and websockets: missing, wrong, mangled
// and misplaced tokens are refused with one generic UNAUTHENTICATED (401 on
// HTTP, 4401 on websockets), and a refused request does nothing.
func TestSecurityServerTokens(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t))

	// /readyz says the server requires tokens; /healthz and /readyz need none.
	resp, body := httpGet(t, e.srv.URL+"/readyz")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	var ready map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &ready))
	require.Equal(t, "tokens", ready["auth"], "/readyz: %s", body)
	resp, body = httpGet(t, e.srv.URL+"/healthz")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)

	id := uid("unauth")
	mutation := secBody(t, secTriggerQuery, map[string]any{"id": id})
	bad := []struct{ what, authorization string }{
		{"no Authorization header", ""},
		{"Bearer and nothing", "Bearer "},
		{"a wrong token", "Bearer wrong-token-0123456789"},
		{"the token minus its last character", "Bearer " + secToken[:len(secToken)-1]},
		{"the token plus a character", "Bearer " + secToken + "x"},
		{"the token in upper case", "Bearer " + strings.ToUpper(secToken)},
		{"the token as Basic credentials", "Basic " + base64.StdEncoding.EncodeToString([]byte("user:"+secToken))},
		{"the token twice", "Bearer " + secToken + " " + secToken},
		{"a 10 KB token", "Bearer " + strings.Repeat("t", 10<<10)},
		{"something shaped like a run token", "Bearer rt1.d2ZyX3g.99999999999.c2ln"},
		{"the run token prefix alone", "Bearer rt1."},
		{"a run token with no dots after the prefix", "Bearer rt1.abc"},
	}
	var messages []string
	for _, tc := range bad {
		h := secHeader("Content-Type", "application/json")
		if tc.authorization != "" {
			h.Set("Authorization", tc.authorization)
		}
		r := secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(mutation))
		if secRefused(t, r, http.StatusUnauthorized, "UNAUTHENTICATED", "POST with "+tc.what) {
			messages = append(messages, r.R.Errors[0].Message)
		}
		assert.Contains(t, r.Header.Get("WWW-Authenticate"), "Bearer", "POST with %s: WWW-Authenticate", tc.what)

		// GET query.
		g := secHeader()
		if tc.authorization != "" {
			g.Set("Authorization", tc.authorization)
		}
		r = secHTTP(t, http.MethodGet, e.endpoint+"?query="+url.QueryEscape(`{ __typename }`), g, nil)
		secRefused(t, r, http.StatusUnauthorized, "UNAUTHENTICATED", "GET with "+tc.what)

		// SSE.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		status, resps, err := secSSE(ctx, e.endpoint, g, waitSubscription, map[string]any{"ev": uid("sse-unauth")})
		cancel()
		if assert.NoError(t, err, "SSE with %s", tc.what) && assert.Len(t, resps, 1, "SSE with %s", tc.what) {
			assert.Equal(t, http.StatusUnauthorized, status, "SSE with %s", tc.what)
			assert.Equal(t, "UNAUTHENTICATED", resps[0].FirstCode(), "SSE with %s", tc.what)
			secCheckErrors(t, "SSE with "+tc.what, resps[0].Errors)
		}
	}
	// One message for every cause: a caller cannot probe which part was wrong.
	for _, m := range messages {
		assert.Equal(t, messages[0], m, "the refusals must not say what was wrong")
	}
	// A token in the URL is not a token.
	for _, param := range []string{"token", "access_token", "authToken", "Authorization"} {
		r := secHTTP(t, http.MethodPost, e.endpoint+"?"+param+"="+url.QueryEscape(secToken), secHeader("Content-Type", "application/json"), bytes.NewReader(mutation))
		secRefused(t, r, http.StatusUnauthorized, "UNAUTHENTICATED", "token in the URL parameter "+param)
	}
	require.Nil(t, e.aRun("wfr_"+id), "a refused trigger created nothing")

	// Accepted spellings: Bearer in any case, a bare token; both server tokens.
	for _, authz := range []string{"Bearer " + secToken, "bearer " + secOtherToken, "BEARER " + secToken, secToken, "Bearer   " + secToken + "  "} {
		r := secHTTP(t, http.MethodPost, e.endpoint, secHeader("Content-Type", "application/json", "Authorization", authz),
			bytes.NewReader(secBody(t, `{ __typename }`, nil)))
		assert.Equal(t, http.StatusOK, r.Status, "Authorization %q: %s", authz, r.Body)
		assert.Empty(t, r.R.Errors, "Authorization %q", authz)
	}
	r := e.get(secToken, `query($id: ID!) { workflowRun(workflowRunId: $id) { state } }`, map[string]any{"id": "wfr_" + id})
	require.Equal(t, http.StatusOK, r.Status, r.Body)
	require.JSONEq(t, `{"workflowRun": null}`, string(r.R.Data))

	// Websockets: the token in connection_init, or on the upgrade request.
	for _, proto := range secProtocols {
		ev := uid("ws-unauth")
		var reasons []string
		for _, tc := range []struct {
			what    string
			payload any
		}{
			{"no payload", nil},
			{"an empty payload", map[string]any{}},
			{"a wrong Authorization", map[string]any{"Authorization": "Bearer wrong-token-0123456789"}},
			{"a wrong authToken", map[string]any{"authToken": "wrong-token-0123456789"}},
			{"a numeric Authorization", map[string]any{"Authorization": 12345678901234567}},
			{"an object authToken", map[string]any{"authToken": map[string]any{"token": secToken}}},
			{"the token under another key", map[string]any{"token": secToken, "headers": map[string]any{"Authorization": "Bearer " + secToken}}},
			{"a forged run token", map[string]any{"authToken": "rt1.d2ZyX3g.99999999999.c2ln"}},
		} {
			what := proto + " connection_init with " + tc.what
			c := mustDial(t, e.endpoint, proto, nil)
			init := map[string]any{"type": "connection_init"}
			if tc.payload != nil {
				init["payload"] = tc.payload
			}
			// A subscribe pipelined behind the init must not run either.
			c.send(init)
			c.subscribe("1", waitSubscription, map[string]any{"ev": ev})
			code, reason, msgs := c.closed(10*time.Second, what)
			assert.Equal(t, websocket.StatusCode(4401), code, "%s: close code (reason %q, messages %+v)", what, reason, msgs)
			for _, m := range msgs {
				assert.NotEqual(t, "connection_ack", m.Type, "%s: acknowledged", what)
				assert.NotContains(t, []string{"next", "data"}, m.Type, "%s: an operation ran: %+v", what, m)
				if m.Type == "connection_error" {
					reasons = append(reasons, string(m.Payload))
				}
			}
			reasons = append(reasons, reason)
		}
		// One generic message whatever was wrong.
		for _, r := range reasons {
			if strings.HasPrefix(r, "{") {
				assert.Equal(t, reasons[0], r, "%s: refusals must not differ by cause", proto)
			}
		}
		require.Empty(t, e.aWaiters(ev), "%s: no waiter registered by refused connections", proto)

		// Accepted: Authorization with or without Bearer, lower-case key, authToken.
		for _, payload := range []map[string]any{
			{"Authorization": "Bearer " + secToken},
			{"Authorization": secToken},
			{"authorization": "Bearer " + secOtherToken},
			{"authToken": secToken},
		} {
			c := e.tokenDial(proto, payload)
			s, err := c.Subscribe(ctxT(t), waitSubscription, map[string]any{"ev": ev})
			require.NoError(t, err)
			e.aAwaitWaiting(ev, 1)
			require.Len(t, e.aNotify(ev, "hello", "").NotifyResponse, 1)
			require.Equal(t, `"hello"`, string(mustResult(t, s).EventData), "%s with %v", proto, payload)
		}
		// On the upgrade request instead.
		c := mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+secToken))
		c.init(nil)
		// A wrong token on the upgrade request is refused before the upgrade.
		_, resp, err := secDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer wrong-token-0123456789"))
		require.Error(t, err, "%s: upgrade with a wrong token", proto)
		if assert.NotNil(t, resp) {
			assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
		}
	}
}

// With no token configured the server runs open and says so; a token that
// is given must still be valid.
func TestSecurityOpenServer(t *testing.T) {
	e := newEnv(t, testdb.SQLite(t))
	resp, body := httpGet(t, e.srv.URL+"/readyz")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	var ready map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &ready))
	auth, _ := ready["auth"].(string)
	require.Contains(t, auth, "OPEN", "/readyz must say the server is open: %s", body)
	require.Contains(t, e.logs.String(), "NO TOKENS CONFIGURED", "the log warns about it")

	run := e.trigger() // anonymous
	require.Equal(t, "RUN_STARTED", e.run(run).State)
	c := e.dial(gqlclient.TransportWS) // no connection_init payload
	ev := uid("open")
	s := e.subscribe(c, ev, waitOpts{})
	e.awaitWaiting(ev, 1)
	e.notify(ev, 1, "")
	mustResult(t, s)

	r := e.post("wrong-token-0123456789", `{ __typename }`, nil)
	secRefused(t, r, http.StatusUnauthorized, "UNAUTHENTICATED", "a wrong token on an open server")

	// A run token still limits its holder on an open server.
	rt := secDecodeTrigger(t, e.post("", secTriggerQuery, map[string]any{"id": uid("open-run")}))
	r = e.post(rt.Token, waitersQuery, map[string]any{"ev": ev})
	secRefused(t, r, 0, "FORBIDDEN", "a run token listing waiters on an open server")
}

// A run token allows waitForEvent and workflowRun on its own run, over every
// transport, and nothing else: each other operation is FORBIDDEN and
// changes nothing.
func TestSecurityRunTokenScope(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := secEnv(t, db)
		start := time.Now()
		mine := e.aTrigger(uid("mine"))
		other := e.aTrigger(uid("other"))
		require.True(t, strings.HasPrefix(mine.Token, "rt1."), "token %q", mine.Token)
		require.NotEqual(t, mine.Token, other.Token)
		// The default TTL, to the second.
		assert.WithinDuration(t, start.Add(7*24*time.Hour), mine.Expires, 2*time.Second)

		// State the attempts below must not touch.
		evOtherLB := uid("other-lb")
		require.NotNil(t, e.aNotify(evOtherLB, "for-other", other.ID).Lookback)
		evMineLB := uid("mine-lb")
		require.NotNil(t, e.aNotify(evMineLB, "for-mine", mine.ID).Lookback)
		admin := e.aDial(gqlclient.TransportWS)
		evStep := uid("other-step")
		otherStep := e.subscribe(admin, evStep, waitOpts{run: other.ID, step: "approve"})
		evBroadcast := uid("broadcast")
		broadcastWaiter := e.subscribe(admin, evBroadcast, waitOpts{})
		e.aAwaitWaiting(evStep, 1)
		e.aAwaitWaiting(evBroadcast, 1)

		tok := mine.Token
		// Allowed: workflowRun on its own run, by full and by short id, POST and GET.
		for _, id := range []string{mine.ID, strings.TrimPrefix(mine.ID, "wfr_")} {
			var out struct {
				WorkflowRun *runView `json:"workflowRun"`
			}
			e.postOK(tok, runQuery, map[string]any{"id": id}, &out)
			require.NotNil(t, out.WorkflowRun)
			require.Equal(t, mine.ID, out.WorkflowRun.WorkflowRunID)
			r := e.get(tok, runQuery, map[string]any{"id": id})
			require.Empty(t, r.R.Errors, r.Body)
		}
		e.postOK(tok, `{ __typename }`, nil, nil)

		short := func(id string) string { return strings.TrimPrefix(id, "wfr_") }
		created := uid("by-run-token")
		evNew := uid("run-token-notify")
		forbidden := []struct {
			what  string
			query string
			vars  map[string]any
			op    string
		}{
			{"workflowRun of another run", runQuery, map[string]any{"id": other.ID}, ""},
			{"workflowRun of another run by short id", runQuery, map[string]any{"id": short(other.ID)}, ""},
			{"workflowRun of another run as a literal", `{ workflowRun(workflowRunId: "` + other.ID + `") { state lookbackEvents { eventData } } }`, nil, ""},
			{"its own run and another in one query", `query($a: ID!, $b: ID!) { a: workflowRun(workflowRunId: $a) { state } b: workflowRun(workflowRunId: $b) { state } }`, map[string]any{"a": mine.ID, "b": other.ID}, ""},
			{"workflowRun with the id from a default value", `query($id: ID! = "` + other.ID + `") { workflowRun(workflowRunId: $id) { state } }`, nil, ""},
			{"the waiters listing", waitersQuery, map[string]any{"ev": evStep}, ""},
			{"the workflowRuns listing", `{ workflowRuns { nodes { workflowRunId } } }`, nil, ""},
			{"introspection: __schema", `{ __schema { types { name } } }`, nil, ""},
			{"introspection: __type", `{ __type(name: "Mutation") { fields { name } } }`, nil, ""},
			{"waiters behind an alias named workflowRun", `{ workflowRun: waiters(eventId: "` + evStep + `") { id } }`, nil, ""},
			{"waiters in a fragment", `query { ...F } fragment F on Query { waiters(eventId: "` + evStep + `") { id } }`, nil, ""},
			{"workflowRuns in an inline fragment", `query { ... on Query { workflowRuns { nodes { workflowRunId } } } }`, nil, ""},
			{"a nested fragment", `query { ...A } fragment A on Query { ...B } fragment B on Query { workflowRun(workflowRunId: "` + other.ID + `") { state } }`, nil, ""},
			{"trigger", secTriggerQuery, map[string]any{"id": created}, ""},
			{"trigger of its own run id (a fresh token)", secTriggerQuery, map[string]any{"id": mine.ID}, ""},
			{"a targeted notify to its own run", notifyMutation, map[string]any{"ev": evNew, "data": 1, "run": mine.ID}, ""},
			{"a targeted notify to another run", notifyMutation, map[string]any{"ev": evStep, "data": 1, "run": other.ID}, ""},
			{"a broadcast notify", notifyMutation, map[string]any{"ev": evBroadcast, "data": 1}, ""},
			{"a notify step of its own run", notifyMutation, rsNotifyVars(evBroadcast, 1, "", mine.ID, "n"), ""},
			{"cancel of its own run", secCancel, map[string]any{"id": mine.ID}, ""},
			{"cancel of another run", secCancel, map[string]any{"id": other.ID}, ""},
			{"finishRun of its own run", secFinish, map[string]any{"id": mine.ID}, ""},
			{"finishRun of another run", secFinish, map[string]any{"id": other.ID}, ""},
			{"a mutation chosen by operationName", `query A { workflowRun(workflowRunId: "` + mine.ID + `") { state } } mutation B { cancel(workflowRunId: "` + mine.ID + `") { state } }`, nil, "B"},
		}
		for _, tc := range forbidden {
			body, _ := json.Marshal(map[string]any{"query": tc.query, "variables": tc.vars, "operationName": tc.op})
			r := secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(tok), bytes.NewReader(body))
			secRefused(t, r, 0, "FORBIDDEN", "run token: "+tc.what)
			if !strings.HasPrefix(strings.TrimSpace(tc.query), "mutation") && tc.op == "" {
				r = e.get(tok, tc.query, tc.vars)
				secRefused(t, r, 0, "FORBIDDEN", "run token over GET: "+tc.what)
			}
		}

		// Websocket, both protocols, the token in connection_init.
		for _, proto := range secProtocols {
			for _, payload := range []map[string]any{{"authToken": tok}, {"Authorization": "Bearer " + tok}} {
				c := e.tokenDial(proto, payload)
				// Its own run: a live wait and a lookback.
				ev := uid("mine-live")
				s := e.subscribe(c, ev, waitOpts{run: mine.ID})
				e.aAwaitWaiting(ev, 1)
				require.Len(t, e.aNotify(ev, "live", mine.ID).NotifyResponse, 1)
				require.Equal(t, `"live"`, string(mustResult(t, s).EventData))
				lb := uid("mine-lb2")
				require.NotNil(t, e.aNotify(lb, "stored", mine.ID).Lookback)
				require.Equal(t, `"stored"`, string(mustResult(t, e.subscribe(c, lb, waitOpts{run: short(mine.ID), step: "s-" + lb})).EventData))

				for _, tc := range []struct {
					what  string
					query string
					vars  map[string]any
				}{
					{"waitForEvent on another run", waitSubscription, waitVars(evOtherLB, waitOpts{run: other.ID})},
					{"waitForEvent attaching to another run's durable step", waitSubscription, waitVars(evStep, waitOpts{run: other.ID, step: "approve"})},
					{"waitForEvent without a run (listening to broadcasts)", waitSubscription, waitVars(evBroadcast, waitOpts{})},
					{"a mutation", secCancel, map[string]any{"id": mine.ID}},
					{"a query of waiters", waitersQuery, map[string]any{"ev": evStep}},
				} {
					s, err := c.Subscribe(ctxT(t), tc.query, tc.vars)
					require.NoError(t, err)
					o := result(t, s, 10*time.Second)
					assert.Nil(t, o.Result, "%s %s", proto, tc.what)
					assert.Equal(t, "FORBIDDEN", o.code(), "%s: %s: %+v", proto, tc.what, o.Errors)
					secCheckErrors(t, proto+" "+tc.what, o.Errors)
				}
			}
			// The run token on the upgrade request, a server token in
			// connection_init: the upgrade's principal stays, no escalation.
			c := mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+tok))
			c.init(map[string]any{"Authorization": "Bearer " + secToken})
			c.subscribe("1", waitersQuery, map[string]any{"ev": evStep})
			m := c.await(10*time.Second, "waiters over a run-token websocket", func(m secMsg) bool {
				return m.ID == "1" && m.Type != "complete"
			})
			errs := m.errors()
			if assert.NotEmpty(t, errs, "%s: escalation through connection_init: %s", proto, m.Payload) {
				assert.Equal(t, "FORBIDDEN", errs[0].Code())
			}
		}

		// SSE with the run token.
		hdr := secHeader("Authorization", "Bearer "+tok)
		ev := uid("mine-sse")
		ch := secSSEAsync(t, e.endpoint, hdr, waitSubscription, waitVars(ev, waitOpts{run: mine.ID}), 20*time.Second)
		e.aAwaitWaiting(ev, 1)
		e.aNotify(ev, "sse", mine.ID)
		o := awaitSSE(t, ch, 15*time.Second)
		require.NoError(t, o.err)
		require.Len(t, o.resps, 1)
		require.Empty(t, o.resps[0].Errors)
		for _, vars := range []map[string]any{waitVars(evOtherLB, waitOpts{run: other.ID}), waitVars(evBroadcast, waitOpts{})} {
			o := awaitSSE(t, secSSEAsync(t, e.endpoint, hdr, waitSubscription, vars, 10*time.Second), 15*time.Second)
			require.NoError(t, o.err)
			if assert.NotEmpty(t, o.resps) {
				assert.Equal(t, "FORBIDDEN", o.resps[0].FirstCode(), "SSE %v", vars)
			}
		}

		// Nothing was touched.
		for _, id := range []string{mine.ID, other.ID} {
			require.Equal(t, "RUN_STARTED", e.aRun(id).State, "run %s", id)
		}
		require.Nil(t, e.aRun("wfr_"+created), "no run created by a run token")
		lbs := e.aRun(other.ID).LookbackEvents
		require.Len(t, lbs, 1, "the other run's lookback is still stored")
		require.Equal(t, `"for-other"`, string(lbs[0].EventData))
		mineLBs := e.aRun(mine.ID).LookbackEvents
		require.Len(t, mineLBs, 1, "no lookback stored on the own run by the refused notify")
		require.Equal(t, evMineLB, mineLBs[0].EventID)
		ws := e.aWaiters(evStep)
		require.Len(t, ws, 1)
		require.Equal(t, "WAITING", ws[0].State)
		require.Len(t, e.aWaiters(evBroadcast), 1)
		require.Empty(t, e.aWaiters(evNew))
		quiet(t, otherStep)
		quiet(t, broadcastWaiter)
	})
}

// Forged, tampered and expired run tokens are refused like any wrong token.
func TestSecurityRunTokenForgery(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t))
	mine := e.aTrigger(uid("mine"))
	other := e.aTrigger(uid("other"))
	p := strings.Split(mine.Token, ".")
	require.Len(t, p, 4, "rt1.<run>.<expiry>.<signature>: %s", mine.Token)
	q := strings.Split(other.Token, ".")
	b64 := base64.RawURLEncoding
	exp, err := strconv.ParseInt(p[2], 10, 64)
	require.NoError(t, err)
	flip := func(s string) string {
		last := s[len(s)-1]
		if last == 'A' {
			return s[:len(s)-1] + "B"
		}
		return s[:len(s)-1] + "A"
	}
	body := func(run string, exp string) string { return "rt1." + b64.EncodeToString([]byte(run)) + "." + exp }
	sig, _ := b64.DecodeString(p[3])
	forged := []struct{ what, token string }{
		{"another token's signature", strings.Join([]string{p[0], p[1], p[2], q[3]}, ".")},
		{"the run swapped, the signature kept", strings.Join([]string{p[0], q[1], p[2], p[3]}, ".")},
		{"the run swapped to a short id", body(strings.TrimPrefix(other.ID, "wfr_"), p[2]) + "." + p[3]},
		{"the expiry pushed out, the signature kept", strings.Join([]string{p[0], p[1], strconv.FormatInt(exp+365*24*3600, 10), p[3]}, ".")},
		{"the last signature character changed", flip(mine.Token)},
		{"the signature empty", strings.Join(p[:3], ".") + "."},
		{"no signature", strings.Join(p[:3], ".")},
		{"the signature truncated", strings.Join(p[:3], ".") + "." + p[3][:20]},
		{"the signature in standard base64", strings.Join(p[:3], ".") + "." + base64.StdEncoding.EncodeToString(sig)},
		{"an extra segment", mine.Token + ".x"},
		{"an extra segment inside", strings.Join([]string{p[0], p[1], p[2], "x", p[3]}, ".")},
		{"signed with another secret", body(other.ID, p[2]) + "." + secHMAC(strings.Repeat("z", 32), body(other.ID, p[2]))},
		{"signed with an empty secret", body(other.ID, p[2]) + "." + secHMAC("", body(other.ID, p[2]))},
		{"another version prefix", "rt2." + strings.Join(p[1:], ".")},
		{"the prefix in upper case", "RT1." + strings.Join(p[1:], ".")},
		{"validly signed, a malformed expiry", body(other.ID, "soon") + "." + secHMAC(secSecret, body(other.ID, "soon"))},
		{"validly signed, an expiry in the past", body(other.ID, "1") + "." + secHMAC(secSecret, body(other.ID, "1"))},
		{"validly signed, a malformed run id", "rt1.!!!." + p[2] + "." + secHMAC(secSecret, "rt1.!!!."+p[2])},
		{"whitespace inside", strings.Join([]string{p[0], p[1], p[2] + " ", p[3]}, ".")},
	}
	for _, tc := range forged {
		r := e.post(tc.token, runQuery, map[string]any{"id": other.ID})
		secRefused(t, r, http.StatusUnauthorized, "UNAUTHENTICATED", "forged run token: "+tc.what)
		r = e.post(tc.token, runQuery, map[string]any{"id": mine.ID})
		secRefused(t, r, http.StatusUnauthorized, "UNAUTHENTICATED", "forged run token on its own run: "+tc.what)
	}
	// Sanity: the token is good as it is, and a locally computed signature
	// over a body the server signed matches (the forgeries above are fair).
	e.postOK(mine.Token, runQuery, map[string]any{"id": mine.ID}, nil)
	require.Equal(t, p[3], secHMAC(secSecret, strings.Join(p[:3], ".")))

	// Websocket with a forged token: 4401.
	for _, proto := range secProtocols {
		c := mustDial(t, e.endpoint, proto, nil)
		c.send(map[string]any{"type": "connection_init", "payload": map[string]any{"authToken": forged[1].token}})
		code, _, _ := c.closed(10*time.Second, proto+" forged run token")
		assert.Equal(t, websocket.StatusCode(4401), code, proto)
	}

	// Expiry: move the clock past the TTL. Every transport refuses the token.
	e.clock.Advance(7*24*time.Hour + time.Second)
	r := e.post(mine.Token, runQuery, map[string]any{"id": mine.ID})
	secRefused(t, r, http.StatusUnauthorized, "UNAUTHENTICATED", "an expired run token")
	r = e.get(mine.Token, runQuery, map[string]any{"id": mine.ID})
	secRefused(t, r, http.StatusUnauthorized, "UNAUTHENTICATED", "an expired run token over GET")
	o := awaitSSE(t, secSSEAsync(t, e.endpoint, secHeader("Authorization", "Bearer "+mine.Token), waitSubscription, waitVars(uid("x"), waitOpts{run: mine.ID}), 10*time.Second), 15*time.Second)
	require.NoError(t, o.err)
	assert.Equal(t, http.StatusUnauthorized, o.status, "an expired run token over SSE")
	for _, proto := range secProtocols {
		c := mustDial(t, e.endpoint, proto, nil)
		c.send(map[string]any{"type": "connection_init", "payload": map[string]any{"authToken": mine.Token}})
		code, _, _ := c.closed(10*time.Second, proto+" expired run token")
		assert.Equal(t, websocket.StatusCode(4401), code, proto)
		_, resp, err := secDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+mine.Token))
		require.Error(t, err)
		if assert.NotNil(t, resp) {
			assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
		}
	}
}

// Rotating the signing secret: the new secret first and the old one kept,
// old tokens still verify and new ones are signed with the new secret;
// dropping the old secret ends the old tokens.
func TestSecurityRunTokenSecretRotation(t *testing.T) {
	oldSecret, newSecret := strings.Repeat("o", 32), strings.Repeat("n", 32)
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.Auth.Secrets = []string{oldSecret} })
	a := e.aTrigger(uid("a"))
	pa := strings.Split(a.Token, ".")
	require.Equal(t, secHMAC(oldSecret, strings.Join(pa[:3], ".")), pa[3], "signed with the only secret")
	e.postOK(a.Token, runQuery, map[string]any{"id": a.ID}, nil)

	// Rotate: new first, old still there.
	e.cfg.Auth.Secrets = []string{newSecret, oldSecret}
	e.restart()
	e.postOK(a.Token, runQuery, map[string]any{"id": a.ID}, nil)
	c := e.tokenDial(gqlclient.TransportWS, map[string]any{"authToken": a.Token})
	ev := uid("rot")
	s := e.subscribe(c, ev, waitOpts{run: a.ID})
	e.aAwaitWaiting(ev, 1)
	e.aNotify(ev, "rotated", a.ID)
	require.Equal(t, `"rotated"`, string(mustResult(t, s).EventData))
	c.Close()
	b := e.aTrigger(uid("b"))
	pb := strings.Split(b.Token, ".")
	require.Equal(t, secHMAC(newSecret, strings.Join(pb[:3], ".")), pb[3], "new tokens are signed with the first secret")
	e.postOK(b.Token, runQuery, map[string]any{"id": b.ID}, nil)

	// Drop the old secret.
	e.cfg.Auth.Secrets = []string{newSecret}
	e.restart()
	secRefused(t, e.post(a.Token, runQuery, map[string]any{"id": a.ID}), http.StatusUnauthorized, "UNAUTHENTICATED", "a token of a dropped secret")
	e.postOK(b.Token, runQuery, map[string]any{"id": b.ID}, nil)

	// Back to the old secret only: the new secret's tokens are not accepted.
	e.cfg.Auth.Secrets = []string{oldSecret}
	e.restart()
	secRefused(t, e.post(b.Token, runQuery, map[string]any{"id": b.ID}), http.StatusUnauthorized, "UNAUTHENTICATED", "a token of a secret no longer configured")
	e.postOK(a.Token, runQuery, map[string]any{"id": a.ID}, nil)
}

// A websocket opened with a run token ends when the token expires, on both
// protocols, whether the token came in connection_init or on the upgrade
// request. The subscription-bound waiter goes with it; a durable one stays.
func TestSecurityRunTokenExpiryEndsWebsocket(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.Auth.RunTokenTTL = 2 * time.Second })
	type session struct {
		what string
		run  secRun
		c    *secConn
		ev   string
	}
	var sessions []session
	for _, proto := range secProtocols {
		for _, where := range []string{"connection_init", "upgrade header"} {
			before := time.Now()
			run := e.aTrigger(uid("ttl"))
			// RunToken truncates to whole seconds: between 1 and 2 s from now.
			require.True(t, run.Expires.After(before), "expiresAt %s", run.Expires)
			require.False(t, run.Expires.After(time.Now().Add(2*time.Second)), "expiresAt %s", run.Expires)
			var c *secConn
			if where == "connection_init" {
				c = mustDial(t, e.endpoint, proto, nil)
				c.init(map[string]any{"authToken": run.Token})
			} else {
				c = mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+run.Token))
				c.init(nil)
			}
			ev := uid("ttl-ev")
			c.subscribe("plain", waitSubscription, waitVars(ev, waitOpts{run: run.ID}))
			c.subscribe("durable", waitSubscription, waitVars(ev, waitOpts{run: run.ID, step: "keep"}))
			sessions = append(sessions, session{proto + " via " + where, run, c, ev})
		}
	}
	for _, s := range sessions {
		e.aAwaitWaiting(s.ev, 2)
	}
	for _, s := range sessions {
		code, reason, msgs := s.c.closed(s.run.Expires.Sub(time.Now())+10*time.Second, s.what)
		now := time.Now()
		assert.False(t, now.Before(s.run.Expires.Add(-200*time.Millisecond)), "%s: closed at %s, before the token expired at %s", s.what, now, s.run.Expires)
		for _, m := range msgs {
			assert.NotContains(t, []string{"next", "data"}, m.Type, "%s: a result arrived: %+v", s.what, m)
		}
		t.Logf("%s: closed with %d %q after %+v", s.what, code, reason, msgs)
	}
	for _, s := range sessions {
		eventually(t, 10*time.Second, func() bool {
			ws := e.aWaiters(s.ev)
			return len(ws) == 1 && ws[0].StepName != nil && *ws[0].StepName == "keep"
		}, "%s: only the durable waiter stays", s.what)
		// The expired token opens nothing new.
		c := mustDial(t, e.endpoint, gqlclient.TransportWS, nil)
		c.send(map[string]any{"type": "connection_init", "payload": map[string]any{"authToken": s.run.Token}})
		code, _, _ := c.closed(10*time.Second, s.what+": reconnect")
		assert.Equal(t, websocket.StatusCode(4401), code, "%s: reconnect with the expired token", s.what)
	}
}

// The same for an SSE stream: a run token must not keep a subscription open
// after it expired (the issue names websockets; an SSE stream is the same
// long-lived session over another transport).
// A websocket authenticated by a run token in its upgrade request is closed
// when the token expires even before it sends connection_init: the expiry
// outlives the upgrade's handler, which returns once the connection is
// upgraded (the init timeout here is longer than the token's life).
func TestSecurityRunTokenExpiryEndsUninitialisedWebsocket(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) {
		c.Auth.RunTokenTTL = 2 * time.Second
		c.HTTP.InitTimeout = time.Minute
	})
	for _, proto := range secProtocols {
		run := e.aTrigger(uid("ttl-noinit"))
		c := mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+run.Token))
		code, reason, _ := c.closed(time.Until(run.Expires)+10*time.Second, proto)
		assert.False(t, time.Now().Before(run.Expires.Add(-200*time.Millisecond)), "%s: closed before the token expired", proto)
		assert.Equal(t, websocket.StatusCode(4401), code, proto)
		assert.Equal(t, "token expired", reason, proto)
	}
}

func TestSecurityRunTokenExpiryEndsSSE(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.Auth.RunTokenTTL = 2 * time.Second })
	run := e.aTrigger(uid("ttl-sse"))
	ev := uid("ttl-sse-ev")
	within := time.Until(run.Expires) + 5*time.Second
	ch := secSSEAsync(t, e.endpoint, secHeader("Authorization", "Bearer "+run.Token), waitSubscription, waitVars(ev, waitOpts{run: run.ID}), within)
	e.aAwaitWaiting(ev, 1)
	o := awaitSSE(t, ch, within+5*time.Second)
	assert.NotErrorIs(t, o.err, context.DeadlineExceeded,
		"an SSE subscription opened with a run token that expired at %s was still open 5 s later (graph/security.go: only wsInit bounds a session by p.Expires; authenticate does not for SSE)", run.Expires.Format(time.RFC3339))
	eventually(t, 10*time.Second, func() bool { return len(e.aWaiters(ev)) == 0 }, "the waiter ends with the stream")
}

// Size limits: the POST body (413, with or without a Content-Length), a
// websocket message (closed with 1009 before anything runs), eventData and
// event ids at their configured limits, on every transport.
func TestSecurityBodyAndMessageLimits(t *testing.T) {
	const maxBody = 16 << 10
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) {
		c.HTTP.MaxBodyBytes = maxBody
		c.Engine.MaxPayloadBytes = 4 << 10
		c.Engine.MaxIDBytes = 32
	})
	run := e.aTrigger(uid("lim"))
	admin := e.aDial(gqlclient.TransportWS)
	ev := uid("lim-ev")
	watcher := e.subscribe(admin, ev, waitOpts{run: run.ID})
	e.aAwaitWaiting(ev, 1)

	// POST bodies over MaxBodyBytes: 413, nothing done, whatever the framing.
	big := secBody(t, notifyMutation, map[string]any{"ev": ev, "data": strings.Repeat("x", maxBody), "run": run.ID})
	require.Greater(t, len(big), maxBody)
	r := secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(secToken), bytes.NewReader(big))
	secRefused(t, r, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE", "a POST body over the limit")
	// No Content-Length: chunked, the limit still holds while reading.
	r = secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(secToken), io.MultiReader(bytes.NewReader(big)))
	secRefused(t, r, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE", "a chunked POST body over the limit")
	// A Content-Length that lies low: the server reads no more than it says.
	// A long query of whitespace: padding that a parser would accept.
	padded := secBody(t, `{ __typename }`+strings.Repeat(" ", maxBody), nil)
	r = secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(secToken), bytes.NewReader(padded))
	secRefused(t, r, http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE", "a padded query over the limit")
	quiet(t, watcher)
	require.Len(t, e.aWaiters(ev), 1)
	require.Empty(t, e.aRun(run.ID).LookbackEvents)

	// eventData over its limit inside a body that fits, over POST and websocket.
	over := strings.Repeat("d", 4<<10)
	r = e.post(secToken, notifyMutation, map[string]any{"ev": ev, "data": over, "run": run.ID})
	secRefused(t, r, 0, "PAYLOAD_TOO_LARGE", "eventData over the limit over POST")
	for _, proto := range secProtocols {
		c := e.tokenDial(proto, map[string]any{"authToken": secToken})
		s, err := c.Subscribe(ctxT(t), notifyMutation, map[string]any{"ev": ev, "data": over, "run": run.ID})
		require.NoError(t, err)
		o := result(t, s, 10*time.Second)
		assert.Equal(t, "PAYLOAD_TOO_LARGE", o.code(), "eventData over the limit over %s: %+v", proto, o.Errors)
		s, err = c.Subscribe(ctxT(t), secTriggerQuery, map[string]any{"id": strings.Repeat("r", 33)})
		require.NoError(t, err)
		assert.Equal(t, "BAD_USER_INPUT", result(t, s, 10*time.Second).code(), "a run id over MaxIDBytes over %s", proto)
	}
	quiet(t, watcher)
	require.Len(t, e.aWaiters(ev), 1)

	// Event ids at the configured limit (32) pass, one byte more is refused,
	// on POST, websocket and SSE.
	at, past := strings.Repeat("e", 32), strings.Repeat("e", 33)
	r = e.post(secToken, notifyMutation, map[string]any{"ev": past})
	secRefused(t, r, 0, "BAD_USER_INPUT", "a 33-byte event id over POST")
	e.postOK(secToken, notifyMutation, map[string]any{"ev": at}, nil)
	for _, proto := range secProtocols {
		c := e.tokenDial(proto, map[string]any{"authToken": secToken})
		s, err := c.Subscribe(ctxT(t), waitSubscription, map[string]any{"ev": past})
		require.NoError(t, err)
		assert.Equal(t, "BAD_USER_INPUT", result(t, s, 10*time.Second).code(), "a 33-byte event id over %s", proto)
	}
	o := awaitSSE(t, secSSEAsync(t, e.endpoint, secHeader("Authorization", "Bearer "+secToken), waitSubscription, map[string]any{"ev": past}, 10*time.Second), 15*time.Second)
	require.NoError(t, o.err)
	if assert.NotEmpty(t, o.resps) {
		assert.Equal(t, "BAD_USER_INPUT", o.resps[0].FirstCode(), "a 33-byte event id over SSE")
	}

	// A websocket message over MaxBodyBytes closes that connection with
	// 1009 before the operation runs; one just under is served.
	for _, proto := range secProtocols {
		c := mustDial(t, e.endpoint, proto, nil)
		c.init(map[string]any{"authToken": secToken})
		evBig := uid("ws-big")
		q := waitSubscription + "\n# " + strings.Repeat("p", maxBody)
		c.subscribe("big", q, waitVars(evBig, waitOpts{}))
		code, reason, msgs := c.closed(10*time.Second, proto+" oversized message")
		assert.Equal(t, websocket.StatusMessageTooBig, code, "%s: an oversized message (reason %q, messages %+v)", proto, reason, msgs)
		require.Empty(t, e.aWaiters(evBig), "%s: the oversized subscribe did not run", proto)

		c = mustDial(t, e.endpoint, proto, nil)
		c.init(map[string]any{"authToken": secToken})
		q = waitSubscription + "\n# " + strings.Repeat("p", maxBody-1024)
		c.subscribe("fits", q, waitVars(evBig, waitOpts{}))
		e.aAwaitWaiting(evBig, 1)
		e.aNotify(evBig, "fits", "")
		c.await(10*time.Second, proto+" result under the limit", func(m secMsg) bool { return m.ID == "fits" && (m.Type == "next" || m.Type == "data") })

		// connection_init itself is held to the limit.
		c = mustDial(t, e.endpoint, proto, nil)
		c.send(map[string]any{"type": "connection_init", "payload": map[string]any{"authToken": secToken, "pad": strings.Repeat("p", maxBody)}})
		code, _, _ = c.closed(10*time.Second, proto+" oversized connection_init")
		assert.Equal(t, websocket.StatusMessageTooBig, code, "%s: an oversized connection_init", proto)
	}

	// The watcher still gets a normal notify.
	require.Len(t, e.aNotify(ev, "fine", run.ID).NotifyResponse, 1)
	require.Equal(t, `"fine"`, string(mustResult(t, watcher).EventData))
}

// SSE is a POST too: its body must be held to MaxBodyBytes like any other.
func TestSecuritySSEBodyLimit(t *testing.T) {
	const maxBody = 16 << 10
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.MaxBodyBytes = maxBody })
	ev := uid("sse-big")
	body := secBody(t, waitSubscription+"\n# "+strings.Repeat("p", 4*maxBody), waitVars(ev, waitOpts{}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.endpoint, bytes.NewReader(body))
	require.NoError(t, err)
	req.Header = secJSONHeader(secToken)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	status, ct := resp.StatusCode, resp.Header.Get("Content-Type")
	cancel() // end the stream if the server opened one
	resp.Body.Close()
	assert.Equal(t, http.StatusRequestEntityTooLarge, status,
		"a %d-byte SSE POST (limit %d) was answered %d %s: gqlgen's transport.SSE reads the whole body with no limit (graph/handler.go adds transport.SSE; only httpTransport uses http.MaxBytesReader)", len(body), maxBody, status, ct)
	eventually(t, 10*time.Second, func() bool { return len(e.aWaiters(ev)) == 0 }, "no waiter left behind")
}

// Query limits with Playground off: depth, aliases, complexity, parser
// tokens, no field suggestions, no introspection; then the defaults with
// Playground on, where introspection and suggestions work and 1,000 aliases
// or a 20-level introspection query are still refused.
func TestSecurityQueryLimits(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) {
		c.Playground = false
		c.HTTP.MaxDepth = 3
		c.HTTP.MaxAliases = 5
		c.HTTP.MaxComplexity = 25
		c.HTTP.MaxTokens = 400
	})
	e.aTrigger(uid("q"))
	ok := func(what, query string) {
		t.Helper()
		r := e.post(secToken, query, nil)
		assert.Empty(t, r.R.Errors, "%s must pass: %s", what, r.Body)
	}
	refused := func(what, query, code string) secResp {
		t.Helper()
		start := time.Now()
		r := e.post(secToken, query, nil)
		secRefused(t, r, 0, code, what)
		assert.Less(t, time.Since(start), 5*time.Second, "%s: refused slowly", what)
		return r
	}
	// Depth.
	ok("depth 3", `{ workflowRuns { nodes { workflowRunId } } }`)
	refused("depth 4", `{ workflowRuns { nodes { waiters { id } } } }`, "COMPLEXITY_LIMIT_EXCEEDED")
	refused("depth 4 through fragments", `{ ...A } fragment A on Query { workflowRuns { ...B } } fragment B on WorkflowRunConnection { nodes { steps { stepName } } }`, "COMPLEXITY_LIMIT_EXCEEDED")
	refused("depth 4 through inline fragments", `{ ... on Query { workflowRuns { ... on WorkflowRunConnection { nodes { lookbackEvents { id } } } } } }`, "COMPLEXITY_LIMIT_EXCEEDED")
	// Aliases.
	ok("5 aliases", `{ a: __typename b: __typename c: __typename d: __typename e: __typename }`)
	refused("6 aliases", `{ a: __typename b: __typename c: __typename d: __typename e: __typename f: __typename }`, "COMPLEXITY_LIMIT_EXCEEDED")
	refused("aliases multiplied by fragment spreads", `{ ...F ... on Query { ...F } x: workflowRuns { nodes { ...G } } } fragment F on Query { a: __typename b: __typename } fragment G on WorkflowRun { c: state }`, "COMPLEXITY_LIMIT_EXCEEDED")
	refused("aliased mutations", `mutation { a: trigger { created } b: trigger { created } c: trigger { created } d: trigger { created } e: trigger { created } f: trigger { created } }`, "COMPLEXITY_LIMIT_EXCEEDED")
	// Complexity: three aliased listings of 12 fields each.
	listing := `workflowRuns { nodes { workflowRunId state body label result createdAt updatedAt } pageInfo { hasNextPage endCursor } }`
	ok("one listing", `{ `+listing+` }`)
	r := refused("three listings", `{ a: `+listing+` b: `+listing+` c: `+listing+` }`, "COMPLEXITY_LIMIT_EXCEEDED")
	assert.Contains(t, strings.ToLower(r.R.Errors[0].Message), "complexity", "the complexity limit answered: %s", r.Body)
	// Parser tokens.
	refused("401 tokens", `{ `+strings.Repeat("__typename ", 401)+` }`, "GRAPHQL_PARSE_FAILED")
	var obj strings.Builder
	for i := range 120 {
		fmt.Fprintf(&obj, "k%d: %d ", i, i)
	}
	ok("about 370 tokens", `mutation { trigger(body: {`+obj.String()+`}) { created } }`)
	// The same limits hold on a websocket.
	c := e.tokenDial(gqlclient.TransportWS, map[string]any{"authToken": secToken})
	s, err := c.Subscribe(ctxT(t), `subscription { a: waitForEvent(eventId: "x") { `+strings.Repeat("eventId ", 401)+` } }`, nil)
	require.NoError(t, err)
	o := result(t, s, 10*time.Second)
	assert.NotEmpty(t, o.Errors, "401 tokens over a websocket")
	require.Empty(t, e.aWaiters("x"))

	// No field suggestions: the schema does not leak through error messages.
	for _, q := range []string{`{ workflowRun(workflowRunId: "x") { stat } }`, `{ workflowRn(workflowRunId: "x") { state } }`, `{ waiter(eventId: "x") { id } }`, `mutation { notfy(eventId: "x") { eventId } }`} {
		r := e.post(secToken, q, nil)
		require.NotEmpty(t, r.R.Errors, q)
		for _, er := range r.R.Errors {
			assert.NotContains(t, er.Message, "Did you mean", "suggestions are off without Playground: %s", er.Message)
		}
	}
	// No introspection, over POST, GET and websocket; __typename still works.
	for _, q := range []string{`{ __schema { queryType { name } } }`, `{ __type(name: "Mutation") { name } }`, `query { ... on Query { __schema { types { name } } } }`} {
		r := e.post(secToken, q, nil)
		assert.NotEmpty(t, r.R.Errors, "introspection without Playground: %s", q)
		assert.NotContains(t, string(r.R.Data), "Mutation", "introspection data: %s", r.R.Data)
		r = e.get(secToken, q, nil)
		assert.NotEmpty(t, r.R.Errors, "introspection over GET: %s", q)
		s, err := c.Subscribe(ctxT(t), q, nil)
		require.NoError(t, err)
		assert.NotEmpty(t, result(t, s, 10*time.Second).Errors, "introspection over a websocket: %s", q)
	}
	ok("__typename", `{ __typename }`)
	resp, _ := httpGet(t, e.srv.URL+"/")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode, "no Playground page")

	// Defaults with Playground on.
	d := secEnv(t, testdb.SQLite(t))
	var aliases strings.Builder
	aliases.WriteString("{ ")
	for i := range 1000 {
		fmt.Fprintf(&aliases, "a%d: __typename ", i)
	}
	aliases.WriteString("}")
	start := time.Now()
	r = d.post(secToken, aliases.String(), nil)
	secRefused(t, r, 0, "COMPLEXITY_LIMIT_EXCEEDED", "1,000 aliases")
	assert.Less(t, time.Since(start), 5*time.Second, "1,000 aliases refused slowly")
	var mutations strings.Builder
	mutations.WriteString("mutation { ")
	for i := range 1000 {
		fmt.Fprintf(&mutations, "n%d: notify(eventId: \"many\") { eventId } ", i)
	}
	mutations.WriteString("}")
	r = d.post(secToken, mutations.String(), nil)
	assert.NotEmpty(t, r.R.Errors, "1,000 aliased notifies")
	deep := "{ __schema { types { fields { type { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { name } } } } } } } } } } } } } } } } } } }"
	r = d.post(secToken, deep, nil)
	secRefused(t, r, 0, "COMPLEXITY_LIMIT_EXCEEDED", "a 20-level introspection query")
	r = d.post(secToken, `{ __schema { queryType { name } } }`, nil)
	assert.Empty(t, r.R.Errors, "introspection with Playground: %s", r.Body)
	r = d.post(secToken, `{ workflowRun(workflowRunId: "x") { stat } }`, nil)
	if assert.NotEmpty(t, r.R.Errors) {
		assert.Contains(t, r.R.Errors[0].Message, "Did you mean", "suggestions with Playground (the switch is real)")
	}
	r = d.post(secToken, `{ `+strings.Repeat("__typename ", 5001)+` }`, nil)
	secRefused(t, r, 0, "GRAPHQL_PARSE_FAILED", "5,001 tokens")
}

// A document whose fragments each spread the one before twice is tiny (a
// few hundred tokens, no alias, depth 1) but names 2^n fields: every limit
// must be computed without walking them all.
func TestSecurityQueryFragmentExplosion(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t))
	const n = 24
	var b strings.Builder
	fmt.Fprintf(&b, "query { ...F%d }\nfragment F0 on Query { __typename }\n", n)
	for i := 1; i <= n; i++ {
		fmt.Fprintf(&b, "fragment F%d on Query { ...F%d ...F%d }\n", i, i-1, i-1)
	}
	body := secBody(t, b.String(), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.endpoint, bytes.NewReader(body))
	require.NoError(t, err)
	req.Header = secJSONHeader(secToken)
	start := time.Now()
	resp, err := http.DefaultClient.Do(req)
	if err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Logf("answered %d in %s: %s", resp.StatusCode, time.Since(start), b)
	}
	assert.NoError(t, err,
		"a %d-byte query of %d nested fragment spreads was not answered within 2 s (a legitimate query takes milliseconds): graph/security.go measure() re-walks every fragment spread (no memo), and so does gqlgen's complexity.Calculate run by extension.FixedComplexityLimit; each costs 2^n (n=30 takes minutes). The handler keeps burning CPU after the client left (the cleanup waits for it)", len(body), n)
}

// A connection holds at most MaxSubscriptionsPerConnection operations at
// once: the next is refused with TOO_MANY_SUBSCRIPTIONS and registers
// nothing; ending one (client stop or server completion) frees its slot;
// each connection has its own count.
func TestSecuritySubscriptionCap(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.MaxSubscriptionsPerConnection = 3 })
	for _, proto := range secProtocols {
		c := e.aDial(proto)
		ev := uid("cap")
		var subs []*gqlclient.Sub
		for range 3 {
			subs = append(subs, e.subscribe(c, ev, waitOpts{}))
		}
		e.aAwaitWaiting(ev, 3)
		for range 2 {
			o := result(t, e.subscribe(c, ev, waitOpts{}), 10*time.Second)
			assert.Equal(t, "TOO_MANY_SUBSCRIPTIONS", o.code(), "%s: over the cap: %+v", proto, o.Errors)
			secCheckErrors(t, proto+" over the cap", o.Errors)
		}
		// Durable steps and mutations count the same.
		run := e.aTrigger(uid("cap-run"))
		o := result(t, e.subscribe(c, ev, waitOpts{run: run.ID, step: "s"}), 10*time.Second)
		assert.Equal(t, "TOO_MANY_SUBSCRIPTIONS", o.code(), "%s: a durable step over the cap", proto)
		require.Len(t, e.aWaiters(ev), 3, "%s: nothing registered over the cap", proto)

		// A client stop frees a slot.
		require.NoError(t, subs[0].Stop(ctxT(t)))
		e.aAwaitWaiting(ev, 2)
		subs[0] = e.subscribe(c, ev, waitOpts{})
		e.aAwaitWaiting(ev, 3)
		// Completion by the server frees the slots.
		require.Len(t, e.aNotify(ev, "all", "").NotifyResponse, 3)
		for _, s := range subs {
			mustResult(t, s)
		}
		ev2 := uid("cap2")
		for range 3 {
			e.subscribe(c, ev2, waitOpts{})
		}
		e.aAwaitWaiting(ev2, 3)
		// Another connection has a count of its own.
		c2 := e.aDial(proto)
		for range 3 {
			e.subscribe(c2, ev2, waitOpts{})
		}
		e.aAwaitWaiting(ev2, 6)
		c.Close()
		c2.Close()
		e.aAwaitWaiting(ev2, 0)
	}
}

// Reusing an id right after completing it (graphql-transport-ws "complete"
// then "subscribe", or graphql-ws "stop" then "start") must not let more
// than MaxSubscriptionsPerConnection operations run at once.
func TestSecuritySubscriptionCapIDReuse(t *testing.T) {
	const max = 2
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.MaxSubscriptionsPerConnection = max })
	for _, proto := range secProtocols {
		c := mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+secToken))
		c.init(nil)
		ev := uid("reuse")
		vars := waitVars(ev, waitOpts{})
		// Fill the cap with x and y, then stop each and start it again in
		// one burst. The stopped operation sends nothing more (the protocol
		// says so), and the new one under the same id runs and can be
		// stopped and notified like any other.
		c.subscribe("x", waitSubscription, vars)
		c.subscribe("y", waitSubscription, vars)
		e.aAwaitWaiting(ev, max)
		for _, id := range []string{"x", "y"} {
			c.stop(id)
			c.subscribe(id, waitSubscription, vars)
			e.aAwaitWaiting(ev, max)
		}
		// Fill up: subscribe until the server refuses one.
		accepted := 0
		for i := range 10 {
			id := fmt.Sprintf("fill-%d", i)
			before := len(e.aWaiters(ev))
			c.subscribe(id, waitSubscription, vars)
			refused := false
			eventually(t, 10*time.Second, func() bool {
				select {
				case m, ok := <-c.in:
					if ok && m.ID == id && m.Type == "error" {
						refused = true
						return true
					}
				default:
				}
				return len(e.aWaiters(ev)) > before
			}, "%s: %s neither refused nor registered", proto, id)
			if refused {
				break
			}
			accepted++
		}
		running := len(e.aWaiters(ev))
		assert.LessOrEqual(t, running, max,
			"%s: %d operations run on a connection capped at %d (after a stop+resubscribe of ids x and y, %d more were accepted): graph/wsguard.go frees the id's slot on the client's complete/stop, then the stopped operation's own server 'complete' (guardedConn.WriteJSON) deletes the slot of the new operation with the same id; gqlgen's defer likewise deletes the new cancel func from its active map, so the client cannot stop it either",
			proto, running, max, accepted)
		c.ws.CloseNow()
		eventually(t, 10*time.Second, func() bool { return len(e.aWaiters(ev)) == 0 }, "%s: waiters end with the connection", proto)
	}
}

// A subscribe with an id that is already running closes the connection with
// 4409 (graphql-transport-ws); the legacy protocol is held to the same. An
// id whose operation has ended may be used again.
func TestSecurityDuplicateSubscriptionID(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t))
	for _, proto := range secProtocols {
		c := mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+secToken))
		c.init(nil)
		ev1, ev2 := uid("dup1"), uid("dup2")
		c.subscribe("dup", waitSubscription, waitVars(ev1, waitOpts{}))
		e.aAwaitWaiting(ev1, 1)
		c.subscribe("dup", waitSubscription, waitVars(ev2, waitOpts{}))
		code, reason, _ := c.closed(10*time.Second, proto+" duplicate id")
		assert.Equal(t, websocket.StatusCode(4409), code, "%s: duplicate id (reason %q)", proto, reason)
		eventually(t, 10*time.Second, func() bool { return len(e.aWaiters(ev1)) == 0 }, "%s: the connection's waiter ends with it", proto)
		require.Empty(t, e.aWaiters(ev2), "%s: the duplicate never ran", proto)

		// Reuse after the operation ended is fine.
		c = mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+secToken))
		c.init(nil)
		ev3 := uid("dup3")
		c.subscribe("again", waitSubscription, waitVars(ev3, waitOpts{}))
		e.aAwaitWaiting(ev3, 1)
		e.aNotify(ev3, 1, "")
		c.await(10*time.Second, proto+" first again", func(m secMsg) bool { return m.ID == "again" && m.Type == "complete" })
		c.subscribe("again", waitSubscription, waitVars(ev3, waitOpts{}))
		e.aAwaitWaiting(ev3, 1)
		e.aNotify(ev3, 2, "")
		c.await(10*time.Second, proto+" second again", func(m secMsg) bool { return m.ID == "again" && (m.Type == "next" || m.Type == "data") })
	}
}

// Origins: websocket upgrades from other origins are refused unless allowed;
// CORS preflights and headers go to allowed origins only; a cross-origin
// POST from an origin not allowed does nothing.
func TestSecurityOrigins(t *testing.T) {
	const allowed = "https://app.example.com"
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.AllowedOrigins = []string{allowed, "https://other.example.com/"} })
	refused := []string{
		"https://evil.example",
		"null",
		"https://app.example.com.evil.example",
		"https://evil.example/https://app.example.com",
		"http://app.example.com",
		"https://app.example.com:8443",
		"https://sub.app.example.com",
		"file://",
	}
	for _, proto := range secProtocols {
		for _, origin := range refused {
			_, resp, err := secDial(t, e.endpoint, proto, secHeader("Origin", origin, "Authorization", "Bearer "+secToken))
			if assert.Error(t, err, "%s: websocket from %q must be refused", proto, origin) && assert.NotNil(t, resp, origin) {
				assert.Equal(t, http.StatusForbidden, resp.StatusCode, "%s: websocket from %q", proto, origin)
			}
		}
		for _, origin := range []string{allowed, "HTTPS://APP.EXAMPLE.COM", "https://other.example.com", e.srv.URL, ""} {
			h := secHeader("Authorization", "Bearer "+secToken)
			if origin != "" {
				h.Set("Origin", origin)
			}
			c, _, err := secDial(t, e.endpoint, proto, h)
			if assert.NoError(t, err, "%s: websocket from %q", proto, origin) {
				c.init(nil)
			}
		}
	}

	// Preflight for an allowed origin: no token needed, the headers a browser wants.
	pre := func(origin string) secResp {
		return secHTTP(t, http.MethodOptions, e.endpoint, secHeader("Origin", origin, "Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "authorization, content-type"), nil)
	}
	r := pre(allowed)
	assert.Contains(t, []int{http.StatusOK, http.StatusNoContent}, r.Status, "preflight: %s", r.Body)
	assert.Equal(t, allowed, r.Header.Get("Access-Control-Allow-Origin"))
	assert.Contains(t, r.Header.Get("Access-Control-Allow-Methods"), "POST")
	assert.Contains(t, strings.ToLower(r.Header.Get("Access-Control-Allow-Headers")), "authorization")
	assert.Contains(t, strings.ToLower(r.Header.Get("Access-Control-Allow-Headers")), "content-type")
	assert.Contains(t, r.Header.Values("Vary"), "Origin")
	for _, origin := range refused {
		r := pre(origin)
		assert.Equal(t, http.StatusForbidden, r.Status, "preflight from %q", origin)
		assert.Empty(t, r.Header.Get("Access-Control-Allow-Origin"), "preflight from %q", origin)
		assert.Empty(t, r.Header.Get("Access-Control-Allow-Methods"), "preflight from %q", origin)
	}

	// Actual requests.
	h := secJSONHeader(secToken)
	h.Set("Origin", allowed)
	r = secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(secBody(t, `{ __typename }`, nil)))
	assert.Equal(t, http.StatusOK, r.Status, r.Body)
	assert.Equal(t, allowed, r.Header.Get("Access-Control-Allow-Origin"))
	assert.Contains(t, r.Header.Get("Access-Control-Expose-Headers"), "Retry-After")
	assert.Empty(t, r.Header.Get("Access-Control-Allow-Credentials"), "no credentials mode: tokens travel in headers")
	r = secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(secToken), bytes.NewReader(secBody(t, `{ __typename }`, nil)))
	assert.Empty(t, r.Header.Get("Access-Control-Allow-Origin"), "no CORS header without an Origin")
	for _, origin := range refused {
		id := uid("cors")
		h := secJSONHeader(secToken)
		h.Set("Origin", origin)
		r := secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(secBody(t, secTriggerQuery, map[string]any{"id": id})))
		secRefused(t, r, http.StatusForbidden, "FORBIDDEN", "a POST from "+origin)
		assert.Empty(t, r.Header.Get("Access-Control-Allow-Origin"), "POST from %q", origin)
		assert.Nil(t, e.aRun("wfr_"+id), "a POST from %q did nothing", origin)
	}

	// With no allowed origins configured, only same-origin and Origin-less
	// clients pass.
	d := secEnv(t, testdb.SQLite(t))
	_, resp, err := secDial(t, d.endpoint, gqlclient.TransportWS, secHeader("Origin", allowed, "Authorization", "Bearer "+secToken))
	if assert.Error(t, err) && assert.NotNil(t, resp) {
		assert.Equal(t, http.StatusForbidden, resp.StatusCode)
	}
	r = secHTTP(t, http.MethodOptions, d.endpoint, secHeader("Origin", allowed, "Access-Control-Request-Method", "POST"), nil)
	assert.Empty(t, r.Header.Get("Access-Control-Allow-Origin"))
	c, _, err := secDial(t, d.endpoint, gqlclient.TransportWS, secHeader("Origin", d.srv.URL, "Authorization", "Bearer "+secToken))
	require.NoError(t, err)
	c.init(nil)
}

// connection_init must come first and within InitTimeout; after the ack the
// connection stays up past that timeout.
func TestSecurityWebsocketInit(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) {
		c.HTTP.InitTimeout = time.Second
		c.HTTP.KeepAlive = 250 * time.Millisecond
	})
	for _, proto := range secProtocols {
		// Silence after the upgrade: closed once the timeout passes.
		c := mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+secToken))
		start := time.Now()
		code, reason, msgs := c.closed(10*time.Second, proto+" no connection_init")
		took := time.Since(start)
		assert.GreaterOrEqual(t, took, 900*time.Millisecond, "%s: closed before the init timeout", proto)
		assert.Less(t, took, 5*time.Second, "%s: closed long after the init timeout", proto)
		t.Logf("%s: no init: closed with %d %q after %s, messages %+v", proto, code, reason, took, msgs)

		// A subscribe instead of connection_init: closed, nothing runs.
		ev := uid("noinit")
		c = mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+secToken))
		c.subscribe("1", waitSubscription, waitVars(ev, waitOpts{}))
		_, _, msgs = c.closed(10*time.Second, proto+" subscribe before init")
		for _, m := range msgs {
			assert.NotContains(t, []string{"next", "data", "connection_ack"}, m.Type, "%s: %+v", proto, m)
		}
		require.Empty(t, e.aWaiters(ev))

		// A second connection_init after the ack: closed.
		c = mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+secToken))
		c.init(nil)
		c.send(map[string]any{"type": "connection_init"})
		c.closed(10*time.Second, proto+" second connection_init")

		// Initialised: still up after several init timeouts' worth of keep-alives.
		c = mustDial(t, e.endpoint, proto, secHeader("Authorization", "Bearer "+secToken))
		c.init(nil)
		beat := "ka"
		if proto == gqlclient.TransportWS {
			beat = "ping"
		}
		for i := range 8 { // 8 × 250 ms = 2 s > InitTimeout
			c.await(5*time.Second, fmt.Sprintf("%s keep-alive %d", proto, i), func(m secMsg) bool { return m.Type == beat })
		}
		ev = uid("init-ok")
		c.subscribe("1", waitSubscription, waitVars(ev, waitOpts{}))
		e.aAwaitWaiting(ev, 1)
		e.aNotify(ev, "late", "")
		c.await(10*time.Second, proto+" result", func(m secMsg) bool { return m.ID == "1" && (m.Type == "next" || m.Type == "data") })
	}
}

// connection_init whose payload is not an object must be answered (an
// error, a close), not leave the client hanging on an open socket.
func TestSecurityWebsocketInitPayloadNotObject(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.InitTimeout = time.Second })
	type attempt struct {
		what string
		c    *secConn
	}
	var attempts []attempt
	for _, proto := range secProtocols {
		for _, payload := range []string{`"x"`, `[1,2]`, `42`, `"Bearer ` + secToken + `"`} {
			c := mustDial(t, e.endpoint, proto, nil)
			c.send([]byte(`{"type":"connection_init","payload":` + payload + `}`))
			attempts = append(attempts, attempt{proto + " payload " + payload, c})
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, a := range attempts {
		answered := false
		timer := time.NewTimer(max(time.Until(deadline), 0))
	wait:
		for {
			select {
			case m, ok := <-a.c.in:
				if !ok || m.Type == "connection_error" || m.Type == "error" {
					answered = true
					break wait
				}
				assert.NotEqual(t, "connection_ack", m.Type, "%s acknowledged", a.what)
			case <-timer.C:
				break wait
			}
		}
		timer.Stop()
		assert.True(t, answered,
			"%s: connection_init got no answer and no close within 5 s (InitTimeout 1 s): gqlgen's wsConnection.init returns false on a payload that does not unmarshal into InitPayload without closing the socket (graph/wsguard.go passes the message through), so the hijacked connection stays open until a GC finalizer closes it", a.what)
	}
}

// Keep-alive: the server pings graphql-transport-ws clients and drops those
// that do not answer; graphql-ws clients get "ka" messages.
func TestSecurityKeepAlive(t *testing.T) {
	const every = 200 * time.Millisecond
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.KeepAlive = every })

	c := mustDial(t, e.endpoint, gqlclient.TransportWS, secHeader("Authorization", "Bearer "+secToken))
	c.init(nil)
	for i := range 5 {
		c.await(5*time.Second, fmt.Sprintf("ping %d", i), func(m secMsg) bool { return m.Type == "ping" })
	}
	// A client that answers stays connected and served.
	ev := uid("ka")
	c.subscribe("1", waitSubscription, waitVars(ev, waitOpts{}))
	e.aAwaitWaiting(ev, 1)
	e.aNotify(ev, "alive", "")
	c.await(10*time.Second, "result after pings", func(m secMsg) bool { return m.ID == "1" && m.Type == "next" })

	// A client that never answers is dropped, and its waiter with it.
	dead := mustDial(t, e.endpoint, gqlclient.TransportWS, secHeader("Authorization", "Bearer "+secToken))
	dead.noPong.Store(true)
	dead.init(nil)
	evDead := uid("ka-dead")
	dead.subscribe("1", waitSubscription, waitVars(evDead, waitOpts{}))
	e.aAwaitWaiting(evDead, 1)
	start := time.Now()
	_, _, msgs := dead.closed(10*time.Second, "a client that does not pong")
	assert.Less(t, time.Since(start), 5*time.Second)
	pings := 0
	for _, m := range msgs {
		if m.Type == "ping" {
			pings++
		}
	}
	assert.Positive(t, pings, "pinged before being dropped")
	eventually(t, 10*time.Second, func() bool { return len(e.aWaiters(evDead)) == 0 }, "the dead client's waiter ends")

	// Legacy protocol: periodic "ka".
	l := mustDial(t, e.endpoint, gqlclient.LegacyWS, secHeader("Authorization", "Bearer "+secToken))
	l.init(nil)
	for i := range 5 {
		l.await(5*time.Second, fmt.Sprintf("ka %d", i), func(m secMsg) bool { return m.Type == "ka" })
	}
}

// Mutations are rate-limited per token: past the burst, 429 with
// RATE_LIMITED and Retry-After, and the mutation does nothing; another token
// and queries are unaffected; the bucket refills with time.
func TestSecurityRateLimit(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) {
		c.HTTP.ServerRateLimit = 0.5 // one every 2 s
		c.HTTP.ServerRateBurst = 3
	})
	trigger := func(token string) (string, secResp) {
		id := uid("rl")
		return id, e.post(token, secTriggerQuery, map[string]any{"id": id})
	}
	for i := range 3 {
		_, r := trigger(secToken)
		require.Empty(t, r.R.Errors, "mutation %d within the burst: %s", i, r.Body)
	}
	for i := range 3 {
		id, r := trigger(secToken)
		secRefused(t, r, http.StatusTooManyRequests, "RATE_LIMITED", fmt.Sprintf("mutation %d past the burst", i))
		ra, err := strconv.Atoi(r.Header.Get("Retry-After"))
		if assert.NoError(t, err, "Retry-After %q", r.Header.Get("Retry-After")) {
			assert.True(t, ra >= 1 && ra <= 3, "Retry-After %d s at 0.5/s", ra)
		}
		if len(r.R.Errors) > 0 {
			assert.EqualValues(t, ra, r.R.Errors[0].Extensions["retryAfter"], "extensions.retryAfter")
		}
		require.Nil(t, e.aRun("wfr_"+id), "a rate-limited trigger created nothing")
	}
	// Every mutation counts, whatever it is; over a websocket too.
	ev := uid("rl-ev")
	r := e.post(secToken, notifyMutation, map[string]any{"ev": ev, "data": 1})
	secRefused(t, r, http.StatusTooManyRequests, "RATE_LIMITED", "a rate-limited notify")
	c := e.tokenDial(gqlclient.TransportWS, map[string]any{"authToken": secToken})
	s, err := c.Subscribe(ctxT(t), secTriggerQuery, map[string]any{"id": uid("rl-ws")})
	require.NoError(t, err)
	assert.Equal(t, "RATE_LIMITED", result(t, s, 10*time.Second).code(), "a mutation over a websocket")
	o := awaitSSE(t, secSSEAsync(t, e.endpoint, secHeader("Authorization", "Bearer "+secToken), secTriggerQuery, map[string]any{"id": uid("rl-sse")}, 10*time.Second), 15*time.Second)
	require.NoError(t, o.err)
	if assert.NotEmpty(t, o.resps) {
		assert.Equal(t, "RATE_LIMITED", o.resps[0].FirstCode(), "a mutation over SSE")
	}
	// Queries and subscriptions are not mutations.
	for range 10 {
		e.postOK(secToken, waitersQuery, map[string]any{"ev": ev}, nil)
	}
	// Another token has its own bucket.
	for i := range 3 {
		_, r := trigger(secOtherToken)
		require.Empty(t, r.R.Errors, "another token, mutation %d: %s", i, r.Body)
	}
	// Time refills the bucket (the limiter runs on the service clock).
	e.clock.Advance(10 * time.Second)
	_, r = trigger(secToken)
	require.Empty(t, r.R.Errors, "after the refill: %s", r.Body)

	// An open server limits anonymous callers by address.
	o2 := newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.HTTP.RateLimit = 0.5; c.HTTP.RateBurst = 2 })
	for range 2 {
		o2.ok(triggerMutation, map[string]any{"id": uid("anon")}, nil)
	}
	r = o2.post("", triggerMutation, map[string]any{"id": uid("anon")})
	secRefused(t, r, http.StatusTooManyRequests, "RATE_LIMITED", "an anonymous caller past the burst")
}

// The limit counts mutations, not requests: aliasing the same mutation field
// many times in one operation must not multiply what the burst allows.
func TestSecurityRateLimitAliasedMutations(t *testing.T) {
	const burst = 3
	e := secEnv(t, testdb.SQLite(t), func(c *service.Config) {
		c.HTTP.ServerRateLimit = 0.5
		c.HTTP.ServerRateBurst = burst
	})
	label := uid("alias-rl")
	var q strings.Builder
	q.WriteString("mutation($l: String) { ")
	for i := range 40 {
		fmt.Fprintf(&q, "t%d: trigger(label: $l) { created } ", i)
	}
	q.WriteString("}")
	r := e.post(secToken, q.String(), map[string]any{"l": label})
	t.Logf("one request with 40 aliased triggers: %d, %d errors", r.Status, len(r.R.Errors))
	var out struct {
		WorkflowRuns struct {
			Nodes []runView `json:"nodes"`
		} `json:"workflowRuns"`
	}
	e.postOK(secAdminToken, `query($l: String) { workflowRuns(label: $l, first: 100) { nodes { workflowRunId } } }`, map[string]any{"l": label}, &out)
	assert.LessOrEqual(t, len(out.WorkflowRuns.Nodes), burst,
		"%d runs created by one request of one token, with a burst of %d mutations: graph/ratelimit.go limitMutations takes one token per operation, however many mutation fields it aliases (up to MaxAliases, 50 by default)", len(out.WorkflowRuns.Nodes), burst)
}

// Only application/json POSTs (and GET queries) are served: form-encoded,
// multipart and other bodies a browser can send cross-site without a
// preflight are refused and do nothing, even with a valid token. An Upgrade
// header does not smuggle a POST past authentication.
func TestSecurityRequestEncodings(t *testing.T) {
	e := secEnv(t, testdb.SQLite(t))
	id := uid("enc")
	query := `mutation { trigger(workflowRunId: "` + id + `") { workflowRunId } }`
	jsonBody := secBody(t, query, nil)

	var mp bytes.Buffer
	w := multipart.NewWriter(&mp)
	w.WriteField("operations", string(jsonBody))
	w.WriteField("map", `{}`)
	w.Close()
	var mpFile bytes.Buffer
	w2 := multipart.NewWriter(&mpFile)
	w2.WriteField("operations", `{"query":"mutation($f: JSON) { trigger(workflowRunId: \"`+id+`\", body: $f) { workflowRunId } }","variables":{"f":null}}`)
	w2.WriteField("map", `{"0":["variables.f"]}`)
	fw, _ := w2.CreateFormFile("0", "a.txt")
	fw.Write([]byte("file"))
	w2.Close()

	for _, tc := range []struct {
		what, contentType string
		body              []byte
	}{
		{"form-encoded", "application/x-www-form-urlencoded", []byte(url.Values{"query": {query}}.Encode())},
		{"form-encoded with a charset", "application/x-www-form-urlencoded; charset=UTF-8", []byte(url.Values{"query": {query}}.Encode())},
		{"multipart", w.FormDataContentType(), mp.Bytes()},
		{"multipart upload", w2.FormDataContentType(), mpFile.Bytes()},
		{"text/plain with a JSON body", "text/plain;charset=UTF-8", jsonBody},
		{"application/graphql", "application/graphql", []byte(query)},
		{"no content type", "", jsonBody},
		{"a JSON look-alike type", "application/jsonp", jsonBody},
		{"a malformed content type", "application/json;;;", jsonBody},
	} {
		h := secHeader("Authorization", "Bearer "+secToken)
		if tc.contentType != "" {
			h.Set("Content-Type", tc.contentType)
		}
		r := secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(tc.body))
		assert.True(t, r.Status == http.StatusUnsupportedMediaType || r.Status == http.StatusBadRequest, "%s: status %d %s", tc.what, r.Status, r.Body)
		assert.NotEmpty(t, r.R.Errors, "%s: %s", tc.what, r.Body)
		// With Accept: text/event-stream too.
		h.Set("Accept", "text/event-stream")
		r = secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(tc.body))
		assert.GreaterOrEqual(t, r.Status, 400, "%s as SSE: %s", tc.what, r.Body)
	}
	// An Upgrade header without a token and without a real handshake: the
	// authentication skip for upgrades must not run the POST.
	for _, up := range []string{"websocket", "h2c", "anything"} {
		h := secHeader("Content-Type", "application/json", "Upgrade", up, "Connection", "Upgrade")
		r := secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(jsonBody))
		assert.GreaterOrEqual(t, r.Status, 400, "POST with Upgrade: %s and no token: %s", up, r.Body)
		r = secHTTP(t, http.MethodGet, e.endpoint+"?query="+url.QueryEscape(`{ waiters(eventId: "x") { id } }`), secHeader("Upgrade", up), nil)
		assert.GreaterOrEqual(t, r.Status, 400, "GET with Upgrade: %s and no token: %s", up, r.Body)
		assert.NotContains(t, r.Body, `"waiters"`, "GET with Upgrade: %s ran the query", up)
	}
	// A mutation over GET, with a token: refused (CSRF through links and images).
	r := e.get(secToken, query, nil)
	assert.GreaterOrEqual(t, r.Status, 400, r.Body)
	require.Nil(t, e.aRun("wfr_"+id), "none of these created the run")
	e.postOK(secToken, query, nil, nil) // the same mutation as JSON works
	require.NotNil(t, e.aRun("wfr_"+id))
}

// Malformed and hostile input with a valid token: broken JSON, invalid UTF-8
// in ids and data, deep nesting, lone surrogates; SQL metacharacters and
// wildcards in ids under a run token's boundary. Never a 5xx, never an
// internal error, and ids stay literal.
func TestSecurityMalformedInput(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := secEnv(t, db)
		t.Cleanup(func() {
			assert.NotContains(t, e.logs.String(), "internal error", "an input was treated as an internal error")
		})
		run := e.aTrigger(uid("mal"))
		raw := func(body string) secResp {
			return secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(secToken), strings.NewReader(body))
		}
		// Broken JSON: a 4xx with a code.
		deepVars := strings.Repeat(`{"a":`, 20000) + `1` + strings.Repeat(`}`, 20000)
		for _, body := range []string{
			`{"query": "mutation { trigger { created } }"`,
			`{"query": "mutation { trigger { created } }"}}`,
			"{\"query\": \"{ __typename }\", \"variables\": {\"a\": \x00}}",
			`{"query": "{ __typename }", "variables": {"a": NaN}}`,
			`{"query": "{ __typename }", "variables": {"a": 1e99999}}`,
			strings.Repeat("[", 100000),
			`{"query": "query($a: String) { __typename }", "variables": {"a": ` + deepVars + `}}`,
			`{"query": "\ud800"}`,
			`{"query": "{ __typename }", "query": "mutation { trigger { created } }"}`,
			"\xef\xbb\xbf{\"query\": \"{ __typename }\"}",
			`{"query": "{ __typename }", "extensions": {"persistedQuery": {"version": 1, "sha256Hash": "` + strings.Repeat("0", 64) + `"}}}`,
		} {
			r := raw(body)
			assert.GreaterOrEqual(t, r.Status, 200, "%.60q", body)
			assert.Less(t, r.Status, 500, "%.60q: %s", body, r.Body)
			for _, er := range r.R.Errors {
				assert.NotEqual(t, "INTERNAL_SERVER_ERROR", er.Code(), "%.60q: %s", body, r.Body)
			}
		}
		// The duplicate "query" key: the last one wins in Go; whatever it
		// does, it is authorized as what runs (a run token cannot use it to
		// slip a mutation past the check).
		r := secHTTP(t, http.MethodPost, e.endpoint, secJSONHeader(run.Token),
			strings.NewReader(`{"query": "query { workflowRun(workflowRunId: \"`+run.ID+`\") { state } }", "query": "mutation { cancel(workflowRunId: \"`+run.ID+`\") { state } }"}`))
		assert.NotEmpty(t, r.R.Errors, "duplicate query keys with a run token: %s", r.Body)
		require.Equal(t, "RUN_STARTED", e.aRun(run.ID).State)

		// Invalid UTF-8 bytes in ids, raw in the JSON text: refused, or
		// taken consistently (Go's decoder makes each bad byte U+FFFD);
		// never stored as invalid UTF-8, never an internal error.
		badEv := "ev-\xff\xfe-" + uid("u")
		r = raw(`{"query": ` + strconv.Quote(notifyMutation) + `, "variables": {"ev": "` + badEv + `", "data": "x", "run": "` + run.ID + `"}}`)
		assert.Less(t, r.Status, 500, r.Body)
		secCheckErrors(t, "invalid UTF-8 event id", r.R.Errors)
		t.Logf("invalid UTF-8 event id: %d %s", r.Status, r.Body)
		if len(r.R.Errors) == 0 {
			var out struct {
				Notify notifyView `json:"notify"`
			}
			require.NoError(t, r.R.Decode(&out))
			require.NotNil(t, out.Notify.Lookback)
			stored := out.Notify.Lookback.EventID
			assert.Equal(t, strings.ToValidUTF8(badEv, "\uFFFD"), strings.ReplaceAll(stored, "\uFFFD\uFFFD", "\uFFFD"), "the stored id is the input with replacement characters")
			// The same raw bytes over a websocket find the same event.
			c := mustDial(t, e.endpoint, gqlclient.TransportWS, secHeader("Authorization", "Bearer "+secToken))
			c.init(nil)
			q, _ := json.Marshal(waitSubscription)
			c.send([]byte(`{"id":"1","type":"subscribe","payload":{"query":` + string(q) + `,"variables":{"ev":"` + badEv + `","run":"` + run.ID + `"}}}`))
			m := c.await(10*time.Second, "wait with invalid UTF-8 bytes", func(m secMsg) bool { return m.ID == "1" && m.Type != "complete" })
			assert.Contains(t, string(m.Payload), `"x"`, "the same bytes name the same event: %s", m.Payload)
		}
		for _, tc := range []struct{ what, query, vars string }{
			{"run id", secTriggerQuery, `{"id": "r-\xff-` + uid("r") + `"}`},
			{"label", secTriggerQuery, `{"label": "l-\xc3\x28"}`},
			{"step name", notifyMutation, `{"ev": "e", "step": {"workflowRunId": "` + run.ID + `", "stepName": "s-\xed\xa0\x80"}}`},
			{"eventData", notifyMutation, `{"ev": "e", "data": "d-\xff", "run": "` + run.ID + `"}`},
			{"eventData object key", notifyMutation, `{"ev": "e", "data": {"k\xfe": 1}, "run": "` + run.ID + `"}`},
		} {
			r := raw(`{"query": ` + strconv.Quote(tc.query) + `, "variables": ` + tc.vars + `}`)
			assert.Less(t, r.Status, 500, "invalid UTF-8 in %s: %s", tc.what, r.Body)
			for _, er := range r.R.Errors {
				assert.NotEqual(t, "INTERNAL_SERVER_ERROR", er.Code(), "invalid UTF-8 in %s: %s", tc.what, r.Body)
			}
			assert.True(t, strings.ToValidUTF8(r.Body, "") == r.Body, "invalid UTF-8 in %s came back in the response: %q", tc.what, r.Body)
		}
		// Over GET, percent-encoded.
		r = secHTTP(t, http.MethodGet, e.endpoint+"?query="+url.QueryEscape(waitersQuery)+"&variables="+url.QueryEscape("{\"ev\":\"a\xffb\"}"), secHeader("Authorization", "Bearer "+secToken), nil)
		assert.Less(t, r.Status, 500, r.Body)
		secCheckErrors(t, "GET with invalid UTF-8", r.R.Errors)
		r = secHTTP(t, http.MethodGet, e.endpoint+"?query=%ff%fe", secHeader("Authorization", "Bearer "+secToken), nil)
		assert.Less(t, r.Status, 500, r.Body)
		assert.NotEmpty(t, r.R.Errors)

		// JSON edge cases in eventData round-trip byte for byte.
		for _, data := range []string{`"\ud800"`, `"\u0000"`, `{"a":{"a":{"a":1}}}`, strings.Repeat("[", 2000) + strings.Repeat("]", 2000), `-0`, `1e308`, `123456789012345678901234567890`} {
			ev := uid("edge")
			r := raw(`{"query": ` + strconv.Quote(notifyMutation) + `, "variables": {"ev": "` + ev + `", "data": ` + data + `, "run": "` + run.ID + `"}}`)
			if !assert.Empty(t, r.R.Errors, "eventData %.40s: %s", data, r.Body) {
				continue
			}
			c := e.aDial(gqlclient.TransportWS)
			got := mustResult(t, e.subscribe(c, ev, waitOpts{run: run.ID}))
			assert.Equal(t, data, string(got.EventData), "eventData %.40s round-trips", data)
		}

		// SQL wildcards and quotes in run ids do not widen a run token.
		base := uid("m")
		pct := e.aTrigger(base + "%")
		under := e.aTrigger(base + "_")
		abc := e.aTrigger(base + "abc")
		quote := e.aTrigger(base + "' OR '1'='1")
		for _, tc := range []struct {
			holder secRun
			others []secRun
		}{{pct, []secRun{under, abc, quote}}, {under, []secRun{pct, abc}}, {quote, []secRun{pct, abc, under}}} {
			var out struct {
				WorkflowRun *runView `json:"workflowRun"`
			}
			e.postOK(tc.holder.Token, runQuery, map[string]any{"id": tc.holder.ID}, &out)
			require.Equal(t, tc.holder.ID, out.WorkflowRun.WorkflowRunID)
			for _, o := range tc.others {
				secRefused(t, e.post(tc.holder.Token, runQuery, map[string]any{"id": o.ID}), 0, "FORBIDDEN", fmt.Sprintf("token of %q reading %q", tc.holder.ID, o.ID))
			}
		}
		// Wildcard event ids reach only themselves.
		admin := e.aDial(gqlclient.TransportWS)
		target := base + "-target"
		s := e.subscribe(admin, target, waitOpts{})
		e.aAwaitWaiting(target, 1)
		for _, ev := range []string{"%", "_", base + "%", base + "-targe_", base + "-target%", "' OR '1'='1", strings.ToUpper(target), target + " "} {
			n := e.aNotify(ev, "wild", "")
			assert.Empty(t, n.NotifyResponse, "a broadcast on %q reached another event id", ev)
			assert.Empty(t, e.aWaiters(ev), "waiters(%q)", ev)
		}
		quiet(t, s)
		require.Len(t, e.aNotify(target, "exact", "").NotifyResponse, 1)
		require.Equal(t, `"exact"`, string(mustResult(t, s).EventData))
	})
}

// secSabotage renames the service's tables behind its back, so that every
// statement fails with a real driver error naming SQL and tables.
func secSabotage(t *testing.T, dbURL string) {
	t.Helper()
	var dialector gorm.Dialector
	switch testdb.Dialect(dbURL) {
	case "sqlite":
		dialector = sqlite.Open(strings.TrimPrefix(dbURL, "sqlite://") + "?_pragma=busy_timeout(10000)")
	default:
		u, err := url.Parse(dbURL)
		require.NoError(t, err)
		pass, _ := u.User.Password()
		dialector = gormmysql.Open(fmt.Sprintf("%s:%s@tcp(%s)%s", u.User.Username(), pass, u.Host, u.Path))
	}
	db, err := gorm.Open(dialector, &gorm.Config{Logger: gormlogger.Discard})
	require.NoError(t, err)
	sqlDB, err := db.DB()
	require.NoError(t, err)
	defer sqlDB.Close()
	for _, table := range []string{"runs", "waiters", "lookback_events", "steps", "notifications"} {
		require.NoError(t, db.Exec("ALTER TABLE "+table+" RENAME TO "+table+"_gone").Error)
	}
}

// Errors never carry SQL, stack traces or paths. With the tables gone from
// under the service (real driver errors naming SQL and tables), every
// operation fails with INTERNAL_SERVER_ERROR and the request id to quote;
// with the database closed, with SERVICE_UNAVAILABLE; the detail goes to the
// log only.
func TestSecurityErrorsCarryNoInternals(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := secEnv(t, db)
		run := e.aTrigger(uid("int"))
		ev := uid("int-ev")
		require.NotNil(t, e.aNotify(ev, 1, run.ID).Lookback)
		admin := e.aDial(gqlclient.TransportWS)
		legacy := e.aDial(gqlclient.LegacyWS)
		ops := []struct {
			what  string
			query string
			vars  map[string]any
		}{
			{"trigger", secTriggerQuery, map[string]any{"id": uid("int2")}},
			{"targeted notify", notifyMutation, map[string]any{"ev": ev, "data": 1, "run": run.ID}},
			{"broadcast notify", notifyMutation, map[string]any{"ev": ev, "data": 1}},
			{"notify step", notifyMutation, rsNotifyVars(ev, 1, "", run.ID, "s")},
			{"workflowRun", runQuery, map[string]any{"id": run.ID}},
			{"workflowRuns", `{ workflowRuns { nodes { workflowRunId } } }`, nil},
			{"waiters", waitersQuery, map[string]any{"ev": ev}},
			{"cancel", secCancel, map[string]any{"id": run.ID}},
			{"finishRun", secFinish, map[string]any{"id": run.ID}},
		}
		check := func(phase string, codes ...string) {
			t.Helper()
			for i, op := range ops {
				reqID := fmt.Sprintf("sec-%s-%d", phase, i)
				h := secJSONHeader(secToken)
				h.Set("X-Request-Id", reqID)
				r := secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(secBody(t, op.query, op.vars)))
				if !assert.NotEmpty(t, r.R.Errors, "%s: %s: %s", phase, op.what, r.Body) {
					continue
				}
				assert.Less(t, r.Status, 500, "%s: %s", phase, op.what)
				code := r.code()
				assert.Contains(t, codes, code, "%s: %s: %s", phase, op.what, r.Body)
				assert.Equal(t, reqID, r.Header.Get("X-Request-Id"))
				if code == "INTERNAL_SERVER_ERROR" {
					assert.Equal(t, reqID, r.R.Errors[0].Extensions["requestId"], "%s: %s: the request id to quote", phase, op.what)
					assert.Contains(t, r.R.Errors[0].Message, reqID)
				}
				assert.Contains(t, e.logs.String(), reqID, "%s: %s: the detail is logged with the request id", phase, op.what)
			}
			for _, c := range []*gqlclient.Conn{admin, legacy} {
				o := result(t, e.subscribe(c, ev, waitOpts{run: run.ID, step: uid("st")}), 10*time.Second)
				if assert.NotEmpty(t, o.Errors, "%s: wait", phase) {
					assert.Contains(t, codes, o.code(), "%s: wait: %+v", phase, o.Errors)
					secCheckErrors(t, phase+": wait", o.Errors)
				}
			}
			so := awaitSSE(t, secSSEAsync(t, e.endpoint, secHeader("Authorization", "Bearer "+secToken), waitSubscription, waitVars(ev, waitOpts{}), 10*time.Second), 15*time.Second)
			require.NoError(t, so.err)
			if assert.NotEmpty(t, so.resps) {
				secCheckErrors(t, phase+": SSE wait", so.resps[0].Errors)
				assert.Contains(t, codes, so.resps[0].FirstCode(), "%s: SSE wait", phase)
			}
			resp, body := httpGet(t, e.srv.URL+"/readyz")
			secNoInternals(t, phase+": /readyz", body)
			t.Logf("%s: /readyz %d %s", phase, resp.StatusCode, body)
		}

		secSabotage(t, e.dbURL)
		check("tables-gone", "INTERNAL_SERVER_ERROR", "SERVICE_UNAVAILABLE")
		// Sanity: the errors were real driver errors, and the log has them.
		require.Regexp(t, `(?i)no such table|doesn't exist`, e.logs.String(), "the log has the detail the clients did not get")
		require.NoError(t, e.svc.Store.Close())
		check("closed", "SERVICE_UNAVAILABLE", "INTERNAL_SERVER_ERROR")
		resp, body := httpGet(t, e.srv.URL+"/readyz")
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, body)

		// A request id a client makes up is used only when it is sane.
		h := secJSONHeader(secToken)
		h.Set("X-Request-Id", "a b<script>"+strings.Repeat("x", 200))
		r := secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(secBody(t, `{ __typename }`, nil)))
		assert.Regexp(t, `^[0-9a-f]{24}$`, r.Header.Get("X-Request-Id"), "an unusable request id is replaced")
	})
}

// The whole attack suite against one service, then the proof that nothing
// it refused touched anything: a durable waiter registered before is still
// WAITING, a lookback stored before is still pending and unconsumed, the
// runs are as they were, the service is healthy, and legitimate calls then
// resolve the waiter and consume the lookback exactly as they would have.
func TestSecurityAttackSuiteLeavesStateIntact(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		const maxBody = 32 << 10
		e := secEnv(t, db, func(c *service.Config) {
			c.HTTP.AllowedOrigins = []string{"https://app.example.com"}
			c.HTTP.MaxBodyBytes = maxBody
			c.Engine.MaxPayloadBytes = 8 << 10
			c.HTTP.ServerRateLimit = 0.5
			c.HTTP.ServerRateBurst = 4
			c.HTTP.MaxSubscriptionsPerConnection = 2
		})
		// Before: a victim run with a durable waiter, a pending lookback and
		// a broadcast waiter; an attacker run with a token of its own.
		victim := e.aTrigger(uid("victim"))
		attacker := e.aTrigger(uid("attacker"))
		evW, evL, evB := uid("approve"), uid("secret"), uid("bcast")
		lb := e.aNotify(evL, map[string]any{"secret": 1}, victim.ID).Lookback
		require.NotNil(t, lb)
		admin := e.aDial(gqlclient.TransportWS)
		durable := e.subscribe(admin, evW, waitOpts{run: victim.ID, step: "approve"})
		bcast := e.subscribe(admin, evB, waitOpts{})
		waiter := e.aAwaitWaiting(evW, 1)[0]
		e.aAwaitWaiting(evB, 1)

		notifyW := func(run string) []byte {
			v := map[string]any{"ev": evW, "data": "forged"}
			if run != "" {
				v["run"] = run
			}
			return secBody(t, notifyMutation, v)
		}
		post := func(h http.Header, body []byte) secResp {
			return secHTTP(t, http.MethodPost, e.endpoint, h, bytes.NewReader(body))
		}
		refusedPOST := func(what string, r secResp, status int, code string) {
			t.Helper()
			secRefused(t, r, status, code, what)
		}

		// 1. No token, a wrong token, a forged run token.
		refusedPOST("notify without a token", post(secJSONHeader(""), notifyW(victim.ID)), http.StatusUnauthorized, "UNAUTHENTICATED")
		refusedPOST("notify with a wrong token", post(secJSONHeader("wrong-token-0123456789"), notifyW("")), http.StatusUnauthorized, "UNAUTHENTICATED")
		pa, pv := strings.Split(attacker.Token, "."), strings.Split(victim.Token, ".")
		forged := strings.Join([]string{pa[0], pv[1], pa[2], pa[3]}, ".")
		refusedPOST("a forged token", post(secJSONHeader(forged), secBody(t, runQuery, map[string]any{"id": victim.ID})), http.StatusUnauthorized, "UNAUTHENTICATED")

		// 2. Run tokens beyond their scope: the attacker's on the victim, the
		// victim's own on anything but waiting and reading.
		for _, tok := range []string{attacker.Token, victim.Token} {
			for _, q := range []struct {
				what  string
				query string
				vars  map[string]any
			}{
				{"targeted notify", notifyMutation, map[string]any{"ev": evW, "data": "forged", "run": victim.ID}},
				{"broadcast notify", notifyMutation, map[string]any{"ev": evB, "data": "forged"}},
				{"cancel", secCancel, map[string]any{"id": victim.ID}},
				{"finishRun", secFinish, map[string]any{"id": victim.ID}},
				{"waiters", waitersQuery, map[string]any{"ev": evW}},
				{"introspection", `{ __schema { types { name } } }`, nil},
			} {
				secRefused(t, e.post(tok, q.query, q.vars), 0, "FORBIDDEN", "run token: "+q.what)
			}
		}
		secRefused(t, e.post(attacker.Token, runQuery, map[string]any{"id": victim.ID}), 0, "FORBIDDEN", "the attacker reading the victim")
		for _, proto := range secProtocols {
			c := e.tokenDial(proto, map[string]any{"authToken": attacker.Token})
			for _, o := range []waitOpts{{run: victim.ID}, {run: victim.ID, step: "approve"}, {}} {
				ev := evL
				if o.step != "" {
					ev = evW
				}
				s, err := c.Subscribe(ctxT(t), waitSubscription, waitVars(ev, o))
				require.NoError(t, err)
				assert.Equal(t, "FORBIDDEN", result(t, s, 10*time.Second).code(), "%s: the attacker waiting %+v", proto, o)
			}
		}
		so := awaitSSE(t, secSSEAsync(t, e.endpoint, secHeader("Authorization", "Bearer "+attacker.Token), waitSubscription, waitVars(evL, waitOpts{run: victim.ID}), 10*time.Second), 15*time.Second)
		require.NoError(t, so.err)
		if assert.NotEmpty(t, so.resps) {
			assert.Equal(t, "FORBIDDEN", so.resps[0].FirstCode(), "the attacker consuming the lookback over SSE")
		}

		// 3. Websocket without a token, with a pipelined wait that would
		// consume the lookback.
		for _, proto := range secProtocols {
			c := mustDial(t, e.endpoint, proto, nil)
			c.send(map[string]any{"type": "connection_init"})
			c.subscribe("1", waitSubscription, waitVars(evL, waitOpts{run: victim.ID}))
			code, _, _ := c.closed(10*time.Second, proto+" unauthenticated")
			assert.Equal(t, websocket.StatusCode(4401), code)
		}

		// 4. Exhaust secToken's rate limit, then a notify with it.
		for range 4 {
			e.post(secToken, secTriggerQuery, map[string]any{"id": uid("burn")})
		}
		refusedPOST("a rate-limited notify", post(secJSONHeader(secToken), notifyW(victim.ID)), http.StatusTooManyRequests, "RATE_LIMITED")

		// 5. Size, encoding, method and origin refusals with a valid token.
		big := secBody(t, notifyMutation, map[string]any{"ev": evW, "data": strings.Repeat("x", maxBody), "run": victim.ID})
		refusedPOST("an oversized notify", post(secJSONHeader(secOtherToken), big), http.StatusRequestEntityTooLarge, "PAYLOAD_TOO_LARGE")
		r := e.post(secOtherToken, notifyMutation, map[string]any{"ev": evW, "data": strings.Repeat("x", 8<<10), "run": victim.ID})
		secRefused(t, r, 0, "PAYLOAD_TOO_LARGE", "eventData over its limit")
		form := secHeader("Authorization", "Bearer "+secOtherToken, "Content-Type", "application/x-www-form-urlencoded")
		r = post(form, []byte(url.Values{"query": {`mutation { notify(eventId: "` + evW + `", workflowRunId: "` + victim.ID + `") { eventId } }`}}.Encode()))
		assert.Equal(t, http.StatusUnsupportedMediaType, r.Status, "form-encoded notify: %s", r.Body)
		r = post(secJSONHeader(secOtherToken), []byte(`{"query": "mutation { notify(eventId: \"`+evW+`\", workflowRunId: \"`+victim.ID+`\") { eventId } }"`))
		assert.Equal(t, http.StatusBadRequest, r.Status, "truncated JSON: %s", r.Body)
		r = e.get(secOtherToken, `mutation { notify(eventId: "`+evW+`", workflowRunId: "`+victim.ID+`") { eventId } }`, nil)
		assert.GreaterOrEqual(t, r.Status, 400, "a notify over GET: %s", r.Body)
		cross := secJSONHeader(secOtherToken)
		cross.Set("Origin", "https://evil.example")
		refusedPOST("a cross-origin notify", post(cross, notifyW(victim.ID)), http.StatusForbidden, "FORBIDDEN")
		_, resp, err := secDial(t, e.endpoint, gqlclient.TransportWS, secHeader("Origin", "https://evil.example", "Authorization", "Bearer "+secOtherToken))
		if assert.Error(t, err) && assert.NotNil(t, resp) {
			assert.Equal(t, http.StatusForbidden, resp.StatusCode)
		}

		// 6. Query-shape attacks carrying notifies: too many aliases, too deep.
		var many strings.Builder
		many.WriteString("mutation { ")
		for i := range 60 {
			fmt.Fprintf(&many, "n%d: notify(eventId: %q, workflowRunId: %q) { eventId } ", i, evW, victim.ID)
		}
		many.WriteString("}")
		secRefused(t, e.post(secOtherToken, many.String(), nil), 0, "COMPLEXITY_LIMIT_EXCEEDED", "60 aliased notifies")
		r = e.post(secOtherToken, `mutation { notify(eventId: "`+evW+`", workflowRunId: "`+victim.ID+`") { eventId } `+strings.Repeat("__typename ", 5001)+`}`, nil)
		assert.NotEmpty(t, r.R.Errors, "a notify over the token limit")

		// 7. Websocket abuse: an oversized message carrying a notify, a
		// duplicate id, subscriptions over the cap.
		c := mustDial(t, e.endpoint, gqlclient.TransportWS, secHeader("Authorization", "Bearer "+secOtherToken))
		c.init(nil)
		c.subscribe("big", notifyMutation+"\n# "+strings.Repeat("p", maxBody), map[string]any{"ev": evW, "data": "forged", "run": victim.ID})
		code, _, _ := c.closed(10*time.Second, "oversized websocket notify")
		assert.Equal(t, websocket.StatusMessageTooBig, code)
		c = mustDial(t, e.endpoint, gqlclient.TransportWS, secHeader("Authorization", "Bearer "+secOtherToken))
		c.init(nil)
		evX := uid("x")
		c.subscribe("d", waitSubscription, waitVars(evX, waitOpts{}))
		e.aAwaitWaiting(evX, 1)
		c.subscribe("d", waitSubscription, waitVars(evL, waitOpts{run: victim.ID}))
		code, _, _ = c.closed(10*time.Second, "duplicate id")
		assert.Equal(t, websocket.StatusCode(4409), code)
		c = mustDial(t, e.endpoint, gqlclient.TransportWS, secHeader("Authorization", "Bearer "+secOtherToken))
		c.init(nil)
		c.subscribe("1", waitSubscription, waitVars(evX, waitOpts{}))
		c.subscribe("2", waitSubscription, waitVars(evX, waitOpts{}))
		c.subscribe("3", waitSubscription, waitVars(evL, waitOpts{run: victim.ID}))
		m := c.await(10*time.Second, "over the cap", func(m secMsg) bool { return m.ID == "3" })
		assert.Equal(t, "error", m.Type, "the third operation is refused: %+v", m)

		// 8. Wildcards and injection in event ids through a legitimate token.
		for _, ev := range []string{"%", "_", evW[:len(evW)-1] + "%", "' OR '1'='1", evW + "' --"} {
			r := e.post(secOtherToken, notifyMutation, map[string]any{"ev": ev, "data": "wild"})
			if len(r.R.Errors) == 0 {
				var out struct {
					Notify notifyView `json:"notify"`
				}
				require.NoError(t, r.R.Decode(&out))
				assert.Empty(t, out.Notify.NotifyResponse, "a broadcast on %q resolved someone", ev)
			}
		}

		// After: healthy, and nothing touched.
		for _, path := range []string{"/healthz", "/readyz"} {
			resp, body := httpGet(t, e.srv.URL+path)
			require.Equal(t, http.StatusOK, resp.StatusCode, "%s: %s", path, body)
		}
		quiet(t, durable)
		quiet(t, bcast)
		v := e.aRun(victim.ID)
		require.Equal(t, "RUN_STARTED", v.State)
		require.Len(t, v.Waiters, 1)
		require.Equal(t, waiter.ID, v.Waiters[0].ID)
		require.Equal(t, "WAITING", v.Waiters[0].State)
		require.Len(t, v.LookbackEvents, 1, "the lookback is still pending")
		require.Equal(t, lb.ID, v.LookbackEvents[0].ID)
		require.JSONEq(t, `{"secret":1}`, string(v.LookbackEvents[0].EventData))
		require.Len(t, v.Steps, 1, "no step added: %+v", v.Steps)
		require.Equal(t, "RUN_STARTED", e.aRun(attacker.ID).State)
		require.Len(t, e.aWaiters(evB), 1)
		require.Empty(t, e.aWaiters(evL), "no waiter was left on the lookback's event")

		// Legitimate calls behave as if nothing had happened.
		e.clock.Advance(time.Minute) // refill the admin's rate-limit bucket
		n := e.aNotify(evW, "approved", victim.ID)
		require.Len(t, n.NotifyResponse, 1)
		require.Equal(t, waiter.ID, n.NotifyResponse[0].Waiter.ID)
		require.Equal(t, `"approved"`, string(mustResult(t, durable).EventData))
		vc := e.tokenDial(gqlclient.TransportWS, map[string]any{"authToken": victim.Token})
		got := mustResult(t, e.subscribe(vc, evL, waitOpts{run: victim.ID}))
		require.JSONEq(t, `{"secret":1}`, string(got.EventData), "the lookback is delivered, once")
		require.Empty(t, e.aRun(victim.ID).LookbackEvents)
		require.Len(t, e.aNotify(evB, "ok", "").NotifyResponse, 1)
		require.Equal(t, `"ok"`, string(mustResult(t, bcast).EventData))
	})
}

// The security settings come from the environment: RENDEZVOUS_TOKENS (and a
// tokens file), RENDEZVOUS_SECRET with rotation order, the run token TTL,
// origins and the rate limit; weak or missing settings are refused at start
// when tokens are required.
func TestSecurityConfigFromEnv(t *testing.T) {
	dir := t.TempDir()
	file := dir + "/tokens"
	require.NoError(t, writeFile(file, "# operators\n\n  file-token-0123456789abcdef  \n#commented-out-token-0123456789\n"))
	env := map[string]string{
		"DATABASE_URL":               testdb.SQLite(t),
		"RENDEZVOUS_TOKENS":          secToken + ", " + secOtherToken,
		"RENDEZVOUS_TOKENS_FILE":     file,
		"RENDEZVOUS_REQUIRE_TOKENS":  "true",
		"RENDEZVOUS_SECRET":          strings.Repeat("n", 32) + "," + secSecret,
		"RENDEZVOUS_RUN_TOKEN_TTL":   "90s",
		"RENDEZVOUS_ALLOWED_ORIGINS": "https://app.example.com",
		"RENDEZVOUS_RATE_LIMIT":      "1",
		"RENDEZVOUS_RATE_BURST":      "2",
		"RENDEZVOUS_PLAYGROUND":      "false",
	}
	cfg, err := service.ConfigFromEnv(func(k string) string { return env[k] })
	require.NoError(t, err)
	require.Equal(t, []string{secToken, secOtherToken, "file-token-0123456789abcdef"}, cfg.Auth.ServerTokens)
	require.Equal(t, []string{strings.Repeat("n", 32), secSecret}, cfg.Auth.Secrets)
	require.Equal(t, 90*time.Second, cfg.Auth.RunTokenTTL)
	require.True(t, cfg.Auth.RequireTokens)
	require.Equal(t, []string{"https://app.example.com"}, cfg.HTTP.AllowedOrigins)

	// The service built from it.
	e := newEnv(t, cfg.DatabaseURL, func(c *service.Config) {
		c.Auth, c.HTTP, c.Playground = cfg.Auth, cfg.HTTP, cfg.Playground
		c.Auth.ServerTokens = append(c.Auth.ServerTokens, secAdminToken)
	})
	secRefused(t, e.post("", `{ __typename }`, nil), http.StatusUnauthorized, "UNAUTHENTICATED", "no token")
	e.postOK("file-token-0123456789abcdef", `{ __typename }`, nil, nil)
	secRefused(t, e.post("commented-out-token-0123456789", `{ __typename }`, nil), http.StatusUnauthorized, "UNAUTHENTICATED", "a commented-out token")
	start := time.Now()
	run := e.aTrigger(uid("env"))
	assert.WithinDuration(t, start.Add(90*time.Second), run.Expires, 2*time.Second, "RENDEZVOUS_RUN_TOKEN_TTL")
	p := strings.Split(run.Token, ".")
	assert.Equal(t, secHMAC(strings.Repeat("n", 32), strings.Join(p[:3], ".")), p[3], "the first secret signs")

	// Refused configurations.
	for _, tc := range []struct {
		what string
		mod  func(c *service.Config)
	}{
		{"tokens required, none given", func(c *service.Config) { c.Auth.ServerTokens = nil }},
		{"a short server token", func(c *service.Config) { c.Auth.ServerTokens = []string{"short"} }},
		{"a short secret", func(c *service.Config) { c.Auth.Secrets = []string{"short-secret"} }},
	} {
		c := cfg
		c.DatabaseURL = testdb.SQLite(t)
		c.Logger = slogDiscard()
		tc.mod(&c)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		svc, err := service.New(ctx, c)
		cancel()
		if !assert.Error(t, err, tc.what) {
			svc.Close()
		}
	}
	for _, bad := range []map[string]string{
		{"RENDEZVOUS_RUN_TOKEN_TTL": "-1s"},
		{"RENDEZVOUS_RATE_LIMIT": "lots"},
		{"RENDEZVOUS_REQUIRE_TOKENS": "maybe"},
		{"RENDEZVOUS_TOKENS_FILE": dir + "/missing"},
	} {
		_, err := service.ConfigFromEnv(func(k string) string { return bad[k] })
		assert.Error(t, err, "%v", bad)
	}
}

func writeFile(path, content string) error {
	return os.WriteFile(path, []byte(content), 0o600)
}

func slogDiscard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

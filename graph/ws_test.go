package graph

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/errcode"
	"github.com/99designs/gqlgen/graphql/handler/transport"
	coderws "github.com/coder/websocket"
	"github.com/stretchr/testify/require"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"

	"rendezvous/internal/gqlclient"
)

// The transport's handling of operations, against a fake executor whose
// "resolvers" are driven by the test: when each fires, whether it arms the
// hook, and what happens in between.

// fakeStream is one operation the fake executor dispatched.
type fakeStream struct {
	id   string // the query text: the test's name for it
	ctx  context.Context
	ch   chan string
	fire func() // nil when not armed
}

// finish sends v (unless empty), closes the channel and fires.
func (s *fakeStream) finish(v string) {
	if v != "" {
		s.ch <- v
	}
	close(s.ch)
	if s.fire != nil {
		s.fire()
	}
}

// fakeExec dispatches subscriptions whose query text says how they behave:
// "armed:<name>" arms the hook and waits for the test; "now:<name>" arms it
// and fires before DispatchOperation returns; "racing:<name>" fires from
// another goroutine as it returns; "plain:<name>" does not arm (the
// transport reads it blocking); "bad" fails validation.
type fakeExec struct {
	streams chan *fakeStream
}

func (f *fakeExec) CreateOperationContext(ctx context.Context, p *graphql.RawParams) (*graphql.OperationContext, gqlerror.List) {
	rc := &graphql.OperationContext{RawQuery: p.Query, Operation: &ast.OperationDefinition{Operation: ast.Subscription}}
	if p.Query == "bad" {
		err := gqlerror.Errorf("bad document")
		errcode.Set(err, errcode.ValidationFailed)
		return rc, gqlerror.List{err}
	}
	return rc, nil
}

func (f *fakeExec) DispatchOperation(ctx context.Context, rc *graphql.OperationContext) (graphql.ResponseHandler, context.Context) {
	mode, name, _ := strings.Cut(rc.RawQuery, ":")
	s := &fakeStream{id: name, ctx: ctx, ch: make(chan string, 1)}
	if mode != "plain" {
		s.fire = armStreamReady(ctx)
	}
	switch mode {
	case "now":
		s.finish(name)
	case "racing":
		go s.finish(name)
	default:
		f.streams <- s
	}
	return func(ctx context.Context) *graphql.Response {
		select {
		case v, ok := <-s.ch:
			if !ok {
				return nil
			}
			return &graphql.Response{Data: json.RawMessage(`"` + v + `"`)}
		case <-ctx.Done():
			return nil
		}
	}, ctx
}

func (f *fakeExec) DispatchError(ctx context.Context, list gqlerror.List) *graphql.Response {
	return &graphql.Response{Errors: list}
}

type wsFixture struct {
	t    *testing.T
	exec *fakeExec
	url  string
}

func newWSFixture(t *testing.T, maxOps int) *wsFixture {
	return newWSFixtureTimed(t, maxOps, time.Minute, time.Minute)
}

func newWSFixtureTimed(t *testing.T, maxOps int, keepAlive, initTimeout time.Duration) *wsFixture {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tr := &wsTransport{
		keepAlive:   keepAlive,
		initTimeout: initTimeout,
		readLimit:   1 << 20,
		maxOps:      maxOps,
		init:        func(ctx context.Context, _ transport.InitPayload) (context.Context, error) { return ctx, nil },
		present:     errorPresenter(log),
		recover:     recoverFunc(log),
		log:         log,
	}
	f := &wsFixture{t: t, exec: &fakeExec{streams: make(chan *fakeStream, 1000)}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { tr.Do(w, r, f.exec) }))
	t.Cleanup(srv.Close)
	f.url = srv.URL
	return f
}

func (f *wsFixture) dial(proto string) *gqlclient.Conn {
	c, err := gqlclient.Dial(wsCtx(f.t), f.url, proto, nil)
	require.NoError(f.t, err)
	f.t.Cleanup(func() { c.CloseNow() })
	return c
}

// dispatched returns the next operation the fake executor was asked to run.
func (f *wsFixture) dispatched() *fakeStream {
	select {
	case s := <-f.exec.streams:
		return s
	case <-time.After(10 * time.Second):
		f.t.Fatal("no operation was dispatched")
		return nil
	}
}

func wsCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// events reads a subscription to its end.
func events(t *testing.T, s *gqlclient.Sub) []string {
	t.Helper()
	var out []string
	for {
		ev, err := s.Next(wsCtx(t))
		require.NoError(t, err)
		switch {
		case ev.Response != nil:
			out = append(out, "next "+string(ev.Response.Data))
		case ev.Errors != nil:
			return append(out, "error "+ev.Errors[0].Message)
		case ev.Complete:
			return append(out, "complete")
		}
	}
}

// poll tells whether cond came to hold within the deadline.
func poll(within time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(within); !cond(); {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not a wait for an event
	}
	return true
}

// While armed subscriptions wait, the transport holds no goroutine for
// them: only the connection's reader.
func TestWSIdleOperationsHoldNoGoroutine(t *testing.T) {
	f := newWSFixture(t, 1000)
	c := f.dial(gqlclient.TransportWS)
	const n = 50
	base := runtime.NumGoroutine()
	var subs []*gqlclient.Sub
	var streams []*fakeStream
	for i := range n {
		s, err := c.Subscribe(wsCtx(t), fmt.Sprintf("armed:%d", i), nil)
		require.NoError(t, err)
		subs = append(subs, s)
		streams = append(streams, f.dispatched())
	}
	var now int
	ok := poll(10*time.Second, func() bool { now = runtime.NumGoroutine(); return now <= base })
	require.True(t, ok, "%d idle subscriptions: %d goroutines, %d before", n, now, base)
	for i, s := range streams {
		s.finish(fmt.Sprintf("v%d", i))
	}
	for i, s := range subs {
		require.Equal(t, []string{fmt.Sprintf(`next "v%d"`, i), "complete"}, events(t, s))
	}
}

// fire may come before DispatchOperation returns, while it returns, or
// long after; each operation is sent once, whole, then completed.
func TestWSFireOrderings(t *testing.T) {
	f := newWSFixture(t, 1000)
	for _, proto := range []string{gqlclient.TransportWS, gqlclient.LegacyWS} {
		c := f.dial(proto)
		var subs []*gqlclient.Sub
		for i := range 100 {
			mode := []string{"now", "racing"}[i%2]
			s, err := c.Subscribe(wsCtx(t), fmt.Sprintf("%s:%d", mode, i), nil)
			require.NoError(t, err)
			subs = append(subs, s)
		}
		for i, s := range subs {
			require.Equal(t, []string{fmt.Sprintf(`next "%d"`, i), "complete"}, events(t, s), "%s op %d", proto, i)
		}
		// A stream without a value completes; firing twice sends nothing twice.
		s, err := c.Subscribe(wsCtx(t), "armed:empty", nil)
		require.NoError(t, err)
		st := f.dispatched()
		st.finish("")
		st.fire()
		require.Equal(t, []string{"complete"}, events(t, s))
	}
}

// A resolver that does not arm the hook is read by a goroutine that
// blocks, as gqlgen did.
func TestWSUnarmedStream(t *testing.T) {
	f := newWSFixture(t, 1000)
	c := f.dial(gqlclient.TransportWS)
	s, err := c.Subscribe(wsCtx(t), "plain:p", nil)
	require.NoError(t, err)
	st := f.dispatched()
	st.finish("late")
	require.Equal(t, []string{`next "late"`, "complete"}, events(t, s))
}

// Once the client stops an operation its context is canceled, nothing
// more is sent for it, and its id is free at once.
func TestWSStop(t *testing.T) {
	f := newWSFixture(t, 1000)
	c := f.raw("graphql-transport-ws")
	c.send(`{"id":"x","type":"subscribe","payload":{"query":"armed:a"}}`)
	first := f.dispatched()
	c.send(`{"id":"x","type":"complete"}`)
	select {
	case <-first.ctx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the stopped operation's context was not canceled")
	}
	c.send(`{"id":"x","type":"subscribe","payload":{"query":"armed:b"}}`)
	second := f.dispatched()
	first.finish("stale") // fires the stopped one: nothing may come of it
	second.finish("fresh")
	require.Equal(t, `{"type":"next","id":"x","payload":{"data":"fresh"}}`, c.next())
	require.Equal(t, `{"type":"complete","id":"x"}`, c.next())
}

// rawWS is a websocket client that shows the server's frames as they are.
type rawWS struct {
	t  *testing.T
	ws *coderws.Conn
	in chan string
}

// raw dials and initialises a connection.
func (f *wsFixture) raw(proto string) *rawWS {
	c := f.rawDial(proto)
	c.send(`{"type":"connection_init"}`)
	require.Equal(f.t, `{"type":"connection_ack"}`, c.next())
	if proto == "graphql-ws" {
		require.Equal(f.t, `{"type":"ka"}`, c.next())
	}
	return c
}

// rawDial dials without connection_init.
func (f *wsFixture) rawDial(proto string) *rawWS {
	ws, _, err := coderws.Dial(wsCtx(f.t), strings.Replace(f.url, "http", "ws", 1), &coderws.DialOptions{Subprotocols: []string{proto}})
	require.NoError(f.t, err)
	c := &rawWS{t: f.t, ws: ws, in: make(chan string, 100)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(c.in)
		for {
			_, b, err := ws.Read(context.Background())
			if err != nil {
				c.in <- fmt.Sprintf("closed %d", coderws.CloseStatus(err))
				return
			}
			c.in <- string(b)
		}
	}()
	f.t.Cleanup(func() { ws.CloseNow(); <-done })
	return c
}

func (c *rawWS) send(msg string) {
	require.NoError(c.t, c.ws.Write(wsCtx(c.t), coderws.MessageText, []byte(msg)))
}

// next is the next frame, or "closed <code>".
func (c *rawWS) next() string {
	select {
	case m := <-c.in:
		return m
	case <-time.After(10 * time.Second):
		c.t.Fatal("no frame from the server")
		return ""
	}
}

// Closing the connection cancels every operation, and the handler returns
// without leaving goroutines behind.
func TestWSCloseCancelsOperations(t *testing.T) {
	f := newWSFixture(t, 1000)
	base := runtime.NumGoroutine()
	c := f.dial(gqlclient.LegacyWS)
	var streams []*fakeStream
	for i := range 5 {
		_, err := c.Subscribe(wsCtx(t), fmt.Sprintf("armed:%d", i), nil)
		require.NoError(t, err)
		streams = append(streams, f.dispatched())
	}
	_, err := c.Subscribe(wsCtx(t), "plain:blocking", nil)
	require.NoError(t, err)
	streams = append(streams, f.dispatched())
	require.NoError(t, c.Close())
	for _, s := range streams {
		select {
		case <-s.ctx.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("operation %s not canceled with its connection", s.id)
		}
	}
	var now int
	ok := poll(10*time.Second, func() bool { now = runtime.NumGoroutine(); return now <= base })
	require.True(t, ok, "goroutines after the close: %d, %d before", now, base)
}

// A running id closes the connection with 4409; past the cap an operation
// gets TOO_MANY_SUBSCRIPTIONS; a validation error is an error message.
func TestWSRefusals(t *testing.T) {
	f := newWSFixture(t, 2)
	c := f.dial(gqlclient.TransportWS)
	for i := range 2 {
		_, err := c.Subscribe(wsCtx(t), fmt.Sprintf("armed:%d", i), nil)
		require.NoError(t, err)
		f.dispatched()
	}
	over, err := c.Subscribe(wsCtx(t), "armed:over", nil)
	require.NoError(t, err)
	ev, err := over.Next(wsCtx(t))
	require.NoError(t, err)
	require.Len(t, ev.Errors, 1)
	require.Equal(t, "TOO_MANY_SUBSCRIPTIONS", ev.Errors[0].Code())

	c2 := f.dial(gqlclient.TransportWS)
	bad, err := c2.Subscribe(wsCtx(t), "bad", nil)
	require.NoError(t, err)
	require.Equal(t, []string{"error bad document"}, events(t, bad))

	for _, proto := range []string{"graphql-transport-ws", "graphql-ws"} {
		r := newWSFixture(t, 10).raw(proto)
		typ := map[string]string{"graphql-transport-ws": "subscribe", "graphql-ws": "start"}[proto]
		r.send(`{"id":"x","type":"` + typ + `","payload":{"query":"armed:x"}}`)
		r.send(`{"id":"x","type":"` + typ + `","payload":{"query":"armed:y"}}`)
		if proto == "graphql-ws" {
			require.Equal(t, `{"type":"connection_error","payload":{"message":"Subscriber for x already exists"}}`, r.next())
		}
		require.Equal(t, "closed 4409", r.next(), proto)
	}
}

// Protocol violations close the connection with graphql-transport-ws's
// codes, on both protocols; graphql-ws clients hear why first.
func TestWSProtocolViolations(t *testing.T) {
	f := newWSFixture(t, 10)
	for _, tc := range []struct {
		what   string
		init   bool
		send   string
		closed string
	}{
		{"malformed JSON", true, `{"type":`, "closed 4400"},
		{"an unknown type", true, `{"type":"nope"}`, "closed 4400"},
		{"connection_init payload not an object", false, `{"type":"connection_init","payload":[1]}`, "closed 4400"},
		{"a subscribe before connection_init", false, `{"id":"1","type":"subscribe","payload":{"query":"armed:1"}}`, "closed 4401"},
		{"a second connection_init", true, `{"type":"connection_init"}`, "closed 4429"},
	} {
		for _, proto := range []string{"graphql-transport-ws", "graphql-ws"} {
			c := f.rawDial(proto)
			if tc.init {
				c = f.raw(proto)
			}
			c.send(strings.Replace(tc.send, `"subscribe"`, map[string]string{"graphql-transport-ws": `"subscribe"`, "graphql-ws": `"start"`}[proto], 1))
			got := c.next()
			if proto == "graphql-ws" {
				require.Contains(t, got, `"type":"connection_error"`, "%s %s", proto, tc.what)
				got = c.next()
			}
			require.Equal(t, tc.closed, got, "%s: %s", proto, tc.what)
		}
	}
	// graphql-transport-ws pings are answered, with their payload.
	c := f.raw("graphql-transport-ws")
	c.send(`{"type":"ping","payload":{"n":1}}`)
	require.Equal(t, `{"type":"pong","payload":{"n":1}}`, c.next())
}

// connection_init must come within the init timeout (4408); then a client
// that leaves two pings unanswered is dropped, one that answers stays.
func TestWSTimers(t *testing.T) {
	const every = 50 * time.Millisecond
	f := newWSFixtureTimed(t, 10, every, 4*every)
	silent := f.rawDial("graphql-transport-ws")
	require.Equal(t, "closed 4408", silent.next())

	mute := f.raw("graphql-transport-ws")
	require.Equal(t, `{"type":"ping"}`, mute.next())
	require.Equal(t, `{"type":"ping"}`, mute.next())
	require.Equal(t, "closed -1", mute.next(), "dropped without a close handshake")

	live := f.raw("graphql-transport-ws")
	for range 6 {
		require.Equal(t, `{"type":"ping"}`, live.next())
		live.send(`{"type":"pong"}`)
	}
}

// Frames are whole JSON objects with the id quoted as JSON.
func TestWSFrame(t *testing.T) {
	var wg sync.WaitGroup
	for _, id := range []string{"1", `a"b`, "<x>", "ü", "\x00"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f := newFrame("next", id)
			defer f.free()
			require.NoError(t, f.payload(&graphql.Response{Data: json.RawMessage(`{"a":"<&>"}`)}))
			var m struct {
				ID, Type string
				Payload  json.RawMessage
			}
			require.NoError(t, json.Unmarshal(f.bytes(), &m), "%s", f.bytes())
			require.Equal(t, id, m.ID)
			require.Equal(t, "next", m.Type)
			require.JSONEq(t, `{"data":{"a":"<&>"}}`, string(m.Payload))
		}()
	}
	wg.Wait()
	for _, id := range []string{strings.Repeat("é", 100), "x" + strings.Repeat("é", 100)} {
		reason := closeDuplicate(id).reason
		require.LessOrEqual(t, len(reason), 123)
		require.Greater(t, len(reason), 120)
		require.True(t, utf8.ValidString(reason))
	}
}

// The reflection-free path writes what encoding/json would, byte for byte,
// and leaves to it whatever it would change or refuse.
func TestWSFrameDataPayload(t *testing.T) {
	yes := true
	for _, tc := range []struct {
		resp *graphql.Response
		fast bool
	}{
		{&graphql.Response{Data: json.RawMessage(`{"waitForEvent":{"eventData":{"b":1,"a":"<&>\u2028","n":12345678901234567890}}}`)}, true},
		{&graphql.Response{Data: json.RawMessage(`null`)}, true},
		{&graphql.Response{Data: json.RawMessage("{\"a\":\"\u2028\u2029é<\"}")}, true},
		{&graphql.Response{Data: json.RawMessage(`{"a": 1}`)}, false},    // compacted by encoding/json
		{&graphql.Response{Data: json.RawMessage(`{"a":"x y"}`)}, false}, // a space in a string: the slow path, same bytes
		{&graphql.Response{Data: json.RawMessage(`{"a":1`)}, false},      // invalid: encoding/json refuses it
		{&graphql.Response{Data: json.RawMessage(`{}`), Errors: gqlerror.List{{Message: "m"}}}, false},
		{&graphql.Response{Data: json.RawMessage(`{}`), Extensions: map[string]any{}}, false},
		{&graphql.Response{Data: json.RawMessage(`{}`), HasNext: &yes}, false},
		{&graphql.Response{}, false},
	} {
		fast := newFrame("next", "1")
		ok := fast.dataPayload(tc.resp)
		require.Equal(t, tc.fast, ok, "%s", tc.resp.Data)
		slow := newFrame("next", "1")
		err := slow.payload(tc.resp)
		if ok {
			require.NoError(t, err)
			require.Equal(t, string(slow.bytes()), string(fast.bytes()))
		} else {
			require.Equal(t, `{"type":"next","id":"1"}`, string(fast.bytes()), "nothing appended")
		}
		fast.free()
		slow.free()
	}
}

type connCounter struct {
	nopRecorder
	opened, closed atomic.Int32
}

func (c *connCounter) ConnectionOpened(string) { c.opened.Add(1) }
func (c *connCounter) ConnectionClosed(string) { c.closed.Add(1) }

// goroutinesWith counts the goroutines whose stack has a frame of fn.
func goroutinesWith(fn string) int {
	var b strings.Builder
	pprof.Lookup("goroutine").WriteTo(&b, 2)
	n := 0
	for _, g := range strings.Split(b.String(), "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// Behind endStreamsWith, an upgraded connection is served by a goroutine
// of its own and the upgrade's handler returns (keeping nothing of the
// request); the stream is still counted until the connection ends, and a
// graceful shutdown still closes it with 1001.
func TestWSUpgradedConnectionOutlivesItsHandler(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tr := &wsTransport{
		keepAlive: time.Minute, initTimeout: time.Minute, readLimit: 1 << 20, maxOps: 10,
		init:    func(ctx context.Context, _ transport.InitPayload) (context.Context, error) { return ctx, nil },
		present: errorPresenter(log), recover: recoverFunc(log), log: log,
	}
	exec := &fakeExec{streams: make(chan *fakeStream, 100)}
	streams, shutdown := context.WithCancel(context.Background())
	defer shutdown()
	rec := &connCounter{}
	srv := httptest.NewServer(endStreamsWith(streams, rec, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { tr.Do(w, r, exec) })))
	defer srv.Close()

	const n = 20
	var conns []*gqlclient.Conn
	for i := range n {
		c, err := gqlclient.Dial(wsCtx(t), srv.URL, []string{gqlclient.TransportWS, gqlclient.LegacyWS}[i%2], nil)
		require.NoError(t, err)
		defer c.CloseNow()
		_, err = c.Subscribe(wsCtx(t), fmt.Sprintf("armed:%d", i), nil)
		require.NoError(t, err)
		<-exec.streams
		conns = append(conns, c)
	}
	require.Equal(t, int32(n), rec.opened.Load())
	var readers, handlers int
	ok := poll(10*time.Second, func() bool {
		readers, handlers = goroutinesWith("graph.(*wsConn).serve"), goroutinesWith("endStreamsWith")
		return readers == n && handlers == 0
	})
	require.True(t, ok, "%d connections: %d readers, %d goroutines still in the handler", n, readers, handlers)
	require.Zero(t, rec.closed.Load(), "the streams are open")

	// One client leaves: its stream ends.
	conns[0].Close()
	require.True(t, poll(10*time.Second, func() bool { return rec.closed.Load() == 1 }))

	// Graceful shutdown: the rest are closed with 1001, and nothing stays.
	shutdown()
	for _, c := range conns[1:] {
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("a connection outlived the shutdown")
		}
		require.Equal(t, coderws.StatusGoingAway, c.CloseStatus())
	}
	require.True(t, poll(10*time.Second, func() bool {
		return rec.closed.Load() == n && goroutinesWith("graph.(*wsConn).serve") == 0
	}), "%d of %d streams ended", rec.closed.Load(), n)
}

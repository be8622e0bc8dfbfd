package graph

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/handler/transport"
	coderws "github.com/coder/websocket"
)

// wsTransport serves GraphQL over websockets, with graphql-transport-ws and
// the legacy graphql-ws of subscriptions-transport-ws. It replaces gqlgen's
// transport.Websocket, which spends a goroutine per connection on keep-alive,
// another on closing when the context ends, and one per operation on reading
// its stream. Here the handler's own goroutine reads the client's messages,
// a timer does the keep-alive, context.AfterFunc closes on cancel, and an
// idle subscription whose resolver arms streamReady holds no goroutine of
// the transport at all (see wsop.go).
type wsTransport struct {
	// keepAlive: graphql-transport-ws clients get a ping, graphql-ws clients
	// a "ka" and a websocket ping frame, this often; one that leaves two
	// pings unanswered is dropped.
	keepAlive time.Duration
	// initTimeout: connection_init must come within it.
	initTimeout time.Duration
	// readLimit caps one client message (the close is 1009).
	readLimit int64
	// maxOps caps the operations running at once on one connection.
	maxOps int
	// vars keeps JSON-typed variables raw (rule 13).
	vars *variableDecoder
	// init authenticates connection_init and returns the connection's context.
	init wsInitFunc
	// present and recover turn a panic into the error a client may see
	// (recover logs it).
	present graphql.ErrorPresenterFunc
	recover graphql.RecoverFunc
	log     *slog.Logger
}

// wsInitFunc checks a connection_init payload and returns the context the
// connection's operations run in; an error refuses the connection (4401).
type wsInitFunc func(ctx context.Context, payload transport.InitPayload) (context.Context, error)

var _ graphql.Transport = (*wsTransport)(nil)

// wsSubprotocols in the order gqlgen prefers them when a client offers both.
var wsSubprotocols = []string{legacyWS.name, transportWS.name}

// errConnectionEnded cancels a connection's context when the transport ends it.
var errConnectionEnded = errors.New("websocket connection ended")

func (*wsTransport) Supports(r *http.Request) bool { return isUpgrade(r) }

func (t *wsTransport) Do(w http.ResponseWriter, r *http.Request, exec graphql.GraphExecutor) {
	c := &wsConn{t: t, exec: exec, logCtx: r.Context(), ops: map[string]*wsOp{}}
	ws, err := coderws.Accept(withLeanHijack(w), r, &coderws.AcceptOptions{ // see wsbuf.go
		Subprotocols:       wsSubprotocols,
		InsecureSkipVerify: true, // the origins middleware checked the Origin
		// graphql-ws clients answer our ping frames by themselves.
		OnPongReceived: func(context.Context, []byte) { c.unanswered.Store(0) },
	})
	if err != nil {
		return // Accept answered the request
	}
	c.ws = ws
	c.proto = protocolOf(ws.Subprotocol())
	ws.SetReadLimit(t.readLimit)
	ctx := r.Context()
	end := takeOverStream(ctx)
	if end == nil {
		c.serve(ctx) // not behind endStreamsWith (tests of the transport alone)
		return
	}
	// The handler returns and the connection is read by a goroutine of its
	// own. The handler's goroutine would keep, for the connection's life,
	// the request, the response and every frame of the middlewares (and
	// the stack that upgrading grew past 8 KB); a new goroutine parked in
	// a read keeps a stack of a few KB and the connection's own state.
	go func() {
		defer end()
		c.serve(ctx)
	}()
}

// wsConn is one websocket connection.
type wsConn struct {
	t     *wsTransport
	ws    *coderws.Conn
	proto *wsProtocol
	exec  graphql.GraphExecutor
	// logCtx is the upgrade request's context, for the log lines of
	// goroutines other than the reader.
	logCtx context.Context

	// ctx is the connection's context: the upgrade request's, then what
	// connection_init added (the caller, a token's deadline). Only the
	// reader uses the field (operations get contexts derived from it);
	// cancel ends it and every operation's.
	ctx    context.Context
	cancel context.CancelCauseFunc

	// writeMu is held across a write, so that frames go out whole and in
	// the order their checks were made (see sendOp).
	writeMu sync.Mutex

	// mu guards what follows; it is never held across I/O, so that a
	// resolver firing its stream (wsOp.fire) never waits on the network.
	mu      sync.Mutex
	ops     map[string]*wsOp // running operations by the client's id
	acked   bool             // connection_init accepted
	closing bool             // ending: nothing more is sent, nothing more starts
	// timer fires at the init timeout, then every keepAlive.
	timer *time.Timer
	// unwatch stops the AfterFunc that closes the connection when ctx ends.
	unwatch func() bool
	// streams counts the goroutines of operations (dispatching, reading a
	// stream); the handler waits for them, so that nothing outlives the
	// connection.
	streams sync.WaitGroup

	// unanswered counts keep-alive ticks since the client's last pong.
	unanswered atomic.Int32
}

// serve runs the connection on the handler's goroutine until it ends.
func (c *wsConn) serve(ctx context.Context) {
	c.ctx, c.cancel = context.WithCancelCause(ctx)
	c.mu.Lock()
	c.timer = time.AfterFunc(c.t.initTimeout, c.onTimer)
	c.mu.Unlock()
	c.watch(c.ctx)
	defer c.finish()
	for {
		_, data, err := c.ws.Read(context.Background())
		if err != nil {
			return // the client went away, or the connection was closed (by us, or over the read limit)
		}
		start := graphql.Now()
		var m wsMessage
		if json.Unmarshal(data, &m) != nil {
			c.end(closeBadMessage)
			return
		}
		if !c.handle(start, &m) {
			return
		}
	}
}

// wsMessage is a message from the client.
type wsMessage struct {
	ID      string          `json:"id"`
	Type    string          `json:"type"`
	Payload json.RawMessage `json:"payload"`
}

// handle acts on one message; false when the connection is to end (it has
// been told why).
func (c *wsConn) handle(start time.Time, m *wsMessage) bool {
	p := c.proto
	switch {
	case m.Type == "connection_init":
		if c.acked {
			return c.end(closeTooManyInits)
		}
		return c.initialise(m.Payload)
	case !p.legacy && m.Type == "ping":
		c.writeFrame(pongFrame(m.Payload))
	case !p.legacy && m.Type == "pong":
		c.unanswered.Store(0)
	case p.legacy && m.Type == "connection_terminate":
		return c.end(closeTerminated)
	case !c.acked:
		return c.end(closeTooEarly)
	case m.Type == p.subscribe && m.ID != "":
		return c.subscribe(start, m)
	case m.Type == p.stop:
		c.stop(m.ID)
	default:
		return c.end(closeBadMessage)
	}
	return true
}

// initialise answers connection_init: authenticate, ack, start the keep-alive.
func (c *wsConn) initialise(raw json.RawMessage) bool {
	var payload transport.InitPayload
	if len(raw) > 0 && string(raw) != "null" {
		if raw[0] != '{' || json.Unmarshal(raw, &payload) != nil {
			return c.end(closeBadInit)
		}
	}
	ctx, err := c.t.init(c.ctx, payload)
	if err != nil {
		return c.end(closeUnauthenticated)
	}
	if ctx != c.ctx {
		c.ctx = ctx
		c.watch(ctx) // a run token's deadline
	}
	c.mu.Lock()
	c.acked = true
	c.timer.Reset(c.t.keepAlive)
	c.mu.Unlock()
	c.write(ackFrame)
	if c.proto.legacy {
		c.write(kaFrame) // as gqlgen does: subscriptions-transport-ws starts its keep-alive check on it
	}
	return true
}

// onTimer runs on the timer's own goroutine: the init timeout, then the
// keep-alive ticks.
func (c *wsConn) onTimer() {
	defer c.recovered()
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	if !c.acked {
		c.mu.Unlock()
		c.end(closeInitTimeout)
		return
	}
	// Two ticks without a pong: the first ping is 2 × keepAlive old.
	if c.unanswered.Load() >= 2 {
		c.mu.Unlock()
		c.drop()
		return
	}
	c.unanswered.Add(1)
	// Rearmed before writing: a write stuck on a client that stopped
	// reading must not stop the ticks that will drop it.
	c.timer.Reset(c.t.keepAlive)
	c.mu.Unlock()
	if !c.proto.legacy {
		c.write(pingFrame)
		return
	}
	c.write(kaFrame)
	// coder/websocket sends a ping frame only through Ping, which then waits
	// for the pong; the pong is counted by OnPongReceived, so the wait is
	// bounded and its outcome ignored.
	ctx, cancel := context.WithTimeout(context.Background(), c.t.keepAlive/2)
	c.ws.Ping(ctx)
	cancel()
}

// watch closes the connection when ctx ends: a graceful shutdown, a run
// token's expiry, the request's end.
func (c *wsConn) watch(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() { c.contextDone(ctx) })
	c.mu.Lock()
	old := c.unwatch
	c.unwatch = stop
	c.mu.Unlock()
	if old != nil {
		old()
	}
}

func (c *wsConn) contextDone(ctx context.Context) {
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, errShuttingDown):
		c.end(closeGoingAway)
	case errors.Is(cause, errTokenExpired):
		c.end(closeTokenExpired)
	default:
		c.end(closeTerminated)
	}
}

// end closes the connection with a close frame, once, whichever goroutine
// asks first; graphql-ws clients first get the reason as connection_error.
// It returns false, for handle.
func (c *wsConn) end(cl wsClose) bool {
	if !c.markClosing() {
		return false
	}
	if c.proto.legacy && cl.code >= 4000 {
		// Not behind writeMu, which a write stuck on a client that stopped
		// reading may hold: coder/websocket keeps frames whole by itself,
		// and gives up (closing the connection) at the deadline.
		f := connectionErrorFrame(cl.reason)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c.ws.Write(ctx, coderws.MessageText, f.bytes())
		cancel()
		f.free()
	}
	c.cancel(errConnectionEnded)
	// Waits up to 5 s for the client's close frame; the reader, if it is
	// reading, returns with it.
	c.ws.Close(coderws.StatusCode(cl.code), cl.reason)
	return false
}

// drop closes the connection without a close handshake: the client is gone.
func (c *wsConn) drop() {
	if c.markClosing() {
		c.cancel(errConnectionEnded)
	}
	c.ws.CloseNow()
}

// markClosing stops the timer and the watch and tells whether this call
// was the first.
func (c *wsConn) markClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return false
	}
	c.closing = true
	c.timer.Stop()
	if c.unwatch != nil {
		c.unwatch()
	}
	return true
}

// finish ends the connection when the reader returns: operations are
// canceled, a close handshake another goroutine runs is waited for, and so
// are the operations' goroutines.
func (c *wsConn) finish() {
	if p := recover(); p != nil {
		c.logPanic(c.logCtx, p)
		c.end(closeInternal)
	}
	c.drop() // CloseNow waits for a Close in progress elsewhere
	c.streams.Wait()
}

// recovered keeps a panic on a goroutine of the transport from killing the
// process: it is logged and the connection dropped.
func (c *wsConn) recovered() {
	if p := recover(); p != nil {
		c.logPanic(c.logCtx, p)
		c.drop()
	}
}

func (c *wsConn) logPanic(ctx context.Context, p any) {
	c.t.log.ErrorContext(ctx, "panic in the websocket transport", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
}

// write sends a frame that belongs to no operation. Errors mean the
// connection is going away; the reader finds out. Writes take no deadline:
// a client that stops reading stops answering pings too, and closing the
// connection ends a stuck write.
func (c *wsConn) write(frame []byte) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	c.ws.Write(context.Background(), coderws.MessageText, frame)
}

func (c *wsConn) writeFrame(f *wsFrame) {
	c.write(f.bytes())
	f.free()
}

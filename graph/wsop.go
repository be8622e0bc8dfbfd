package graph

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/errcode"
	coderws "github.com/coder/websocket"
	"github.com/vektah/gqlparser/v2/gqlerror"
)

// An operation's resolver runs on a goroutine of its own: CreateOperationContext,
// then DispatchOperation, inside which gqlgen calls a subscription's
// resolver (a database round trip: not on the reader, which must go on
// reading pongs and stops, and whose stack would keep what the resolver
// grew). A resolver that arms streamReady (waitForEvent does) promises to
// call wsOp.fire once its channel is closed; the goroutine then returns,
// and the operation, while it waits, is this struct and its contexts and
// no goroutine of the transport. fire starts one, which reads the whole
// stream without blocking, sends it and completes. Any other operation (a
// query, a mutation, a refusal by a middleware, a resolver error) is read
// by the dispatching goroutine, blocking, as in gqlgen.

// wsOp is one operation, from subscribe until its last message, its stop by
// the client or the connection's end.
type wsOp struct {
	c  *wsConn
	id string
	// ctx is the operation's context, canceled by cancel; dispatch replaces
	// it with DispatchOperation's (a child). next is the response handler.
	// Both are read by the goroutine that dispatches or claimed the stream.
	ctx    context.Context
	cancel context.CancelFunc
	next   graphql.ResponseHandler
	// state is guarded by c.mu.
	state opState
}

type opState uint8

const (
	// opDispatched: DispatchOperation returned.
	opDispatched opState = 1 << iota
	// opFired: the resolver's channel is closed.
	opFired
	// opStreaming: a goroutine reads the stream (claimed at most once).
	opStreaming
	// opEnded: stopped by the client, or its last message was sent (or
	// dropped with the connection); nothing more is sent for it.
	opEnded
)

// subscribe starts an operation (graphql-transport-ws subscribe, graphql-ws
// start); false when the connection is to end.
func (c *wsConn) subscribe(start time.Time, m *wsMessage) bool {
	op := &wsOp{c: c, id: m.ID}
	c.mu.Lock()
	_, dup := c.ops[m.ID]
	full := len(c.ops) >= c.t.maxOps
	if !dup && !full {
		c.ops[m.ID] = op
	}
	c.mu.Unlock()
	switch {
	case dup: // graphql-transport-ws requires 4409; the legacy protocol is held to the same
		return c.end(closeDuplicate(m.ID))
	case full:
		c.refuse(m.ID, gqlerror.List{{
			Message:    fmt.Sprintf("at most %d operations may run on one connection", c.t.maxOps),
			Extensions: errorExtensions(c.ctx, "TOO_MANY_SUBSCRIPTIONS"),
		}})
		return true
	}
	// Only the reader stops operations, so the registered op gets its
	// context before any stop can look for it.
	op.ctx, op.cancel = context.WithCancel(graphql.StartOperationTrace(c.ctx))
	c.streams.Add(1)
	go c.dispatch(op, start, m.Payload)
	return true
}

// dispatch takes the operation as far as its resolver, the way gqlgen's
// transport does, then reads its stream unless the resolver armed the hook
// and has not fired yet.
func (c *wsConn) dispatch(op *wsOp, start time.Time, payload json.RawMessage) {
	defer c.streams.Done()
	ctx := op.ctx
	defer func() {
		if p := recover(); p != nil {
			c.fail(op, c.t.present(ctx, c.t.recover(ctx, p)))
		}
	}()
	var rb requestBody
	if decodeOne(payload, &rb) != nil {
		c.fail(op, &gqlerror.Error{
			Message:    "the " + c.proto.subscribe + " payload is not a JSON object with a query",
			Extensions: errorExtensions(ctx, codeBadRequest),
		})
		return
	}
	params, err := c.t.vars.params(ctx, &rb)
	if err != nil {
		c.fail(op, &gqlerror.Error{
			Message:    "variables: " + err.Error(),
			Extensions: errorExtensions(ctx, codeBadRequest),
		})
		return
	}
	// No Headers: a websocket's are its upgrade request's, which nothing
	// reads, and keeping them would keep them for the connection's life.
	params.ReadTime = graphql.TraceTiming{Start: start, End: graphql.Now()}

	rc, errs := c.exec.CreateOperationContext(ctx, params)
	if errs != nil {
		resp := c.exec.DispatchError(graphql.WithOperationContext(ctx, rc), errs)
		if errcode.GetErrorKind(errs) == errcode.KindProtocol {
			c.fail(op, resp.Errors...) // a parse or validation error: an error message
		} else {
			c.answer(op, &graphql.Response{Errors: resp.Errors}) // a result with errors, then complete
		}
		return
	}
	ctx, ready := withStreamReady(graphql.WithOperationContext(ctx, rc), op.fire)
	op.next, op.ctx = c.exec.DispatchOperation(ctx, rc)
	if c.dispatched(op, ready.Armed()) {
		c.stream(op)
	}
}

// dispatched: DispatchOperation returned. It tells whether the caller is to
// read the stream now: always when the resolver did not arm the hook (the
// reads may block), else only if it fired already.
func (c *wsConn) dispatched(op *wsOp, armed bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	op.state |= opDispatched
	return (!armed || op.state&opFired != 0) && c.claimLocked(op)
}

// fire is the streamReady hook: the resolver's channel is closed. It may be
// called before DispatchOperation returned, from any goroutine (one that
// just committed a notify), so it only takes c.mu, which no one holds
// across I/O, and starts a goroutine for the stream if dispatch has
// returned and left it.
func (op *wsOp) fire() {
	c := op.c
	c.mu.Lock()
	op.state |= opFired
	start := op.state&opDispatched != 0 && c.claimLocked(op)
	if start {
		c.streams.Add(1) // under c.mu with closing false: before finish waits
	}
	c.mu.Unlock()
	if start {
		go func() {
			defer c.streams.Done()
			defer func() {
				if p := recover(); p != nil {
					c.fail(op, c.t.present(op.ctx, c.t.recover(op.ctx, p)))
				}
			}()
			c.stream(op)
		}()
	}
}

// claimLocked claims the reading of op's stream, at most once, and not for
// an operation that ended or on a connection that is ending.
func (c *wsConn) claimLocked(op *wsOp) bool {
	if op.state&(opStreaming|opEnded) != 0 || c.closing {
		return false
	}
	op.state |= opStreaming
	return true
}

// stream sends every response of op, then complete. For an armed
// operation none of the calls blocks: its channel is closed.
func (c *wsConn) stream(op *wsOp) {
	for {
		resp := op.next(op.ctx)
		if resp == nil {
			break
		}
		c.send(op, resp)
	}
	c.complete(op)
}

// answer sends one response and completes: an operation refused by
// CreateOperationContext with errors that are not about the document.
func (c *wsConn) answer(op *wsOp, resp *graphql.Response) {
	c.send(op, resp)
	c.complete(op)
}

// send sends one response as next (graphql-ws: data).
func (c *wsConn) send(op *wsOp, resp *graphql.Response) {
	f := newFrame(c.proto.next, op.id)
	if f.dataPayload(resp) {
		c.sendOp(op, f, false)
		return
	}
	if err := f.payload(resp); err != nil {
		f.free()
		panic(fmt.Errorf("marshal a response: %w", err)) // a resolver returned invalid JSON; stream's recover answers
	}
	c.sendOp(op, f, false)
}

// complete ends op normally.
func (c *wsConn) complete(op *wsOp) {
	c.sendOp(op, newFrame("complete", op.id), true)
}

// fail ends op with an error message and nothing after it (the protocols
// say an error ends the operation; gqlgen sent complete too).
func (c *wsConn) fail(op *wsOp, errs ...*gqlerror.Error) {
	c.sendOp(op, errorFrame(op.id, errs), true)
}

// refuse answers a subscribe that never became an operation.
func (c *wsConn) refuse(id string, errs gqlerror.List) {
	f := errorFrame(id, errs)
	defer f.free()
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	c.mu.Lock()
	closing := c.closing
	c.mu.Unlock()
	if !closing {
		c.ws.Write(context.Background(), coderws.MessageText, f.bytes())
	}
}

func errorFrame(id string, errs gqlerror.List) *wsFrame {
	f := newFrame("error", id)
	if f.payload(errs) != nil {
		f.rawPayload(json.RawMessage(`[{"message":"internal server error","extensions":{"code":"INTERNAL_SERVER_ERROR"}}]`))
	}
	return f
}

// sendOp writes a message of op unless op has ended or its context has:
// the connection is ending (a canceled stream's end is no normal complete).
// last ends op, forgetting it before the message goes out, so that a client
// reusing the id as soon as it reads the message finds it free. writeMu is
// held from the check to the end of the write: a stop processed after the
// check waits for the write, and nothing of op is written after.
func (c *wsConn) sendOp(op *wsOp, f *wsFrame, last bool) {
	defer f.free()
	c.writeMu.Lock()
	c.mu.Lock()
	live := op.state&opEnded == 0 && !c.closing && op.ctx.Err() == nil
	if last {
		c.forgetLocked(op)
	}
	c.mu.Unlock()
	if live {
		c.ws.Write(context.Background(), coderws.MessageText, f.bytes())
	}
	c.writeMu.Unlock()
	if last {
		op.cancel()
	}
}

// stop ends op on the client's word (graphql-transport-ws complete,
// graphql-ws stop): nothing more is sent for it, its id is free at once,
// and its context is canceled, which ends its resolver.
func (c *wsConn) stop(id string) {
	c.writeMu.Lock() // see sendOp
	c.mu.Lock()
	op := c.ops[id]
	if op != nil {
		c.forgetLocked(op)
	}
	c.mu.Unlock()
	c.writeMu.Unlock()
	if op != nil {
		op.cancel()
	}
}

func (c *wsConn) forgetLocked(op *wsOp) {
	op.state |= opEnded
	if c.ops[op.id] == op {
		delete(c.ops, op.id)
	}
}

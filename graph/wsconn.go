package graph

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/99designs/gqlgen/graphql/handler/transport"
	coderws "github.com/coder/websocket"
)

// coderConn adapts a coder/websocket connection to gqlgen's websocket
// transport, like gqlgen's own adapter, plus one thing it lacks: on the
// legacy graphql-ws protocol, which has no application-level ping, it sends
// websocket ping frames (every client answers those by itself) and drops a
// client that does not answer, so a dead peer is noticed in seconds rather
// than when TCP gives up. graphql-transport-ws has its own ping/pong, run by
// gqlgen.
type coderConn struct {
	conn *coderws.Conn
	done chan struct{} // closed by Close: stops the pinger

	mu           sync.Mutex
	closed       bool
	closing      bool
	readDeadline *time.Timer
}

var (
	_ transport.WebsocketConn          = (*coderConn)(nil)
	_ transport.WebsocketReadLimiter   = (*coderConn)(nil)
	_ transport.WebsocketReadDeadliner = (*coderConn)(nil)
)

// acceptCoder upgrades the request. The origin was checked before.
func acceptCoder(w http.ResponseWriter, r *http.Request, opts transport.WebsocketAcceptOptions, pingEvery time.Duration) (*coderConn, error) {
	for k, vs := range opts.ResponseHeader {
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	conn, err := coderws.Accept(w, r, &coderws.AcceptOptions{Subprotocols: opts.Subprotocols, InsecureSkipVerify: true})
	if err != nil {
		return nil, err
	}
	c := &coderConn{conn: conn, done: make(chan struct{})}
	if conn.Subprotocol() != "graphql-transport-ws" && pingEvery > 0 {
		go c.pinger(pingEvery)
	}
	return c, nil
}

func (c *coderConn) pinger(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), 2*every)
			err := c.conn.Ping(ctx)
			cancel()
			if err != nil {
				c.conn.CloseNow() // the reader fails, and gqlgen ends the connection
				return
			}
		}
	}
}

func (c *coderConn) NextReader() (int, io.Reader, error) {
	mt, data, err := c.conn.Read(context.Background())
	if err != nil {
		switch coderws.CloseStatus(err) {
		case coderws.StatusNormalClosure, coderws.StatusNoStatusRcvd:
			return int(mt), nil, transport.ErrWebsocketClosed
		}
		return int(mt), nil, err
	}
	return int(mt), bytes.NewReader(data), nil
}

func (c *coderConn) WriteJSON(v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.conn.Write(context.Background(), coderws.MessageText, data)
}

// WriteClose runs the close handshake in the background: coder/websocket
// waits up to 5 s for the peer's close frame, and the transport must not.
func (c *coderConn) WriteClose(code int, reason string) error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return nil
	}
	c.closing = true
	c.stopTimerLocked()
	c.mu.Unlock()
	go c.conn.Close(coderws.StatusCode(code), reason)
	return nil
}

func (c *coderConn) Close() error {
	c.mu.Lock()
	closing := c.closing
	if !c.closed {
		c.closed = true
		close(c.done)
	}
	c.stopTimerLocked()
	c.mu.Unlock()
	if closing {
		return nil // the handshake goroutine closes the connection
	}
	return c.conn.CloseNow()
}

func (c *coderConn) Subprotocol() string { return c.conn.Subprotocol() }

func (c *coderConn) SetReadLimit(limit int64) { c.conn.SetReadLimit(limit) }

// SetReadDeadline closes the connection at the deadline (coder/websocket
// reads take a context, not a deadline); gqlgen uses it to wait for pongs.
func (c *coderConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopTimerLocked()
	if t.IsZero() {
		return nil
	}
	d := time.Until(t)
	if d <= 0 {
		return c.conn.CloseNow()
	}
	c.readDeadline = time.AfterFunc(d, func() { c.conn.CloseNow() })
	return nil
}

func (c *coderConn) stopTimerLocked() {
	if c.readDeadline != nil {
		c.readDeadline.Stop()
		c.readDeadline = nil
	}
}

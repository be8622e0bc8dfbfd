package graph

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/99designs/gqlgen/graphql/handler/transport"
)

// Websocket close codes of the protocol layer.
const (
	// closeDuplicateID: a subscribe whose id is already running
	// (graphql-transport-ws requires 4409).
	closeDuplicateID = 4409
	// closeBadInit: a connection_init whose payload is not an object.
	closeBadInit = 4400
)

// guardedWebsockets wraps the websocket connections gqlgen's transport uses
// to enforce what the transport leaves out:
//   - an id may not be reused while its operation runs (4409);
//   - a connection may run at most maxSubs operations at once (the one over
//     the limit gets an error);
//   - once the client stops an operation, nothing more is sent for it (the
//     protocol says so; gqlgen still sends complete), and the client may
//     reuse the id at once: gqlgen tracks operations by id, so a new
//     operation whose id is still ending runs under an internal id;
//   - a connection_init payload must be an object (gqlgen would stop
//     reading such a connection without closing it).
type guardedWebsockets struct {
	maxSubs int
	// pingEvery: websocket ping frames on legacy graphql-ws connections.
	pingEvery time.Duration
}

func (g guardedWebsockets) Accept(w http.ResponseWriter, r *http.Request, opts transport.WebsocketAcceptOptions) (transport.WebsocketConn, error) {
	c, err := acceptCoder(w, r, opts, g.pingEvery)
	if err != nil {
		return nil, err
	}
	return &guardedConn{WebsocketConn: c, ctx: r.Context(), max: g.maxSubs, running: map[string]string{}, ending: map[string]string{}}, nil
}

type guardedConn struct {
	transport.WebsocketConn
	ctx context.Context // the upgrade request's: its request id, its recorder
	max int

	mu sync.Mutex
	// running maps the client's id of each operation it has not stopped to
	// the id gqlgen knows it by.
	running map[string]string
	// ending maps every id gqlgen still runs to the client's id, or to ""
	// once the client stopped it (its messages are then dropped).
	ending map[string]string
	gen    int
}

// envelope is the part of a protocol message we look at.
type envelope struct {
	ID      string          `json:"id"`
	Type    string          `json:"type"`
	Payload json.RawMessage `json:"payload"`
}

// NextReader reads each client message whole and applies the rules above
// before gqlgen sees it.
func (c *guardedConn) NextReader() (int, io.Reader, error) {
	for {
		mt, r, err := c.WebsocketConn.NextReader()
		if err != nil {
			return mt, r, err
		}
		b, err := io.ReadAll(r)
		if err != nil {
			return mt, nil, err
		}
		var env envelope
		if json.Unmarshal(b, &env) != nil {
			return mt, bytes.NewReader(b), nil // gqlgen answers malformed messages
		}
		switch env.Type {
		case "connection_init":
			if p := bytes.TrimSpace(env.Payload); len(p) > 0 && p[0] != '{' && string(p) != "null" {
				c.WebsocketConn.WriteClose(closeBadInit, "connection_init payload must be an object")
				return mt, nil, fmt.Errorf("connection_init payload is not an object")
			}
		case "subscribe", "start":
			c.mu.Lock()
			_, dup := c.running[env.ID]
			full := len(c.running) >= c.max
			internal := env.ID
			if !dup && !full {
				if _, busy := c.ending[env.ID]; busy {
					c.gen++
					internal = env.ID + "\x00" + strconv.Itoa(c.gen)
				}
				c.running[env.ID] = internal
				c.ending[internal] = env.ID
			}
			c.mu.Unlock()
			switch {
			case dup:
				c.WebsocketConn.WriteClose(closeDuplicateID, fmt.Sprintf("Subscriber for %s already exists", env.ID))
				return mt, nil, fmt.Errorf("duplicate operation id %q", env.ID)
			case full:
				c.WebsocketConn.WriteJSON(map[string]any{"id": env.ID, "type": "error", "payload": []map[string]any{{
					"message":    fmt.Sprintf("at most %d operations may run on one connection", c.max),
					"extensions": errorExtensions(c.ctx, "TOO_MANY_SUBSCRIPTIONS"),
				}}})
				continue
			}
			if internal != env.ID {
				b = withID(b, internal)
			}
		case "complete", "stop":
			c.mu.Lock()
			internal, ok := c.running[env.ID]
			if ok {
				delete(c.running, env.ID)
				c.ending[internal] = ""
			}
			c.mu.Unlock()
			if !ok {
				continue // nothing of that id runs: nothing to stop
			}
			if internal != env.ID {
				b = withID(b, internal)
			}
		}
		return mt, bytes.NewReader(b), nil
	}
}

// WriteJSON translates internal ids back, drops messages of operations the
// client stopped, and frees ids the server ends.
func (c *guardedConn) WriteJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var env envelope
	if json.Unmarshal(b, &env) == nil && env.ID != "" {
		c.mu.Lock()
		client, known := c.ending[env.ID]
		if known && (env.Type == "complete" || env.Type == "error") {
			delete(c.ending, env.ID)
			if client != "" && c.running[client] == env.ID {
				delete(c.running, client)
			}
		}
		c.mu.Unlock()
		switch {
		case known && client == "":
			return nil // stopped by the client: it wants nothing more
		case known && client != env.ID:
			b = withID(b, client)
		}
	}
	return c.WebsocketConn.WriteJSON(json.RawMessage(b))
}

// withID returns the message with its id replaced.
func withID(msg []byte, id string) []byte {
	var m map[string]json.RawMessage
	if json.Unmarshal(msg, &m) != nil {
		return msg
	}
	m["id"], _ = json.Marshal(id)
	out, err := json.Marshal(m)
	if err != nil {
		return msg
	}
	return out
}

// SetReadLimit and SetReadDeadline pass through to the optional interfaces
// gqlgen looks for, which embedding an interface would hide.
func (c *guardedConn) SetReadLimit(limit int64) {
	if l, ok := c.WebsocketConn.(transport.WebsocketReadLimiter); ok {
		l.SetReadLimit(limit)
	}
}

func (c *guardedConn) SetReadDeadline(t time.Time) error {
	if d, ok := c.WebsocketConn.(transport.WebsocketReadDeadliner); ok {
		return d.SetReadDeadline(t)
	}
	return nil
}

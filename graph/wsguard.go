package graph

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/99designs/gqlgen/graphql/handler/transport"
)

// closeDuplicateID is graphql-transport-ws' close code for a subscribe whose
// id is already in use on the connection.
const closeDuplicateID = 4409

// guardedWebsockets wraps gqlgen's websocket implementation to enforce what
// the transport leaves out: an id may not be reused while its operation
// runs (4409, as graphql-transport-ws requires), and a connection may hold
// at most maxSubs operations at once (the one over the limit gets an error).
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
	return &guardedConn{WebsocketConn: c, max: g.maxSubs, active: map[string]bool{}}, nil
}

type guardedConn struct {
	transport.WebsocketConn
	max int

	mu     sync.Mutex
	active map[string]bool
}

// envelope is the part of a protocol message we look at.
type envelope struct {
	ID   string `json:"id"`
	Type string `json:"type"`
}

// NextReader reads each client message whole, tracks operation ids, and
// turns away duplicates and operations over the limit before gqlgen sees them.
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
		if json.Unmarshal(b, &env) == nil {
			switch env.Type {
			case "subscribe", "start":
				c.mu.Lock()
				dup, full := c.active[env.ID], len(c.active) >= c.max
				if !dup && !full {
					c.active[env.ID] = true
				}
				c.mu.Unlock()
				if dup {
					c.WebsocketConn.WriteClose(closeDuplicateID, fmt.Sprintf("Subscriber for %s already exists", env.ID))
					return mt, nil, fmt.Errorf("duplicate operation id %q", env.ID)
				}
				if full {
					c.WebsocketConn.WriteJSON(map[string]any{"id": env.ID, "type": "error", "payload": []map[string]any{{
						"message":    fmt.Sprintf("at most %d operations may run on one connection", c.max),
						"extensions": map[string]any{"code": "TOO_MANY_SUBSCRIPTIONS"},
					}}})
					continue
				}
			case "complete", "stop":
				c.mu.Lock()
				delete(c.active, env.ID)
				c.mu.Unlock()
			}
		}
		return mt, bytes.NewReader(b), nil
	}
}

// WriteJSON notes operations the server ends (complete or error), so their
// ids are free again.
func (c *guardedConn) WriteJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var env envelope
	if json.Unmarshal(b, &env) == nil && env.ID != "" && (env.Type == "complete" || env.Type == "error") {
		c.mu.Lock()
		delete(c.active, env.ID)
		c.mu.Unlock()
	}
	return c.WebsocketConn.WriteJSON(json.RawMessage(b))
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

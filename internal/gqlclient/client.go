// Package gqlclient is a small GraphQL client for tests and benchmarks: POST
// and GET requests, subscriptions over websocket (graphql-transport-ws and
// the legacy graphql-ws protocol, many subscriptions multiplexed on one
// connection) and over SSE. It speaks the wire protocols by hand so that
// tests see exactly what a real client sees.
package gqlclient

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"
)

// Response is a GraphQL response.
type Response struct {
	Data       json.RawMessage `json:"data"`
	Errors     []Error         `json:"errors"`
	HTTPStatus int             `json:"-"`
	Header     http.Header     `json:"-"`
}

// Error is one GraphQL error.
type Error struct {
	Message    string         `json:"message"`
	Path       []any          `json:"path"`
	Extensions map[string]any `json:"extensions"`
}

// Code is extensions.code.
func (e Error) Code() string { s, _ := e.Extensions["code"].(string); return s }

// FirstCode is the code of the first error, or "".
func (r *Response) FirstCode() string {
	if len(r.Errors) == 0 {
		return ""
	}
	return r.Errors[0].Code()
}

// Decode unmarshals data into v.
func (r *Response) Decode(v any) error { return json.Unmarshal(r.Data, v) }

type request struct {
	Query     string         `json:"query"`
	Variables map[string]any `json:"variables,omitempty"`
}

// Post sends a query or mutation as an application/json POST.
func Post(ctx context.Context, endpoint, query string, vars map[string]any) (*Response, error) {
	body, err := json.Marshal(request{Query: query, Variables: vars})
	if err != nil {
		return nil, err
	}
	return PostRaw(ctx, endpoint, body)
}

// PostRaw sends body as it is.
func PostRaw(ctx context.Context, endpoint string, body []byte) (*Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	return do(req)
}

// Get sends a query as a GET request.
func Get(ctx context.Context, endpoint, query string, vars map[string]any) (*Response, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return nil, err
	}
	q := u.Query()
	q.Set("query", query)
	if vars != nil {
		b, _ := json.Marshal(vars)
		q.Set("variables", string(b))
	}
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	return do(req)
}

func do(req *http.Request) (*Response, error) {
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r Response
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("status %d, body %q: %w", resp.StatusCode, b, err)
	}
	r.HTTPStatus, r.Header = resp.StatusCode, resp.Header
	return &r, nil
}

// Protocols.
const (
	TransportWS = "graphql-transport-ws"
	LegacyWS    = "graphql-ws"
)

// Event is one message of a subscription: a payload, an error message, or
// the end of the stream.
type Event struct {
	Response *Response // next / data
	Errors   []Error   // error message (protocol-level)
	Complete bool
}

// Conn is a websocket connection that multiplexes subscriptions.
type Conn struct {
	ws       *websocket.Conn
	protocol string

	mu     sync.Mutex
	subs   map[string]chan Event
	nextID int
	err    error
	done   chan struct{}
	// CloseStatus is the close code the server sent, once done.
	closeStatus websocket.StatusCode
}

type wsMessage struct {
	ID      string          `json:"id,omitempty"`
	Type    string          `json:"type"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

// Dial opens a websocket to endpoint (http:// or ws:// URL) with the
// protocol and completes the connection_init handshake.
func Dial(ctx context.Context, endpoint, protocol string, initPayload map[string]any) (*Conn, error) {
	endpoint = strings.Replace(endpoint, "http://", "ws://", 1)
	ws, resp, err := websocket.Dial(ctx, endpoint, &websocket.DialOptions{Subprotocols: []string{protocol}})
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", endpoint, err)
	}
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	ws.SetReadLimit(64 << 20)
	if ws.Subprotocol() != protocol {
		ws.CloseNow()
		return nil, fmt.Errorf("server chose subprotocol %q, not %q", ws.Subprotocol(), protocol)
	}
	c := &Conn{ws: ws, protocol: protocol, subs: map[string]chan Event{}, done: make(chan struct{})}
	var payload json.RawMessage
	if initPayload != nil {
		payload, _ = json.Marshal(initPayload)
	}
	if err := wsjson.Write(ctx, ws, wsMessage{Type: "connection_init", Payload: payload}); err != nil {
		ws.CloseNow()
		return nil, err
	}
	for {
		var m wsMessage
		if err := wsjson.Read(ctx, ws, &m); err != nil {
			ws.CloseNow()
			return nil, fmt.Errorf("waiting for connection_ack: %w", err)
		}
		if m.Type == "connection_ack" {
			break
		}
		if m.Type == "ka" || m.Type == "ping" || m.Type == "pong" {
			continue
		}
		ws.CloseNow()
		return nil, fmt.Errorf("expected connection_ack, got %q %s", m.Type, m.Payload)
	}
	go c.readLoop()
	return c, nil
}

func (c *Conn) readLoop() {
	defer close(c.done)
	ctx := context.Background()
	for {
		var m wsMessage
		if err := wsjson.Read(ctx, c.ws, &m); err != nil {
			c.mu.Lock()
			c.err = err
			c.closeStatus = websocket.CloseStatus(err)
			for id, ch := range c.subs {
				close(ch)
				delete(c.subs, id)
			}
			c.mu.Unlock()
			return
		}
		switch m.Type {
		case "ping":
			wsjson.Write(ctx, c.ws, wsMessage{Type: "pong"})
			continue
		case "ka", "pong":
			continue
		}
		var ev Event
		switch m.Type {
		case "next", "data":
			var r Response
			if err := json.Unmarshal(m.Payload, &r); err != nil {
				ev.Errors = []Error{{Message: "client: bad payload: " + err.Error()}}
			} else {
				ev.Response = &r
			}
		case "error":
			var errs []Error
			if err := json.Unmarshal(m.Payload, &errs); err != nil {
				var one Error
				json.Unmarshal(m.Payload, &one)
				errs = []Error{one}
			}
			ev.Errors = errs
		case "complete":
			ev.Complete = true
		default:
			continue
		}
		c.mu.Lock()
		ch := c.subs[m.ID]
		if ev.Complete || ev.Errors != nil {
			delete(c.subs, m.ID)
		}
		c.mu.Unlock()
		if ch == nil {
			continue
		}
		ch <- ev // buffered generously; a test that stops reading loses nothing it asked for
		if ev.Complete || ev.Errors != nil {
			close(ch)
		}
	}
}

// Sub is one subscription on a Conn.
type Sub struct {
	ID string
	C  <-chan Event
	c  *Conn
}

// Subscribe starts a subscription.
func (c *Conn) Subscribe(ctx context.Context, query string, vars map[string]any) (*Sub, error) {
	payload, err := json.Marshal(request{Query: query, Variables: vars})
	if err != nil {
		return nil, err
	}
	return c.SubscribeRaw(ctx, payload)
}

// SubscribeRaw starts an operation whose payload ({"query":…,"variables":…})
// is sent exactly as given, for tests that control every byte.
func (c *Conn) SubscribeRaw(ctx context.Context, payload []byte) (*Sub, error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, c.err
	}
	c.nextID++
	id := fmt.Sprint(c.nextID)
	ch := make(chan Event, 16)
	c.subs[id] = ch
	c.mu.Unlock()
	t := "subscribe"
	if c.protocol == LegacyWS {
		t = "start"
	}
	msg := append([]byte(`{"id":"`+id+`","type":"`+t+`","payload":`), payload...)
	msg = append(msg, '}')
	if err := c.ws.Write(ctx, websocket.MessageText, msg); err != nil {
		return nil, err
	}
	return &Sub{ID: id, C: ch, c: c}, nil
}

// Stop ends the subscription from the client side.
func (s *Sub) Stop(ctx context.Context) error {
	t := "complete"
	if s.c.protocol == LegacyWS {
		t = "stop"
	}
	s.c.mu.Lock()
	delete(s.c.subs, s.ID)
	s.c.mu.Unlock()
	return wsjson.Write(ctx, s.c.ws, wsMessage{ID: s.ID, Type: t})
}

// Next returns the next event, or an error when ctx ends or the connection drops.
func (s *Sub) Next(ctx context.Context) (Event, error) {
	select {
	case ev, ok := <-s.C:
		if !ok {
			return Event{}, fmt.Errorf("subscription %s: connection closed: %v", s.ID, s.c.Err())
		}
		return ev, nil
	case <-ctx.Done():
		return Event{}, ctx.Err()
	}
}

// Err is why the connection ended, if it did.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed when the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// CloseStatus is the close code the server sent (-1 if none), valid after Done.
func (c *Conn) CloseStatus() websocket.StatusCode {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeStatus
}

// Close closes the connection normally.
func (c *Conn) Close() error {
	err := c.ws.Close(websocket.StatusNormalClosure, "")
	<-c.done
	return err
}

// CloseNow drops the connection without a close handshake.
func (c *Conn) CloseNow() error {
	err := c.ws.CloseNow()
	<-c.done
	return err
}

// SSE runs one subscription over server-sent events and returns its
// responses until the stream completes or ctx ends.
func SSE(ctx context.Context, endpoint, query string, vars map[string]any) ([]*Response, error) {
	body, _ := json.Marshal(request{Query: query, Variables: vars})
	return SSEBody(ctx, endpoint, body)
}

// SSEBody is SSE with the request body sent exactly as given.
func SSEBody(ctx context.Context, endpoint string, body []byte) ([]*Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("not an event stream (%s): %s", ct, b)
	}
	var out []*Response
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	event := ""
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "event:"):
			event = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
			if event == "complete" {
				return out, nil
			}
		case strings.HasPrefix(line, "data:"):
			var r Response
			if err := json.Unmarshal([]byte(strings.TrimSpace(strings.TrimPrefix(line, "data:"))), &r); err != nil {
				return out, fmt.Errorf("bad SSE data %q: %w", line, err)
			}
			out = append(out, &r)
		}
	}
	if err := sc.Err(); err != nil && !errors.Is(err, context.Canceled) {
		return out, err
	}
	return out, ctx.Err()
}

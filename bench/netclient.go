package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// sourceAddrs is how many loopback source addresses (127.0.0.1 …) the
// clients spread their connections over, so that tens of thousands of
// connections to one server port do not run out of ephemeral ports.
const sourceAddrs = 8

// rotatingDialer dials from 127.0.0.1, 127.0.0.2, … in turn.
type rotatingDialer struct {
	next    atomic.Uint32
	dialers []*net.Dialer
}

func newRotatingDialer() *rotatingDialer {
	r := &rotatingDialer{}
	for i := range sourceAddrs {
		r.dialers = append(r.dialers, &net.Dialer{
			LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i))},
			Timeout:   10 * time.Second,
		})
	}
	return r
}

func (r *rotatingDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return nil, fmt.Errorf("refusing to dial %s: the bench stays on 127.0.0.0/8", addr)
	}
	d := r.dialers[int(r.next.Add(1))%len(r.dialers)]
	return d.DialContext(ctx, network, addr)
}

func newHTTPClient(d *rotatingDialer, conns int) *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			DialContext:         d.DialContext,
			MaxIdleConns:        conns,
			MaxIdleConnsPerHost: conns,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		},
		Timeout: 60 * time.Second,
	}
}

// gqlRequest is a GraphQL request body.
type gqlRequest struct {
	Query     string         `json:"query"`
	Variables map[string]any `json:"variables,omitempty"`
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

type gqlError struct {
	Message    string         `json:"message"`
	Extensions map[string]any `json:"extensions"`
}

type gqlResponse struct {
	Data   json.RawMessage `json:"data"`
	Errors []gqlError      `json:"errors"`
}

// post sends a GraphQL POST and returns its data; a GraphQL error or a
// status other than 200 is an error.
func post(ctx context.Context, hc *http.Client, endpoint string, body []byte) (json.RawMessage, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r gqlResponse
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("HTTP %d: %.200s", resp.StatusCode, b)
	}
	if len(r.Errors) > 0 {
		code, _ := r.Errors[0].Extensions["code"].(string)
		return nil, fmt.Errorf("HTTP %d: %s: %s", resp.StatusCode, code, r.Errors[0].Message)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("HTTP %d: %.200s", resp.StatusCode, b)
	}
	return r.Data, nil
}

// wsConn is a lean graphql-transport-ws client connection: it multiplexes
// subscriptions, answers pings, and stamps every message with the time its
// frame was read, before anything but its envelope is decoded.
type wsConn struct {
	ws   *websocket.Conn
	done chan struct{}
}

// wsHandler receives the messages of one connection, in order, on its
// reading goroutine: typ is next, error or complete.
type wsHandler func(id, typ string, at time.Time, payload json.RawMessage)

type wsMessage struct {
	ID      string          `json:"id,omitempty"`
	Type    string          `json:"type"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

var (
	msgPong = []byte(`{"type":"pong"}`)
	msgInit = []byte(`{"type":"connection_init","payload":{}}`)
)

func dialWS(ctx context.Context, hc *http.Client, endpoint string, on wsHandler) (*wsConn, error) {
	u := "ws" + strings.TrimPrefix(endpoint, "http")
	ws, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPClient: hc, Subprotocols: []string{"graphql-transport-ws"}})
	if err != nil {
		return nil, err
	}
	ws.SetReadLimit(64 << 20)
	if ws.Subprotocol() != "graphql-transport-ws" {
		ws.CloseNow()
		return nil, fmt.Errorf("server chose subprotocol %q", ws.Subprotocol())
	}
	if err := ws.Write(ctx, websocket.MessageText, msgInit); err != nil {
		ws.CloseNow()
		return nil, err
	}
	for {
		_, data, err := ws.Read(ctx)
		if err != nil {
			ws.CloseNow()
			return nil, fmt.Errorf("waiting for connection_ack: %w", err)
		}
		var m wsMessage
		if err := json.Unmarshal(data, &m); err != nil {
			ws.CloseNow()
			return nil, fmt.Errorf("waiting for connection_ack: %w", err)
		}
		if m.Type == "connection_ack" {
			break
		}
		if m.Type == "ping" {
			if err := ws.Write(ctx, websocket.MessageText, msgPong); err != nil {
				ws.CloseNow()
				return nil, err
			}
			continue
		}
		ws.CloseNow()
		return nil, fmt.Errorf("expected connection_ack, got %s", data)
	}
	c := &wsConn{ws: ws, done: make(chan struct{})}
	go c.read(on)
	return c, nil
}

func (c *wsConn) read(on wsHandler) {
	defer close(c.done)
	ctx := context.Background()
	for {
		_, data, err := c.ws.Read(ctx)
		if err != nil {
			return
		}
		at := time.Now()
		var m wsMessage
		if json.Unmarshal(data, &m) != nil {
			continue
		}
		switch m.Type {
		case "ping":
			c.ws.Write(ctx, websocket.MessageText, msgPong)
		case "pong":
		default:
			on(m.ID, m.Type, at, m.Payload)
		}
	}
}

// send writes a prepared message.
func (c *wsConn) send(ctx context.Context, msg []byte) error {
	return c.ws.Write(ctx, websocket.MessageText, msg)
}

// close ends the connection with a close handshake and waits for the reader.
func (c *wsConn) close() {
	if err := c.ws.Close(websocket.StatusNormalClosure, ""); err != nil {
		c.ws.CloseNow()
	}
	<-c.done
}

// parallel runs fn(0..n-1) on at most workers goroutines and returns the
// first error (the others still run).
func parallel(n, workers int, fn func(i int) error) error {
	var (
		next  atomic.Int64
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return first
}

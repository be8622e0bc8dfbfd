// Command worker is an example Rendezvous worker: it takes runs from
// runsToStart (competing with any other worker on the same label), acks
// each, waits for an approval event in a durable step, and finishes the run
// with the approval as its result.
//
//	RENDEZVOUS_URL=http://localhost:8080/query RENDEZVOUS_LABEL=orders go run ./examples/worker
//
// RENDEZVOUS_TOKEN, when set, is sent as a server token. The worker is one
// file and depends only on a websocket library: copy it.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"
)

func main() {
	endpoint := env("RENDEZVOUS_URL", "http://localhost:8080/query")
	label := os.Getenv("RENDEZVOUS_LABEL")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c := &client{endpoint: endpoint, token: os.Getenv("RENDEZVOUS_TOKEN")}
	for ctx.Err() == nil {
		// A dropped connection gives our unacked runs back to the other
		// workers; reconnect and carry on.
		if err := c.work(ctx, label); err != nil && ctx.Err() == nil {
			log.Printf("worker: %v; reconnecting in 1s", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

func env(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

type client struct {
	endpoint, token string
}

const runsToStart = `subscription($label: String) { runsToStart(label: $label, lease: "60s", maxUnacked: 4) { workflowRunId body attempts } }`

// work holds one websocket connection: one runsToStart subscription, and
// one waitForEvent subscription per run in progress, multiplexed.
func (c *client) work(ctx context.Context, label string) error {
	conn, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer conn.close()
	runs := conn.subscribe(runsToStart, map[string]any{"label": nilIfEmpty(label)})
	log.Printf("worker: waiting for runs (label %q)", label)
	var wg sync.WaitGroup
	defer wg.Wait()
	for msg := range runs {
		if msg.err != nil {
			return msg.err
		}
		var got struct {
			RunsToStart struct {
				WorkflowRunID string          `json:"workflowRunId"`
				Body          json.RawMessage `json:"body"`
				Attempts      int             `json:"attempts"`
			} `json:"runsToStart"`
		}
		if err := json.Unmarshal(msg.data, &got); err != nil {
			return fmt.Errorf("decode run: %w", err)
		}
		run := got.RunsToStart.WorkflowRunID
		// Ack first: from now on the run is ours alone. attempt names this
		// hand-over: an ack that fails means our lease passed and another
		// worker has it.
		if err := c.mutate(ctx, `mutation($id: ID!, $attempt: Int) { ackRun(workflowRunId: $id, attempt: $attempt) { workflowRunId } }`,
			map[string]any{"id": run, "attempt": got.RunsToStart.Attempts}); err != nil {
			log.Printf("worker: %s not ours: %v", run, err)
			continue
		}
		log.Printf("worker: started %s", run)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.runWorkflow(ctx, conn, run); err != nil && ctx.Err() == nil {
				// The durable step survives us: whoever resumes the run
				// subscribes to the same step and gets its result.
				log.Printf("worker: %s: %v", run, err)
			}
		}()
	}
	return errors.New("connection closed")
}

// runWorkflow is the workflow itself: wait for approval (a durable step),
// then finish.
func (c *client) runWorkflow(ctx context.Context, conn *wsConn, run string) error {
	wait := conn.subscribe(`subscription($run: ID!, $ev: String!) {
	  waitForEvent(eventId: $ev, workflowRunId: $run, stepName: "approval", timeout: "1d") { eventData timeout }
	}`, map[string]any{"run": run, "ev": "approve-" + run})
	msg, ok := <-wait
	if !ok || msg.err != nil {
		return fmt.Errorf("wait for approval: %v", msg.err)
	}
	var got struct {
		WaitForEvent struct {
			EventData json.RawMessage `json:"eventData"`
			Timeout   bool            `json:"timeout"`
		} `json:"waitForEvent"`
	}
	if err := json.Unmarshal(msg.data, &got); err != nil {
		return err
	}
	state, result := "RUN_SUCCESS", map[string]any{"approval": got.WaitForEvent.EventData}
	if got.WaitForEvent.Timeout {
		state, result = "RUN_FAILED", map[string]any{"error": "no approval within a day"}
	}
	log.Printf("worker: finishing %s as %s", run, state)
	return c.mutate(ctx, `mutation($id: ID!, $state: RunState!, $result: JSON) { finishRun(workflowRunId: $id, state: $state, result: $result) { state } }`,
		map[string]any{"id": run, "state": state, "result": result})
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// mutate POSTs a mutation and returns its first GraphQL error, if any.
func (c *client) mutate(ctx context.Context, query string, vars map[string]any) error {
	body, _ := json.Marshal(map[string]any{"query": query, "variables": vars})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.endpoint, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var out struct {
		Errors []struct {
			Message    string         `json:"message"`
			Extensions map[string]any `json:"extensions"`
		} `json:"errors"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return fmt.Errorf("HTTP %d: %w", resp.StatusCode, err)
	}
	if len(out.Errors) > 0 {
		return fmt.Errorf("%s (%v)", out.Errors[0].Message, out.Errors[0].Extensions["code"])
	}
	return nil
}

// --- a minimal graphql-transport-ws client ---

type message struct {
	data json.RawMessage
	err  error
}

type wsConn struct {
	ws     *websocket.Conn
	cancel context.CancelFunc
	mu     sync.Mutex
	next   int
	subs   map[string]chan message
}

func (c *client) dial(ctx context.Context) (*wsConn, error) {
	url := "ws" + strings.TrimPrefix(c.endpoint, "http")
	ws, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{Subprotocols: []string{"graphql-transport-ws"}})
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", url, err)
	}
	ws.SetReadLimit(16 << 20)
	init := map[string]any{"type": "connection_init"}
	if c.token != "" {
		init["payload"] = map[string]any{"Authorization": "Bearer " + c.token}
	}
	if err := wsjson.Write(ctx, ws, init); err != nil {
		return nil, err
	}
	var ack struct{ Type string }
	if err := wsjson.Read(ctx, ws, &ack); err != nil || ack.Type != "connection_ack" {
		ws.CloseNow()
		return nil, fmt.Errorf("no connection_ack (%q): %v", ack.Type, err)
	}
	rctx, cancel := context.WithCancel(ctx)
	conn := &wsConn{ws: ws, cancel: cancel, subs: map[string]chan message{}}
	go conn.read(rctx)
	return conn, nil
}

func (w *wsConn) subscribe(query string, vars map[string]any) <-chan message {
	w.mu.Lock()
	w.next++
	id := fmt.Sprint(w.next)
	ch := make(chan message, 16)
	w.subs[id] = ch
	w.mu.Unlock()
	err := wsjson.Write(context.Background(), w.ws, map[string]any{"id": id, "type": "subscribe",
		"payload": map[string]any{"query": query, "variables": vars}})
	if err != nil {
		w.end(id, err)
	}
	return ch
}

func (w *wsConn) end(id string, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if ch, ok := w.subs[id]; ok {
		if err != nil {
			ch <- message{err: err}
		}
		close(ch)
		delete(w.subs, id)
	}
}

func (w *wsConn) read(ctx context.Context) {
	var fail error
	defer func() {
		w.mu.Lock()
		ids := make([]string, 0, len(w.subs))
		for id := range w.subs {
			ids = append(ids, id)
		}
		w.mu.Unlock()
		for _, id := range ids {
			w.end(id, fail)
		}
	}()
	for {
		var m struct {
			ID      string          `json:"id"`
			Type    string          `json:"type"`
			Payload json.RawMessage `json:"payload"`
		}
		if err := wsjson.Read(ctx, w.ws, &m); err != nil {
			fail = fmt.Errorf("connection: %w", err)
			return
		}
		switch m.Type {
		case "ping":
			wsjson.Write(ctx, w.ws, map[string]any{"type": "pong"})
		case "next":
			var p struct {
				Data   json.RawMessage   `json:"data"`
				Errors []json.RawMessage `json:"errors"`
			}
			json.Unmarshal(m.Payload, &p)
			w.mu.Lock()
			ch := w.subs[m.ID]
			w.mu.Unlock()
			if ch != nil {
				if len(p.Errors) > 0 {
					w.end(m.ID, fmt.Errorf("%s", p.Errors[0]))
					continue
				}
				ch <- message{data: p.Data}
			}
		case "error":
			w.end(m.ID, fmt.Errorf("%s", m.Payload))
		case "complete":
			w.end(m.ID, nil)
		}
	}
}

func (w *wsConn) close() {
	w.ws.Close(websocket.StatusNormalClosure, "bye")
	w.cancel()
}

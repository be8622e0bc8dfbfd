package main

// Baselines measured in the same run: an in-memory server that answers the
// same requests without GraphQL or a database, and bare INSERT+COMMITs.

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// memServer is the delivery baseline: the notify → subscriber path with
// nothing in between. It speaks just enough graphql-transport-ws for the
// bench's client (connection_init, subscribe, ping, complete): a subscribe
// registers a channel under the event id of its variables, one goroutine
// per subscription waits on it and writes the message, and a POST naming
// an event id pushes the message on the channels of its subscribers. The
// client code and the measurement are the same as against Rendezvous.
// Other POSTs (a targeted notify nobody waits for, { __typename }) are
// answered at once, which makes it the bare-HTTP baseline of CPU time too.
type memServer struct {
	srv      *http.Server
	endpoint string

	mu      sync.Mutex
	subs    map[string]map[*memSub]struct{} // by event id
	waiting atomic.Int64
	msgs    atomic.Int64
}

type memSub struct {
	id, event string
	ch        chan []byte
}

func startMemServer() (*memServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &memServer{subs: map[string]map[*memSub]struct{}{}, endpoint: "http://" + ln.Addr().String() + "/query"}
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go s.srv.Serve(ln)
	return s, nil
}

func (s *memServer) close() { s.srv.Close() }

func (s *memServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") != "" {
		s.serveWS(w, r)
		return
	}
	var req struct {
		Variables map[string]json.RawMessage `json:"variables"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 4<<20)).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	var event string
	json.Unmarshal(req.Variables["e"], &event)
	if event == "" {
		io.WriteString(w, `{"data":{"__typename":"Query"}}`)
		return
	}
	s.mu.Lock()
	subs := s.subs[event]
	delete(s.subs, event)
	s.mu.Unlock()
	s.waiting.Add(-int64(len(subs)))
	msgID := "msg_mem" + strconv.FormatInt(s.msgs.Add(1), 10)
	data := req.Variables["d"]
	if len(data) == 0 {
		data = json.RawMessage("null")
	}
	for sub := range subs {
		sub.ch <- mustJSON(wsMessage{ID: sub.id, Type: "next", Payload: mustJSON(map[string]any{"data": map[string]any{"waitForEvent": map[string]any{
			"eventId": event, "eventData": data, "waiterId": "wtr_mem", "messageId": msgID,
		}}})})
	}
	var b strings.Builder
	b.WriteString(`{"data":{"notify":{"notifyResponse":[`)
	for i := range len(subs) {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`{"messageId":"` + msgID + `"}`)
	}
	b.WriteString(`],"lookback":`)
	if _, targeted := req.Variables["r"]; targeted && len(subs) == 0 {
		b.WriteString(`{"id":"lbe_mem"}`)
	} else {
		b.WriteString(`null`)
	}
	b.WriteString(`}}}`)
	io.WriteString(w, b.String())
}

func (s *memServer) serveWS(w http.ResponseWriter, r *http.Request) {
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"graphql-transport-ws"}})
	if err != nil {
		return
	}
	defer ws.CloseNow()
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	mine := map[string]*memSub{}
	defer func() {
		for _, sub := range mine {
			s.unregister(sub)
		}
	}()
	for {
		_, data, err := ws.Read(ctx)
		if err != nil {
			return
		}
		var m wsMessage
		if json.Unmarshal(data, &m) != nil {
			continue
		}
		switch m.Type {
		case "connection_init":
			ws.Write(ctx, websocket.MessageText, []byte(`{"type":"connection_ack"}`))
		case "ping":
			ws.Write(ctx, websocket.MessageText, msgPong)
		case "subscribe":
			var p struct {
				Variables struct {
					E string `json:"e"`
				} `json:"variables"`
			}
			json.Unmarshal(m.Payload, &p)
			sub := &memSub{id: m.ID, event: p.Variables.E, ch: make(chan []byte, 1)}
			mine[m.ID] = sub
			s.mu.Lock()
			if s.subs[sub.event] == nil {
				s.subs[sub.event] = map[*memSub]struct{}{}
			}
			s.subs[sub.event][sub] = struct{}{}
			s.mu.Unlock()
			s.waiting.Add(1)
			go func() {
				select {
				case msg := <-sub.ch:
					ws.Write(ctx, websocket.MessageText, msg)
					ws.Write(ctx, websocket.MessageText, mustJSON(wsMessage{ID: sub.id, Type: "complete"}))
				case <-ctx.Done():
				}
			}()
		case "complete":
			if sub := mine[m.ID]; sub != nil {
				delete(mine, m.ID)
				s.unregister(sub)
			}
		}
	}
}

func (s *memServer) unregister(sub *memSub) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if set := s.subs[sub.event]; set != nil {
		if _, ok := set[sub]; ok {
			delete(set, sub)
			s.waiting.Add(-1)
			if len(set) == 0 {
				delete(s.subs, sub.event)
			}
		}
	}
}

// ---- bare INSERT+COMMIT

const baselineTable = "bench_insert_baseline"

// insertBaseline is a table with the columns of a lookback event and no
// secondary index, written to with database/sql directly.
type insertBaseline struct {
	db *sql.DB
}

func newInsertBaseline(ctx context.Context, db *sql.DB, dialect string) (*insertBaseline, error) {
	ddl := `CREATE TABLE ` + baselineTable + ` (
		seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
		run_id VARBINARY(300) NOT NULL,
		event_id VARBINARY(256) NOT NULL,
		event_data LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
		message_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
		created_at DATETIME(6) NOT NULL
	) ENGINE=InnoDB`
	if dialect == "sqlite" {
		ddl = `CREATE TABLE ` + baselineTable + ` (
			seq INTEGER PRIMARY KEY AUTOINCREMENT,
			run_id TEXT NOT NULL,
			event_id TEXT NOT NULL,
			event_data BLOB NULL,
			message_id TEXT NOT NULL,
			created_at TEXT NOT NULL
		)`
	}
	if _, err := db.ExecContext(ctx, ddl); err != nil {
		return nil, fmt.Errorf("create %s: %w", baselineTable, err)
	}
	return &insertBaseline{db: db}, nil
}

func (b *insertBaseline) insert(ctx context.Context, n int64) error {
	tx, err := b.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO `+baselineTable+` (run_id, event_id, event_data, message_id, created_at) VALUES (?, ?, ?, ?, ?)`,
		"wfr_baseline-"+strconv.FormatInt(n%1024, 10), "tp-evt", []byte(eventData),
		"msg_baseline"+strconv.FormatInt(n, 10), time.Now().UTC().Format("2006-01-02 15:04:05.000000"))
	if err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// throughput runs conns goroutines inserting for d; it returns the rows
// committed and the time taken.
func (b *insertBaseline) throughput(ctx context.Context, conns int, d time.Duration) (int64, time.Duration, error) {
	var (
		n     atomic.Int64
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	t0 := time.Now()
	stopAt := t0.Add(d)
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stopAt) && ctx.Err() == nil {
				if err := b.insert(ctx, n.Load()); err != nil {
					mu.Lock()
					first = errors.Join(first, err)
					mu.Unlock()
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	return n.Load(), time.Since(t0), first
}

// latency times count sequential inserts on one connection.
func (b *insertBaseline) latency(ctx context.Context, count int) (latency, error) {
	lat := make([]time.Duration, 0, count)
	for i := range count {
		t := time.Now()
		if err := b.insert(ctx, int64(i)); err != nil {
			return latency{}, err
		}
		lat = append(lat, time.Since(t))
	}
	return summarize(lat), nil
}

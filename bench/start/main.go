// Command start measures how fast Rendezvous starts a workflow (issue 12),
// each figure beside a baseline measured in the same run:
//
//   - trigger → worker received (runsToStart), p50/p99, beside an in-memory
//     relay (an HTTP POST whose handler writes to a websocket, no database);
//
//   - trigger → HTTP receiver received (dispatch through the outbox),
//     p50/p99, beside the same relay;
//
//   - outbox delivery throughput (runs triggered with dispatch and delivered
//     to a local receiver, per second) beside bare INSERT+COMMIT/s on the
//     same database with as many connections (target: at least 0.25x).
//
//     go run ./bench/start            # MariaDB at 127.0.0.1:3306 (root), a throwaway database
//     go run ./bench/start -quick     # smaller sizes
//
// It creates and drops its own database and sends traffic only to 127.0.0.1.
package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	_ "github.com/go-sql-driver/mysql"

	"rendezvous/internal/gqlclient"
	"rendezvous/service"
)

func main() {
	log.SetFlags(log.Ltime)
	log.SetPrefix("bench/start: ")
	quick := flag.Bool("quick", false, "smaller sizes")
	admin := flag.String("admin-dsn", "root@tcp(127.0.0.1:3306)/", "MySQL DSN (go-sql-driver form) to create the throwaway database with")
	flag.Parse()
	n, tpFor, conns := 500, 10*time.Second, 16
	if *quick {
		n, tpFor = 100, 3*time.Second
	}
	if err := run(*admin, n, tpFor, conns); err != nil {
		log.Fatal(err)
	}
}

func run(adminDSN string, n int, tpFor time.Duration, conns int) error {
	ctx := context.Background()
	adm, err := sql.Open("mysql", adminDSN)
	if err != nil {
		return err
	}
	defer adm.Close()
	var b [6]byte
	rand.Read(b[:])
	name := "rdv_bench_start_" + hex.EncodeToString(b[:])
	if _, err := adm.ExecContext(ctx, "CREATE DATABASE "+name+" CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"); err != nil {
		return fmt.Errorf("create database: %w", err)
	}
	defer adm.Exec("DROP DATABASE IF EXISTS " + name)
	var version string
	adm.QueryRow("SELECT VERSION()").Scan(&version)

	// The receiver of dispatches: it notes when each run arrived.
	var (
		mu      sync.Mutex
		arrived = map[string]time.Time{}
		count   atomic.Int64
	)
	rcv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		at := time.Now()
		body, _ := io.ReadAll(r.Body)
		var p struct {
			WorkflowRunID string `json:"workflowRunId"`
		}
		json.Unmarshal(body, &p)
		mu.Lock()
		if _, ok := arrived[p.WorkflowRunID]; !ok {
			arrived[p.WorkflowRunID] = at
			count.Add(1)
		}
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	defer rcv.Close()

	cfg := service.Config{
		DatabaseURL: "mysql://" + strings.TrimSuffix(strings.Replace(adminDSN, "@tcp(", "@", 1), ")/") + "/" + name,
		Logger:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	cfg.Outbound.Allowed = rcv.URL + "/"
	cfg.Outbound.SigningSecrets = []string{"bench-signing-secret-0123456789"}
	cfg.Outbound.Delivery.Poll = 200 * time.Millisecond
	cfg.Outbound.Delivery.Concurrency = 32
	svc, err := service.New(ctx, cfg)
	if err != nil {
		return err
	}
	svc.Start(ctx)
	api := httptest.NewServer(svc.Handler)
	defer func() {
		api.Close()
		svc.Close()
	}()
	endpoint := api.URL + "/query"

	relay, err := relayLatency(n)
	if err != nil {
		return err
	}
	worker, err := workerLatency(ctx, endpoint, n)
	if err != nil {
		return err
	}
	dispatch, err := dispatchLatency(ctx, endpoint, rcv.URL, n, func(id string) (time.Time, bool) {
		mu.Lock()
		defer mu.Unlock()
		t, ok := arrived[id]
		return t, ok
	})
	if err != nil {
		return err
	}
	before := count.Load()
	triggered, elapsed, triggerRate, err := dispatchThroughput(ctx, endpoint, rcv.URL, conns, tpFor, func() int64 { return count.Load() - before })
	if err != nil {
		return err
	}
	outboxRate := float64(triggered) / elapsed.Seconds()
	bare, err := insertThroughput(ctx, adminDSN+name, conns, tpFor)
	if err != nil {
		return err
	}
	fmt.Printf("\nRendezvous start benchmark on MariaDB/MySQL %s, %d sequential runs per latency figure, %d connections for %s of throughput\n\n", version, n, conns, tpFor)
	fmt.Println("| figure | result | baseline (same run) | target | met |")
	fmt.Println("|---|---|---|---|---|")
	fmt.Printf("| trigger → worker received (runsToStart), p50 / p99 | %s / %s | in-memory relay (HTTP POST → websocket): %s / %s | | |\n", ms(worker[0]), ms(worker[1]), ms(relay[0]), ms(relay[1]))
	fmt.Printf("| trigger → HTTP receiver received (dispatch), p50 / p99 | %s / %s | in-memory relay: %s / %s | | |\n", ms(dispatch[0]), ms(dispatch[1]), ms(relay[0]), ms(relay[1]))
	ratio := outboxRate / bare
	met := "yes"
	if ratio < 0.25 {
		met = "**NO**"
	}
	fmt.Printf("| outbox delivery to a local receiver (%d due at once), /s | %.0f/s (in %s) | bare INSERT+COMMIT: %.0f/s | ≥ 0.25x | %s (%.2fx) |\n", triggered, outboxRate, elapsed.Round(time.Millisecond), bare, met, ratio)
	fmt.Printf("| trigger with dispatch (run + outbox row in one transaction, through GraphQL), /s | %.0f/s | bare INSERT+COMMIT: %.0f/s | | (%.2fx) |\n", triggerRate, bare, triggerRate/bare)
	return nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }

func pct(d []time.Duration) [2]time.Duration {
	slices.Sort(d)
	return [2]time.Duration{d[len(d)*50/100], d[min(len(d)-1, len(d)*99/100)]}
}

// relayLatency: POST to a handler that writes the body to a websocket
// client; the time from before the POST to the client's receipt.
func relayLatency(n int) ([2]time.Duration, error) {
	conns := make(chan *websocket.Conn, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ws" {
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			conns <- c
			<-r.Context().Done()
			return
		}
		body, _ := io.ReadAll(r.Body)
		c := <-conns
		c.Write(r.Context(), websocket.MessageText, body)
		conns <- c
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	ctx := context.Background()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws", nil)
	if err != nil {
		return [2]time.Duration{}, err
	}
	defer c.CloseNow()
	var d []time.Duration
	for i := range n {
		start := time.Now()
		done := make(chan struct{})
		go func() {
			c.Read(ctx)
			d = append(d, time.Since(start))
			close(done)
		}()
		resp, err := http.Post(srv.URL+"/t", "application/json", strings.NewReader(fmt.Sprintf(`{"i":%d}`, i)))
		if err != nil {
			return [2]time.Duration{}, err
		}
		resp.Body.Close()
		<-done
	}
	return pct(d), nil
}

// workerLatency: one runsToStart worker; runs triggered one at a time; the
// time from before the trigger to the worker's receipt. The worker acks
// each run before the next trigger.
func workerLatency(ctx context.Context, endpoint string, n int) ([2]time.Duration, error) {
	c, err := gqlclient.Dial(ctx, endpoint, gqlclient.TransportWS, nil)
	if err != nil {
		return [2]time.Duration{}, err
	}
	defer c.CloseNow()
	sub, err := c.Subscribe(ctx, `subscription { runsToStart(label: "bench", maxUnacked: 1) { workflowRunId attempts } }`, nil)
	if err != nil {
		return [2]time.Duration{}, err
	}
	var d []time.Duration
	for i := range n {
		id := fmt.Sprintf("bw-%d", i)
		start := time.Now()
		r, err := gqlclient.Post(ctx, endpoint, `mutation($id: ID) { trigger(workflowRunId: $id, label: "bench") { workflowRunId } }`, map[string]any{"id": id})
		if err != nil || len(r.Errors) > 0 {
			return [2]time.Duration{}, fmt.Errorf("trigger: %v %v", err, r)
		}
		ev, err := sub.Next(ctx)
		if err != nil {
			return [2]time.Duration{}, err
		}
		d = append(d, time.Since(start))
		if !strings.Contains(string(ev.Response.Data), id) {
			return [2]time.Duration{}, fmt.Errorf("worker got %s, want %s", ev.Response.Data, id)
		}
		if r, err := gqlclient.Post(ctx, endpoint, `mutation($id: ID!) { ackRun(workflowRunId: $id, attempt: 1) { workflowRunId } }`, map[string]any{"id": id}); err != nil || len(r.Errors) > 0 {
			return [2]time.Duration{}, fmt.Errorf("ack: %v %v", err, r)
		}
	}
	return pct(d), nil
}

func dispatchLatency(ctx context.Context, endpoint, url string, n int, arrivedAt func(string) (time.Time, bool)) ([2]time.Duration, error) {
	var d []time.Duration
	for i := range n {
		id := fmt.Sprintf("bd-%d", i)
		start := time.Now()
		r, err := gqlclient.Post(ctx, endpoint, `mutation($id: ID, $d: DispatchInput) { trigger(workflowRunId: $id, dispatch: $d) { workflowRunId } }`,
			map[string]any{"id": id, "d": map[string]any{"url": url + "/run"}})
		if err != nil || len(r.Errors) > 0 {
			return [2]time.Duration{}, fmt.Errorf("trigger: %v %v", err, r)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			if at, ok := arrivedAt("wfr_" + id); ok {
				d = append(d, at.Sub(start))
				break
			}
			if time.Now().After(deadline) {
				return [2]time.Duration{}, fmt.Errorf("run %s not delivered in 10s", id)
			}
			time.Sleep(100 * time.Microsecond) // polling the receiver's record, not waiting for an event
		}
	}
	return pct(d), nil
}

// dispatchThroughput fills the outbox, then measures its delivery alone:
// conns clients trigger runs with dispatch for d, each with the delay that
// makes every one due at the same moment (d + 1s after the start); the
// figure is the runs over the time from that moment to the last delivery.
// It also returns the trigger rate (runs with dispatch written per second).
func dispatchThroughput(ctx context.Context, endpoint, url string, conns int, d time.Duration, delivered func() int64) (int64, time.Duration, float64, error) {
	start := time.Now()
	due := start.Add(d + time.Second)
	var total atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; time.Since(start) < d; k++ {
				delay := fmt.Sprintf("%dms", max(1, time.Until(due).Milliseconds()))
				r, err := gqlclient.Post(ctx, endpoint, `mutation($id: ID, $d: DispatchInput) { trigger(workflowRunId: $id, dispatch: $d) { workflowRunId } }`,
					map[string]any{"id": fmt.Sprintf("bt-%d-%d", c, k), "d": map[string]any{"url": url + "/run", "delay": delay}})
				if err != nil || len(r.Errors) > 0 {
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%v %v", err, r))
					return
				}
				total.Add(1)
			}
		}()
	}
	wg.Wait()
	triggerRate := float64(total.Load()) / time.Since(start).Seconds()
	if e := firstErr.Load(); e != nil {
		return 0, 0, 0, fmt.Errorf("trigger: %v", e)
	}
	if early := delivered(); early > 0 {
		return 0, 0, 0, fmt.Errorf("%d delivered before they were due", early)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for delivered() < total.Load() {
		if time.Now().After(deadline) {
			return 0, 0, 0, fmt.Errorf("%d of %d delivered after 2 minutes", delivered(), total.Load())
		}
		time.Sleep(time.Millisecond) // polling the receiver's count
	}
	return total.Load(), time.Since(due), triggerRate, nil
}

// insertThroughput: conns goroutines each INSERT one row and COMMIT, for d.
func insertThroughput(ctx context.Context, dsn string, conns int, d time.Duration) (float64, error) {
	db, err := sql.Open("mysql", dsn)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	db.SetMaxOpenConns(conns)
	if _, err := db.ExecContext(ctx, `CREATE TABLE bench_bare (seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, run_id VARBINARY(300) NOT NULL,
		body LONGTEXT NOT NULL, created_at DATETIME(6) NOT NULL) ENGINE=InnoDB`); err != nil {
		return 0, err
	}
	start := time.Now()
	var total atomic.Int64
	var wg sync.WaitGroup
	for c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; time.Since(start) < d; k++ {
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					return
				}
				if _, err := tx.ExecContext(ctx, `INSERT INTO bench_bare (run_id, body, created_at) VALUES (?, ?, ?)`,
					fmt.Sprintf("bare-%d-%d", c, k), `{"workflowRunId":"x"}`, time.Now().UTC().Format("2006-01-02 15:04:05.000000")); err != nil {
					tx.Rollback()
					return
				}
				if tx.Commit() == nil {
					total.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return float64(total.Load()) / time.Since(start).Seconds(), nil
}

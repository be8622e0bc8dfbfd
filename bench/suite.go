package main

// One database's run: set up a fresh database and the service on it, run
// the phases, tear everything down.

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	_ "github.com/glebarez/go-sqlite" // driver "sqlite", for the bench's own SQLite connections
	"github.com/go-sql-driver/mysql"

	"rendezvous/service"
)

const defaultMySQL = "mysql://root@127.0.0.1:3306/"

// Run and event names of the phases.
const (
	latPrefix = "benchlat-" // runs of the one-client latency phases
	latEvent  = "lat-evt"
	latRuns   = 64
	tpPrefix  = "benchtp-" // runs of the throughput phase, tpRuns per client
	tpEvent   = "tp-evt"
	tpRuns    = 64
	warmups   = 100
)

type suite struct {
	opts   options
	sz     sizes
	kind   string // mysql or sqlite
	client *clientHandle
	mem    *memServer
	prof   *profiler
	peer   *peerRun // measured once per bench run, by the first suite that runs phase peer

	label    string // MariaDB 10.11.19, SQLite
	dbURL    string
	db       *sql.DB // the bench's own connections: counts, seeding
	baseDB   *sql.DB // where the bare INSERT baseline writes
	dbPID    int     // the local database server's process, 0 if unknown
	svc      *service.Service
	endpoint string
	cleanups []func()

	res   results
	cur   string // the phase running
	errs  map[string]error
	notes map[string][]string // per phase: trouble that did not stop it
}

type results struct {
	insertRate  float64
	insertN     int64
	insertDBCPU time.Duration // database server CPU over the insert throughput run
	insertLat   latency
	latEmpty    reply
	latMem      reply   // the same requests, one client, to the in-memory handler
	insertStmts float64 // statements the database server ran per bare insert
	tpStmts     float64 // … per notify
	tp          reply
	tpCPU       time.Duration // this process
	tpDBCPU     time.Duration
	memTP       reply
	memTPCPU    time.Duration
	seedTook    time.Duration
	// purge: the latency notifies with the backlog in place, then while
	// the retention pass purges it.
	purgeSeedTook   time.Duration
	latNoPurge      reply
	latPurge        reply
	purge           purgeOutcome
	purgeMeasured   time.Duration // from the purge's start to the end of the measured notifies
	purgeEndedFirst bool          // the purge was over before the measured notifies
	latFull         reply
	idle            memDelta
	delivery        reply
	deliveryGC      gcWindow // our server process over the delivery window
	deliveryBase    reply
	mux             memDelta
	fan             []fanResult
	cpu             []cpuUse // the timed windows
}

type fanResult struct {
	perConn   int
	got, base reply
}

type memSnap struct {
	rss, heap, stacks uint64 // VmRSS; Go heap in use; goroutine stacks
	goroutines        int
}

type memDelta struct {
	n             int
	before, after memSnap
}

func (s *suite) run(ctx context.Context) []row {
	s.errs, s.notes = map[string]error{}, map[string][]string{}
	defer s.teardown()
	if err := s.setup(ctx); err != nil {
		log.Printf("[%s] setup failed: %v", s.kind, err)
		s.errs["setup"] = err
		return s.rows()
	}
	s.phase(ctx, "baseline", s.phaseInsertBaseline)
	s.phase(ctx, "latency", s.phaseLatency)
	s.phase(ctx, "throughput", s.phaseThroughput)
	s.phase(ctx, "growth", s.phaseGrowth)
	s.phase(ctx, "purge", s.phasePurge)
	s.phase(ctx, "idle", s.phaseIdle)
	s.phase(ctx, "peer", s.phasePeer)
	s.phase(ctx, "mux", s.phaseMux)
	s.phase(ctx, "fanout", s.phaseFanOut)
	return s.rows()
}

// ran says whether the phase is part of this run (-only).
func (s *suite) ran(name string) bool { return len(s.opts.Only) == 0 || s.opts.Only[name] }

func (s *suite) phase(ctx context.Context, name string, fn func(context.Context) error) {
	if s.errs["setup"] != nil || !s.ran(name) {
		return
	}
	if err := ctx.Err(); err != nil {
		s.errs[name] = err
		return
	}
	log.Printf("[%s] %s …", s.label, name)
	s.cur = name
	s.prof.begin(name)
	t := time.Now()
	err := fn(ctx)
	s.prof.end(name)
	if err != nil {
		s.errs[name] = err
		log.Printf("[%s] %s FAILED after %s: %v", s.label, name, time.Since(t).Round(time.Millisecond), err)
		return
	}
	log.Printf("[%s] %s done in %s", s.label, name, time.Since(t).Round(time.Millisecond))
}

// ---- set-up and tear-down

func (s *suite) setup(ctx context.Context) error {
	switch s.kind {
	case "mysql":
		if err := s.setupMySQL(ctx); err != nil {
			return err
		}
	case "sqlite":
		if err := s.setupSQLite(); err != nil {
			return err
		}
	}
	level := slog.LevelError
	if s.opts.Verbose {
		level = slog.LevelWarn
	}
	cfg := service.Config{
		DatabaseURL:   s.dbURL,
		ShutdownGrace: 10 * time.Second,
		Logger:        slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	cfg.HTTP.RateLimit = 0 // off: the bench is one caller sending thousands per second
	// The retention loop purges once at start (an empty database) and then
	// not again: the purge phase runs its pass itself, when it measures.
	cfg.Engine.PurgeInterval = 24 * time.Hour
	cfg.HTTP.MaxSubscriptionsPerConnection = 100000
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	svc, err := service.New(sctx, cfg)
	if err != nil {
		return fmt.Errorf("start service: %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		svc.Close()
		return err
	}
	serveCtx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- svc.Serve(serveCtx, ln) }()
	s.svc, s.endpoint = svc, "http://"+ln.Addr().String()+"/query"
	s.cleanups = append(s.cleanups, func() {
		stop()
		select {
		case err := <-served:
			if err != nil {
				log.Printf("[%s] service stopped with: %v", s.label, err)
			}
		case <-time.After(30 * time.Second):
			log.Printf("[%s] service did not stop within 30s", s.label)
		}
	})
	if s.kind == "sqlite" {
		// The service created the file; the bench's own connection comes second.
		if s.db, err = openSQLite(s.sqlitePath()); err != nil {
			return err
		}
		s.cleanups = append(s.cleanups, func() { s.db.Close() })
	}
	// The runs the notify phases target.
	for _, c := range []command{
		{Op: "trigger", Endpoint: s.endpoint, Prefix: latPrefix, Clients: 1, Runs: latRuns},
		{Op: "trigger", Endpoint: s.endpoint, Prefix: tpPrefix, Clients: s.sz.ThroughputClients, Runs: tpRuns},
	} {
		if _, err := s.client.do(ctx, c); err != nil {
			return err
		}
	}
	return nil
}

func (s *suite) teardown() {
	for i := len(s.cleanups) - 1; i >= 0; i-- {
		s.cleanups[i]()
	}
}

func (s *suite) setupMySQL(ctx context.Context) error {
	u, err := url.Parse(s.opts.DatabaseURL)
	if err != nil || u.Scheme != "mysql" {
		return fmt.Errorf("-database-url %q: want mysql://user:pass@host:port/[database]", s.opts.DatabaseURL)
	}
	admin, err := sql.Open("mysql", mysqlDSN(u, ""))
	if err != nil {
		return err
	}
	defer admin.Close()
	var version string
	if err := admin.QueryRowContext(ctx, "SELECT VERSION()").Scan(&version); err != nil {
		return fmt.Errorf("connect to %s: %w", u.Host, err)
	}
	s.label = "MySQL " + strings.SplitN(version, "-", 2)[0]
	if strings.Contains(version, "MariaDB") {
		s.label = "MariaDB " + strings.SplitN(version, "-", 2)[0]
	}
	name := strings.TrimPrefix(u.Path, "/")
	if name == "" {
		var b [6]byte
		rand.Read(b[:])
		name = "rdv_bench_" + hex.EncodeToString(b[:])
		if _, err := admin.ExecContext(ctx, "CREATE DATABASE "+name+" CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"); err != nil {
			return fmt.Errorf("create database %s: %w", name, err)
		}
		log.Printf("[%s] created database %s", s.label, name)
		s.cleanups = append(s.cleanups, func() {
			admin, err := sql.Open("mysql", mysqlDSN(u, ""))
			if err == nil {
				_, err = admin.Exec("DROP DATABASE IF EXISTS " + name)
				admin.Close()
			}
			if err != nil {
				log.Printf("[%s] DROP DATABASE %s: %v", s.label, name, err)
				return
			}
			log.Printf("[%s] dropped database %s", s.label, name)
		})
	} else {
		var tables int
		if err := admin.QueryRowContext(ctx, "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = ?", name).Scan(&tables); err != nil {
			return err
		}
		if tables > 0 {
			return fmt.Errorf("database %s has %d tables: the bench writes a million rows and wants an empty database (or none named, to create its own)", name, tables)
		}
	}
	du := *u
	du.Path = "/" + name
	s.dbURL = du.String()
	if s.db, err = sql.Open("mysql", mysqlDSN(u, name)); err != nil {
		return err
	}
	s.db.SetMaxOpenConns(32)
	s.db.SetMaxIdleConns(32)
	s.baseDB = s.db
	s.cleanups = append(s.cleanups, func() { s.db.Close() })
	if host := u.Hostname(); host == "localhost" || net.ParseIP(host) != nil && net.ParseIP(host).IsLoopback() {
		port, _ := strconv.Atoi(u.Port())
		if port == 0 {
			port = 3306
		}
		s.dbPID = listenerPID(port, "mariadbd", "mysqld")
	}
	return nil
}

// mysqlDSN is a go-sql-driver DSN for the server of u and database name,
// with the session settings the service uses (UTC, client-side parameters).
func mysqlDSN(u *url.URL, name string) string {
	cfg := mysql.NewConfig()
	cfg.Net, cfg.Addr = "tcp", u.Host
	if u.Port() == "" {
		cfg.Addr = u.Hostname() + ":3306"
	}
	if u.User != nil {
		cfg.User = u.User.Username()
		cfg.Passwd, _ = u.User.Password()
	}
	cfg.DBName = name
	cfg.ParseTime = true
	cfg.Loc = time.UTC
	cfg.InterpolateParams = true
	cfg.Params = map[string]string{"time_zone": "'+00:00'"}
	cfg.Timeout = 5 * time.Second
	return cfg.FormatDSN()
}

func (s *suite) sqlitePath() string { return strings.TrimPrefix(s.dbURL, "sqlite://") }

func (s *suite) setupSQLite() error {
	dir, err := os.MkdirTemp("", "rdv-bench-")
	if err != nil {
		return err
	}
	s.cleanups = append(s.cleanups, func() { os.RemoveAll(dir) })
	s.label = "SQLite"
	s.dbURL = "sqlite://" + filepath.Join(dir, "rendezvous.db")
	// The baseline writes to a file of its own with the service's pragmas,
	// on one connection (SQLite has one writer, and so does the service).
	if s.baseDB, err = openSQLite(filepath.Join(dir, "baseline.db")); err != nil {
		return err
	}
	s.cleanups = append(s.cleanups, func() { s.baseDB.Close() })
	return nil
}

func openSQLite(path string) (*sql.DB, error) {
	db, err := sql.Open("sqlite", path+"?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)")
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	return db, db.Ping()
}

// ---- waiting for the server to catch up

// waitWaiting waits until want waiters on event ids matching like (a LIKE
// pattern; exact when it has no %) are WAITING in the database: that is
// when the server has registered the subscriptions the client sent.
func (s *suite) waitWaiting(ctx context.Context, like string, want int, set string, patience time.Duration) error {
	q := "SELECT COUNT(*) FROM waiters WHERE state = 'WAITING' AND event_id LIKE ?"
	if !strings.Contains(like, "%") {
		q = "SELECT COUNT(*) FROM waiters WHERE state = 'WAITING' AND event_id = ?"
	}
	err := waitCount(ctx, want, patience, func() (int, error) {
		var n int
		err := s.db.QueryRowContext(ctx, q, like).Scan(&n)
		return n, err
	}, func() string { return s.setStatus(ctx, set) })
	if err == nil && set != "" && want > 0 {
		if r, err := s.client.do(ctx, command{Op: "status", Set: set}); err == nil && r.Retried > 0 {
			note := fmt.Sprintf("%s of the %s subscriptions of %s were refused with SERVICE_UNAVAILABLE (\"try again\") and subscribed again", fmtInt(r.Retried), fmtInt(want), set)
			log.Printf("[%s]   %s", s.label, note)
			s.notes[s.cur] = append(s.notes[s.cur], note)
		}
	}
	return err
}

func (s *suite) waitMem(ctx context.Context, want int, set string) error {
	return waitCount(ctx, want, time.Minute, func() (int, error) { return int(s.mem.waiting.Load()), nil },
		func() string { return s.setStatus(ctx, set) })
}

func (s *suite) setStatus(ctx context.Context, set string) string {
	if set == "" {
		return ""
	}
	r, err := s.client.do(ctx, command{Op: "status", Set: set})
	if err != nil {
		return "; " + err.Error()
	}
	return fmt.Sprintf("; the client saw %d messages, %d errors (first: %s)", r.OK, r.Errors, r.FirstError)
}

// waitCount polls until count() == want; it gives up when the count has not
// moved for patience.
func waitCount(ctx context.Context, want int, patience time.Duration, count func() (int, error), why func() string) error {
	last, moved := -1, time.Now()
	for {
		n, err := count()
		if err != nil {
			return err
		}
		if n == want {
			return nil
		}
		if n != last {
			last, moved = n, time.Now()
		}
		if time.Since(moved) > patience {
			return fmt.Errorf("stuck at %d, not %d, for %s%s", n, want, patience, why())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// settle waits until the number of goroutines has stopped changing.
func settle() {
	prev := runtime.NumGoroutine()
	for range 40 {
		time.Sleep(250 * time.Millisecond)
		n := runtime.NumGoroutine()
		if n == prev {
			return
		}
		prev = n
	}
}

// questions is the database server's count of client statements (MySQL
// only; other clients of the same server count too).
func (s *suite) questions(ctx context.Context) int64 {
	if s.kind != "mysql" {
		return 0
	}
	var name string
	var n int64
	if err := s.db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'Questions'").Scan(&name, &n); err != nil {
		return 0
	}
	return n
}

// ---- process measurements

// snapMem collects garbage, returns freed memory to the system, and reads
// the process's resident set.
func snapMem() memSnap {
	debug.FreeOSMemory() // a GC, then give back what it freed: RSS is what is really held
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memSnap{rss: vmRSS(), heap: ms.HeapInuse, stacks: ms.StackInuse, goroutines: runtime.NumGoroutine()}
}

func vmRSS() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kb uint64
			fmt.Sscanf(strings.TrimSpace(v), "%d kB", &kb)
			return kb << 10
		}
	}
	return 0
}

// writeProfiles writes a heap profile and a goroutine profile (text) of
// this process, for where the memory of idle subscriptions goes.
func writeProfiles(prefix string) {
	for _, p := range []struct{ name, file string }{{"heap", prefix + "-heap.pprof"}, {"goroutine", prefix + "-goroutines.txt"}} {
		f, err := os.Create(p.file)
		if err != nil {
			log.Printf("memprofile: %v", err)
			return
		}
		debug := 0
		if p.name == "goroutine" {
			debug = 1
		}
		if err := pprof.Lookup(p.name).WriteTo(f, debug); err != nil {
			log.Printf("memprofile: %v", err)
		}
		f.Close()
	}
	log.Printf("heap and goroutine profiles written to %s-*", prefix)
}

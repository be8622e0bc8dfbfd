package main

// go run ./bench -galera: Rendezvous on the three-node Galera cluster of
// scripts/galera (issue 11's figures), each beside its baseline measured in
// the same run:
//
//   - delivery latency at 500 notifies/s, three replicas (one per node,
//     processes of their own) with Redis, then with no Redis (catch-up
//     only): a notify sent through another replica than the subscriber's,
//     beside one sent through the subscriber's own replica, and beside one
//     replica on the plain MariaDB;
//   - targeted-notify throughput of three replicas on three nodes, beside
//     one replica on one Galera node and one replica on the plain MariaDB;
//   - where the time goes: bare INSERT+COMMIT and a sync-wait read timed on
//     a Galera node beside the plain MariaDB, and wsrep status counters
//     (certification failures, brute-force aborts, flow control) over the
//     throughput run.
//
// The bench process is the client here (the replicas are child processes);
// its CPU counts as "client". -only takes the parts: statements, redis
// (delivery with Redis, then the three-node throughput), catchup (delivery
// without Redis, then one replica on one node), single (the plain MariaDB).
//
//	go run ./bench -galera                 # about 2 minutes
//	go run ./bench -galera -quick -only redis -cpuprofile cpu.pprof -profile redis

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"log"
	mrand "math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

var (
	galeraMode    = flag.Bool("galera", false, "measure Rendezvous on the three-node Galera cluster of scripts/galera (start it first) instead of the single-server figures")
	galeraNodes   = flag.String("galera-nodes", "127.0.0.1:3311,127.0.0.1:3312,127.0.0.1:3313", "with -galera: the MySQL addresses of the cluster's nodes (root, no password)")
	galeraRedis   = flag.String("redis-url", "redis://127.0.0.1:6379/0", "with -galera: the Redis the replicas share")
	galeraReplica = flag.Bool("galera-replica", false, "internal: run as a replica process of -galera")
	galeraParams  = flag.String("galera-url-params", "", "with -galera: query parameters added to the replicas' DATABASE_URL on the cluster (a diagnosis: wsrep_sync_wait=0 shows what the causal wait costs; Rendezvous then no longer reads other nodes' commits at once)")
	galeraRate    = flag.Float64("galera-rate", 500, "with -galera: broadcast notifies per second of the delivery figures")
	galeraDataDir = flag.String("galera-dir", "/var/tmp/rendezvous-galera", "with -galera: scripts/galera's directory (to find the nodes' processes for their CPU time)")
)

// galeraBench is one -galera run.
type galeraBench struct {
	o         options
	nodes     []string // host:port
	p         *clientProc
	rng       *mrand.Rand
	admins    []*sql.DB // one per node, on the bench database
	single    *sql.DB   // the plain MariaDB, on its bench database
	urls      []string  // DATABASE_URL per node
	dbName    string    // the bench database, on the cluster and on the plain MariaDB
	sURL      string    // DATABASE_URL on the plain MariaDB
	nodePIDs  []int
	singlePID int
	cleanups  []func()
	res       galeraResults
}

type galeraResults struct {
	redis, catchup, singleDel crossResult
	catchupInterval           time.Duration
	tp3, tp1g, tp1            tpResult
	insG, insS                latency // bare INSERT+COMMIT, one connection
	insGRate, insSRate        float64 // … 16 connections
	readSync, readNoSync      latency // a point read on node 2
	flushG, flushS            string  // innodb_flush_log_at_trx_commit of node 1 and of the plain MariaDB
	wsrep                     wsrepDelta
	cpu                       []galeraCPU
}

func runGalera(ctx context.Context, o options) error {
	started := time.Now()
	o.Sizes.DeliveryRate = *galeraRate
	d := newRotatingDialer()
	g := &galeraBench{
		o:     o,
		nodes: strings.Split(*galeraNodes, ","),
		p:     &clientProc{hc: newHTTPClient(d, 256), wsc: newHTTPClient(d, 0), sets: map[string]*subSet{}},
		rng:   mrand.New(mrand.NewPCG(1, 2)),
	}
	g.p.wsc.Timeout = 0
	defer func() {
		for name := range g.p.sets {
			g.p.closeSet(name)
		}
		for i := len(g.cleanups) - 1; i >= 0; i-- {
			g.cleanups[i]()
		}
	}()
	if err := g.setup(ctx); err != nil {
		return err
	}
	var rows []row
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"statements", g.phaseStatements},
		{"redis", g.phaseDeliveryRedis},
		{"catchup", g.phaseDeliveryCatchUp},
		{"single", g.phaseSingle},
	}
	errs := map[string]error{}
	for _, st := range steps {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if len(o.Only) > 0 && !o.Only[st.name] {
			continue
		}
		log.Printf("[galera] %s …", st.name)
		t := time.Now()
		if err := st.fn(ctx); err != nil {
			errs[st.name] = err
			log.Printf("[galera] %s FAILED after %s: %v", st.name, time.Since(t).Round(time.Millisecond), err)
			continue
		}
		log.Printf("[galera] %s done in %s", st.name, time.Since(t).Round(time.Millisecond))
	}
	rows = g.rows(errs)
	fmt.Println()
	printTable(os.Stdout, rows, false)
	g.cpuLines(os.Stdout)
	fmt.Printf("\n(%s, %s; %d nodes %s; delivery %s at %.0f/s; throughput %d clients for %s)\n", machineLine(), time.Since(started).Round(time.Second),
		len(g.nodes), *galeraNodes, o.Sizes.DeliveryFor, o.Sizes.DeliveryRate, o.Sizes.ThroughputClients, o.Sizes.ThroughputFor)
	return nil
}

// ---- set-up

func galeraDSN(addr, db string, params map[string]string) string {
	u := &url.URL{Scheme: "mysql", Host: addr, User: url.User("root")}
	dsn := mysqlDSN(u, db)
	for k, v := range params {
		dsn += "&" + k + "=" + url.QueryEscape(v)
	}
	return dsn
}

func (g *galeraBench) setup(ctx context.Context) error {
	// Every node up, Synced, in a cluster of len(nodes).
	for i, n := range g.nodes {
		db, err := sql.Open("mysql", galeraDSN(n, "", nil))
		if err != nil {
			return err
		}
		var name, state, size string
		err = db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'wsrep_local_state_comment'").Scan(&name, &state)
		if err == nil {
			err = db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'").Scan(&name, &size)
		}
		db.Close()
		if err != nil {
			return fmt.Errorf("galera node %d (%s): %w (start the cluster with scripts/galera start)", i+1, n, err)
		}
		if state != "Synced" || size != strconv.Itoa(len(g.nodes)) {
			return fmt.Errorf("galera node %d (%s): state %s, cluster size %s: want Synced in a cluster of %d", i+1, n, state, size, len(g.nodes))
		}
	}
	var b [6]byte
	rand.Read(b[:])
	name := "rdv_bench_galera_" + hex.EncodeToString(b[:])
	g.dbName = name
	create := func(addr string) error {
		db, err := sql.Open("mysql", galeraDSN(addr, "", nil))
		if err != nil {
			return err
		}
		defer db.Close()
		if _, err := db.ExecContext(ctx, "CREATE DATABASE "+name+" CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"); err != nil {
			return fmt.Errorf("create database %s on %s: %w", name, addr, err)
		}
		g.cleanups = append(g.cleanups, func() {
			db, err := sql.Open("mysql", galeraDSN(addr, "", nil))
			if err == nil {
				_, err = db.Exec("DROP DATABASE IF EXISTS " + name)
				db.Close()
			}
			if err != nil {
				log.Printf("[galera] DROP DATABASE %s on %s: %v", name, addr, err)
			}
		})
		return nil
	}
	if err := create(g.nodes[0]); err != nil {
		return err
	}
	for _, n := range g.nodes {
		u := "mysql://root@" + n + "/" + name
		if *galeraParams != "" {
			u += "?" + *galeraParams
		}
		g.urls = append(g.urls, u)
		db, err := sql.Open("mysql", galeraDSN(n, name, nil))
		if err != nil {
			return err
		}
		db.SetMaxOpenConns(32)
		db.SetMaxIdleConns(32)
		g.admins = append(g.admins, db)
		g.cleanups = append(g.cleanups, func() { db.Close() })
	}
	su, err := url.Parse(g.o.DatabaseURL)
	if err != nil || su.Scheme != "mysql" || strings.Trim(su.Path, "/") != "" {
		return fmt.Errorf("-database-url %q: with -galera, a server (mysql://user@host:port/) for the single-server baseline", g.o.DatabaseURL)
	}
	if err := create(su.Host); err != nil {
		return err
	}
	sdu := *su
	sdu.Path = "/" + name
	g.sURL = sdu.String()
	if g.single, err = sql.Open("mysql", mysqlDSN(su, name)); err != nil {
		return err
	}
	g.single.SetMaxOpenConns(32)
	g.single.SetMaxIdleConns(32)
	g.cleanups = append(g.cleanups, func() { g.single.Close() })
	for i := range g.nodes {
		g.nodePIDs = append(g.nodePIDs, pidFromFile(filepath.Join(*galeraDataDir, fmt.Sprintf("node%d", i+1), "run", "mysqld.pid")))
	}
	g.singlePID = findPlainServer()
	log.Printf("[galera] database %s on the cluster and on %s", name, su.Host)
	return nil
}

func pidFromFile(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// findPlainServer is the mariadbd/mysqld that is not a Galera node (the
// plain server, for its CPU time): the first one whose command line does
// not name scripts/galera's directory.
func findPlainServer() int {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		comm, err := os.ReadFile(filepath.Join(d, "comm"))
		if err != nil {
			continue
		}
		if c := strings.TrimSpace(string(comm)); c != "mariadbd" && c != "mysqld" {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join(d, "cmdline"))
		if strings.Contains(string(cmdline), *galeraDataDir) {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(d))
		return pid
	}
	return 0
}

// replicas starts one replica per database URL (the first alone, so that
// one runs the migrations), all on one bus channel.
func (g *galeraBench) replicas(ctx context.Context, tag string, urls []string, env ...string) ([]*replica, func(), error) {
	channel := "rendezvous-bench-" + tag + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	var rs []*replica
	stop := func() {
		var wg sync.WaitGroup
		for _, r := range rs {
			wg.Add(1)
			go func() { defer wg.Done(); r.stop() }()
		}
		wg.Wait()
	}
	start := func(i int) (*replica, error) {
		e := append([]string{"DATABASE_URL=" + urls[i], "RENDEZVOUS_BUS_CHANNEL=" + channel}, env...)
		return startReplica(ctx, fmt.Sprintf("%s replica %d", tag, i+1), e...)
	}
	r, err := start(0)
	if err != nil {
		return nil, stop, err
	}
	rs = append(rs, r)
	if len(urls) > 1 {
		rest := make([]*replica, len(urls)-1)
		errs := make([]error, len(urls)-1)
		var wg sync.WaitGroup
		for i := 1; i < len(urls); i++ {
			wg.Add(1)
			go func() { defer wg.Done(); rest[i-1], errs[i-1] = start(i) }()
		}
		wg.Wait()
		for i, r := range rest {
			if r != nil {
				rs = append(rs, r)
			} else if err == nil {
				err = errs[i]
			}
		}
		if err != nil {
			return nil, stop, err
		}
	}
	if g.o.CPUProfile != "" && (g.o.ProfilePart == "all" || g.o.ProfilePart == tag) {
		for i, r := range rs {
			r.send(fmt.Sprintf("cpu-start %s-%s-r%d.pprof", strings.TrimSuffix(g.o.CPUProfile, ".pprof"), tag, i+1))
		}
		log.Printf("[galera] CPU profiles of the %s replicas: %s-%s-r*.pprof", tag, strings.TrimSuffix(g.o.CPUProfile, ".pprof"), tag)
	}
	return rs, stop, nil
}

func endpoints(rs []*replica) []string {
	eps := make([]string, len(rs))
	for i, r := range rs {
		eps[i] = r.endpoint
	}
	return eps
}

// ---- phases

// phaseStatements times the statements a notify is made of, bare, on a
// Galera node and on the plain MariaDB.
func (g *galeraBench) phaseStatements(ctx context.Context) error {
	tpFor := max(g.o.Sizes.ThroughputFor/3, 2*time.Second)
	for _, t := range []struct {
		db   *sql.DB
		lat  *latency
		rate *float64
	}{{g.admins[0], &g.res.insG, &g.res.insGRate}, {g.single, &g.res.insS, &g.res.insSRate}} {
		b, err := newInsertBaseline(ctx, t.db, "mysql")
		if err != nil {
			return err
		}
		for i := range warmups {
			if err := b.insert(ctx, int64(i)); err != nil {
				return err
			}
		}
		n, took, err := b.throughput(ctx, g.o.Sizes.ThroughputClients, tpFor)
		if err != nil {
			return err
		}
		*t.rate = float64(n) / took.Seconds()
		if *t.lat, err = b.latency(ctx, g.o.Sizes.LatencyN); err != nil {
			return err
		}
	}
	g.admins[0].QueryRowContext(ctx, "SELECT @@innodb_flush_log_at_trx_commit").Scan(&g.res.flushG)
	g.single.QueryRowContext(ctx, "SELECT @@innodb_flush_log_at_trx_commit").Scan(&g.res.flushS)
	// A point read on node 2 of a row written through node 1, with and
	// without the causal wait the service's sessions have on Galera.
	for _, t := range []struct {
		wait string
		lat  *latency
	}{{"15", &g.res.readSync}, {"0", &g.res.readNoSync}} {
		db, err := sql.Open("mysql", galeraDSN(g.nodes[1%len(g.nodes)], g.dbName, map[string]string{"wsrep_sync_wait": t.wait}))
		if err != nil {
			return err
		}
		db.SetMaxOpenConns(1)
		lat := make([]time.Duration, 0, g.o.Sizes.LatencyN)
		for i := range g.o.Sizes.LatencyN + warmups {
			var n int
			t0 := time.Now()
			err := db.QueryRowContext(ctx, "SELECT COUNT(*) FROM "+baselineTable+" WHERE seq = ?", i+1).Scan(&n)
			if err != nil {
				db.Close()
				return err
			}
			if i >= warmups {
				lat = append(lat, time.Since(t0))
			}
		}
		db.Close()
		*t.lat = summarize(lat)
	}
	return nil
}

func (g *galeraBench) phaseDeliveryRedis(ctx context.Context) error {
	rs, stop, err := g.replicas(ctx, "redis", g.urls, "REDIS_URL="+*galeraRedis)
	defer stop()
	if err != nil {
		return err
	}
	m := g.mark(rs)
	g.res.redis, err = g.delivery(ctx, "gdr", endpoints(rs), g.admins[0], 10*time.Second)
	g.since("delivery with Redis", m)
	if err != nil {
		return err
	}
	// Throughput on the same three replicas.
	m, w0 := g.mark(rs), g.wsrepStatus(ctx)
	g.res.tp3, err = g.throughput(ctx, "gtp3-", endpoints(rs))
	g.res.wsrep = g.wsrepStatus(ctx).minus(w0)
	g.since("throughput, three replicas on three nodes", m)
	return err
}

func (g *galeraBench) phaseDeliveryCatchUp(ctx context.Context) error {
	g.res.catchupInterval = 2 * time.Second
	rs, stop, err := g.replicas(ctx, "catchup", g.urls, "REDIS_URL=", "RENDEZVOUS_CATCHUP_INTERVAL="+g.res.catchupInterval.String())
	defer stop()
	if err != nil {
		return err
	}
	m := g.mark(rs)
	g.res.catchup, err = g.delivery(ctx, "gdc", endpoints(rs), g.admins[0], g.res.catchupInterval+10*time.Second)
	g.since("delivery, catch-up only", m)
	if err != nil {
		return err
	}
	// One replica on one Galera node: what the cluster's replication
	// costs without notifies coming in through the other nodes.
	rs[1].stop()
	rs[2].stop()
	m = g.mark(rs[:1])
	g.res.tp1g, err = g.throughput(ctx, "gtp1g-", endpoints(rs[:1]))
	g.since("throughput, one replica on one Galera node", m)
	return err
}

func (g *galeraBench) phaseSingle(ctx context.Context) error {
	rs, stop, err := g.replicas(ctx, "single", []string{g.sURL}, "REDIS_URL="+*galeraRedis)
	defer stop()
	if err != nil {
		return err
	}
	m := g.mark(rs)
	g.res.singleDel, err = g.delivery(ctx, "gds", endpoints(rs), g.single, 10*time.Second)
	g.since("delivery, one replica on the plain MariaDB", m)
	if err != nil {
		return err
	}
	m = g.mark(rs)
	g.res.tp1, err = g.throughput(ctx, "gtp1-", endpoints(rs))
	g.since("throughput, one replica on the plain MariaDB", m)
	return err
}

// ---- wsrep status counters

var wsrepCounters = []string{"wsrep_local_commits", "wsrep_local_cert_failures", "wsrep_local_bf_aborts", "wsrep_flow_control_paused_ns", "wsrep_replicated", "wsrep_received", "Questions"}

type wsrepDelta struct {
	at   time.Time
	wall time.Duration
	v    [][]int64 // per node, per counter
}

func (g *galeraBench) wsrepStatus(ctx context.Context) wsrepDelta {
	d := wsrepDelta{at: time.Now()}
	for _, db := range g.admins {
		vals := make([]int64, len(wsrepCounters))
		for i, c := range wsrepCounters {
			var name, v string
			if err := db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE '"+c+"'").Scan(&name, &v); err == nil {
				vals[i], _ = strconv.ParseInt(v, 10, 64)
			}
		}
		d.v = append(d.v, vals)
	}
	return d
}

func (d wsrepDelta) minus(o wsrepDelta) wsrepDelta {
	r := wsrepDelta{at: o.at, wall: d.at.Sub(o.at)}
	for n := range d.v {
		vals := make([]int64, len(wsrepCounters))
		for i := range vals {
			vals[i] = d.v[n][i] - o.v[n][i]
		}
		r.v = append(r.v, vals)
	}
	return r
}

// sum is a counter summed over the nodes.
func (d wsrepDelta) sum(name string) int64 {
	var s int64
	for i, c := range wsrepCounters {
		if c == name {
			for _, vals := range d.v {
				s += vals[i]
			}
		}
	}
	return s
}

// ---- CPU

type galeraCPU struct {
	name                                    string
	wall                                    time.Duration
	replicas, client, nodes, single, others float64
}

type galeraMark struct {
	at                                     time.Time
	machine, self, replicas, nodes, single time.Duration
	pids                                   []int
}

func (g *galeraBench) mark(rs []*replica) galeraMark {
	m := galeraMark{at: time.Now(), machine: machineBusy(), self: selfCPU(), single: pidCPU(g.singlePID)}
	for _, r := range rs {
		m.pids = append(m.pids, r.pid())
		m.replicas += pidCPU(r.pid())
	}
	for _, p := range g.nodePIDs {
		m.nodes += pidCPU(p)
	}
	return m
}

func (g *galeraBench) since(name string, m galeraMark) {
	now := galeraMark{at: time.Now(), machine: machineBusy(), self: selfCPU(), single: pidCPU(g.singlePID)}
	for _, p := range m.pids {
		now.replicas += pidCPU(p)
	}
	for _, p := range g.nodePIDs {
		now.nodes += pidCPU(p)
	}
	wall := now.at.Sub(m.at)
	cores := func(d time.Duration) float64 { return d.Seconds() / wall.Seconds() }
	u := galeraCPU{name: name, wall: wall, replicas: cores(now.replicas - m.replicas), client: cores(now.self - m.self),
		nodes: cores(now.nodes - m.nodes), single: cores(now.single - m.single)}
	u.others = max(cores(now.machine-m.machine)-u.replicas-u.client-u.nodes-u.single, 0)
	g.res.cpu = append(g.res.cpu, u)
}

func (g *galeraBench) cpuLines(w io.Writer) {
	fmt.Fprintf(w, "\nCPU during the timed windows, in cores of %d (replicas = the Rendezvous processes; client = this process; galera = the %d Galera nodes; mariadb = the plain MariaDB, which other clients may share; others = the rest of the machine; a replica stopped mid-window counts until it stopped):\n\n", runtime.NumCPU(), len(g.nodes))
	for _, u := range g.res.cpu {
		fmt.Fprintf(w, "- %s (%s): replicas %.2f, client %.2f, galera %.2f, mariadb %.2f, others %.2f\n", u.name, fmtDur(u.wall), u.replicas, u.client, u.nodes, u.single, u.others)
	}
}

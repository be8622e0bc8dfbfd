// Command bench measures Rendezvous (issue #5) and prints one markdown
// table in which every figure stands beside a baseline measured in the same
// run, with its target and whether the target is met.
//
// It starts the service in-process on a throwaway database (a fresh MariaDB
// database, created and dropped here; with -sqlite also a SQLite file),
// drives it over real HTTP and websocket connections from a child process
// (this binary re-executed with -client, so that the server process holds
// only the server's file descriptors, and its CPU time and memory are the
// server's alone), and stops by itself. The same-run peer, a
// github.com/centrifugal/centrifuge server, runs in a process of its own
// (-peer-server) with its centrifuge-go clients in another client process.
//
//	go run ./bench            # full run, about 12 minutes on 2 shared cores
//	go run ./bench -quick     # smoke run with small sizes, 1–2 minutes
//	go run ./bench -sqlite    # MariaDB, then the same on SQLite
//	go run ./bench -only idle -cpuprofile cpu.pprof -profile delivery
//	go run ./bench -galera    # on the Galera cluster of scripts/galera (galera.go)
//
// BENCH_DEBUG=1 lists every delivery slower than 20 ms, with when it was
// sent, on stderr (periodic stalls show up as clusters).
//
// It must never touch a database it did not create (unless -database-url
// names one) nor send traffic off 127.0.0.0/8 on its own.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"
)

// sizes are the workload sizes; -quick scales them down.
type sizes struct {
	ThroughputClients int
	ThroughputFor     time.Duration
	LatencyN          int
	DeliveryRate      float64
	DeliveryFor       time.Duration
	Idle              int // subscriptions, one websocket each
	DeliveryMux       int // subscriptions multiplexed MuxPerConn per websocket, idle beside Idle through the delivery window
	Mux               int // subscriptions multiplexed MuxPerConn per websocket
	MuxPerConn        int
	FanOut            int
	FanOutPerConn     []int // one fan-out per entry: waiters per websocket
	SeedWaiters       int
	SeedLookback      int
	PurgeRows         int // ended rows the retention purge deletes in the purge phase
}

var fullSizes = sizes{
	ThroughputClients: 16,
	ThroughputFor:     15 * time.Second,
	LatencyN:          2000,
	DeliveryRate:      500,
	DeliveryFor:       20 * time.Second,
	Idle:              15000,
	DeliveryMux:       10000,
	Mux:               50000,
	MuxPerConn:        100,
	FanOut:            10000,
	FanOutPerConn:     []int{100, 1},
	SeedWaiters:       1000000,
	SeedLookback:      100000,
	PurgeRows:         1000000,
}

var quickSizes = sizes{
	ThroughputClients: 16,
	ThroughputFor:     3 * time.Second,
	LatencyN:          300,
	DeliveryRate:      500,
	DeliveryFor:       3 * time.Second,
	Idle:              1500,
	DeliveryMux:       1000,
	Mux:               5000,
	MuxPerConn:        100,
	FanOut:            1000,
	FanOutPerConn:     []int{100, 1},
	SeedWaiters:       50000,
	SeedLookback:      5000,
	PurgeRows:         50000,
}

type options struct {
	DatabaseURL string
	SQLite      bool
	MySQL       bool
	Quick       bool
	CPUProfile  string
	ProfilePart string
	MemProfile  string
	PprofAddr   string
	Verbose     bool
	Only        map[string]bool // phases to run; empty: all
	Sizes       sizes
}

func main() {
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetPrefix("bench: ")
	var (
		o            options
		client, peer bool
	)
	flag.BoolVar(&client, "client", false, "internal: run as the client process, commanded on stdin")
	flag.BoolVar(&peer, "peer-server", false, "internal: run as the peer's server process ("+peerVersion+") until stdin closes")
	flag.StringVar(&o.DatabaseURL, "database-url", defaultMySQL,
		"MySQL server to create the throwaway database on (mysql://user:pass@host:port/); with a database name in the path that database is used as is (it must be empty) and not dropped")
	flag.BoolVar(&o.SQLite, "sqlite", false, "also run everything on SQLite (a temporary file)")
	flag.BoolVar(&o.MySQL, "mysql", true, "run on MySQL/MariaDB (-mysql=false -sqlite: SQLite only)")
	flag.BoolVar(&o.Quick, "quick", false, "small sizes: a smoke run of 1–2 minutes")
	flag.StringVar(&o.CPUProfile, "cpuprofile", "", "write a CPU profile of the server process to this file")
	flag.StringVar(&o.ProfilePart, "profile", "all", "what -cpuprofile covers: all, a phase (baseline, latency, throughput, growth, idle, mux, fanout), delivery (the deliveries of idle) or fanout-notify (the broadcast of fanout)")
	flag.StringVar(&o.MemProfile, "memprofile", "", "write heap and goroutine profiles of the server process before and while the idle subscriptions are connected (FILE-idle-heap.pprof, FILE-mux-goroutines.txt, …)")
	flag.StringVar(&o.PprofAddr, "pprof", "", "serve net/http/pprof of the server process on this address (127.0.0.1:6060)")
	flag.BoolVar(&o.Verbose, "v", false, "log each figure as it is measured, and the service's warnings")
	only := flag.String("only", "", "run only these phases (comma-separated: baseline, latency, throughput, growth, purge, idle, peer, mux, fanout); figures of the others are left out")
	s := fullSizes
	flag.IntVar(&s.Idle, "idle", 0, "idle subscriptions, one websocket each (default 15000, -quick 1500)")
	flag.IntVar(&s.DeliveryMux, "delivery-mux", 0, "idle subscriptions multiplexed 100 per websocket beside the idle ones through the delivery window (default 10000, -quick 1000)")
	flag.IntVar(&s.Mux, "mux", 0, "idle subscriptions multiplexed 100 per websocket (default 50000, -quick 5000)")
	flag.IntVar(&s.FanOut, "fanout", 0, "waiters of the broadcast fan-out (default 10000, -quick 1000)")

	flag.IntVar(&s.SeedWaiters, "seed-waiters", 0, "ended waiters seeded for the cost-growth figure (default 1000000, -quick 50000)")
	flag.IntVar(&s.PurgeRows, "purge-rows", 0, "ended rows purged while the purge figure is measured (default 1000000, -quick 50000)")
	flag.IntVar(&s.SeedLookback, "seed-lookback", 0, "lookback events seeded for the cost-growth figure (default 100000, -quick 5000)")
	flag.DurationVar(&s.ThroughputFor, "throughput-for", 0, "length of the throughput phase (default 15s, -quick 3s)")
	flag.DurationVar(&s.DeliveryFor, "delivery-for", 0, "length of the delivery-latency phase (default 20s, -quick 3s)")
	flag.Parse()
	raiseFileLimit()
	if client {
		if err := runClient(); err != nil {
			fmt.Fprintln(os.Stderr, "bench client:", err)
			os.Exit(1)
		}
		return
	}
	if peer {
		if err := runPeerServer(); err != nil {
			fmt.Fprintln(os.Stderr, "bench peer:", err)
			os.Exit(1)
		}
		return
	}
	if *galeraReplica {
		if err := runReplica(); err != nil {
			fmt.Fprintln(os.Stderr, "bench replica:", err)
			os.Exit(1)
		}
		return
	}

	o.Only = map[string]bool{}
	for p := range strings.SplitSeq(*only, ",") {
		if p = strings.TrimSpace(p); p != "" {
			o.Only[p] = true
		}
	}
	o.Sizes = fullSizes
	if o.Quick {
		o.Sizes = quickSizes
	}
	override := func(dst *int, v int) {
		if v > 0 {
			*dst = v
		}
	}
	override(&o.Sizes.Idle, s.Idle)
	override(&o.Sizes.DeliveryMux, s.DeliveryMux)
	override(&o.Sizes.Mux, s.Mux)
	override(&o.Sizes.FanOut, s.FanOut)
	override(&o.Sizes.SeedWaiters, s.SeedWaiters)
	override(&o.Sizes.SeedLookback, s.SeedLookback)
	override(&o.Sizes.PurgeRows, s.PurgeRows)
	if s.ThroughputFor > 0 {
		o.Sizes.ThroughputFor = s.ThroughputFor
	}
	if s.DeliveryFor > 0 {
		o.Sizes.DeliveryFor = s.DeliveryFor
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	runMode := run
	if *galeraMode {
		runMode = runGalera
	}
	if err := runMode(ctx, o); err != nil {
		log.Print(err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	started := time.Now()
	prof, err := newProfiler(o.CPUProfile, o.ProfilePart)
	if err != nil {
		return err
	}
	defer prof.close()
	prof.begin("all")
	defer prof.end("all")
	if o.PprofAddr != "" {
		if err := servePprof(ctx, o.PprofAddr); err != nil {
			return err
		}
	}

	cl, err := startClient()
	if err != nil {
		return err
	}
	defer cl.stop()
	mem, err := startMemServer()
	if err != nil {
		return err
	}
	defer mem.close()

	var targets []string
	if o.MySQL {
		targets = append(targets, "mysql")
	}
	if o.SQLite {
		targets = append(targets, "sqlite")
	}
	var (
		rows   []row
		suites []*suite
		peer   = &peerRun{}
	)
	for _, t := range targets {
		if ctx.Err() != nil {
			break
		}
		s := &suite{opts: o, sz: o.Sizes, kind: t, client: cl, mem: mem, prof: prof, peer: peer}
		rows = append(rows, s.run(ctx)...)
		suites = append(suites, s)
	}
	if ctx.Err() != nil {
		return fmt.Errorf("interrupted: %w", ctx.Err())
	}
	fmt.Println()
	printTable(os.Stdout, rows, len(targets) > 1)
	cpuLines(os.Stdout, suites)
	fmt.Printf("\n(%s, %s; sizes: %s)\n", machineLine(), time.Since(started).Round(time.Second), sizeLine(o))
	return nil
}

// profiler writes one CPU profile over the part of the run -profile names
// (its first occurrence, when a part repeats).
type profiler struct {
	file         *os.File
	part         string
	active, done bool
}

func newProfiler(path, part string) (*profiler, error) {
	p := &profiler{part: part}
	if path == "" {
		return p, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpuprofile: %w", err)
	}
	p.file = f
	return p, nil
}

func (p *profiler) begin(part string) {
	if p.file == nil || p.active || p.done || part != p.part {
		return
	}
	if err := pprof.StartCPUProfile(p.file); err != nil {
		log.Printf("cpuprofile: %v", err)
		return
	}
	p.active = true
}

func (p *profiler) end(part string) {
	if !p.active || part != p.part {
		return
	}
	pprof.StopCPUProfile()
	p.active, p.done = false, true
	log.Printf("CPU profile of %q written to %s", part, p.file.Name())
}

func (p *profiler) close() {
	if p.file == nil {
		return
	}
	if p.active {
		pprof.StopCPUProfile()
		p.active = false
	}
	p.file.Close()
}

func raiseFileLimit() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			log.Printf("raise open-file limit: %v", err)
		}
	}
}

package main

// Replicas for -galera: this binary re-executed with -galera-replica runs
// the service as its own process (as a deployment does: each replica its
// own process, its own hub, its own Redis subscription), configured by the
// environment like the real server, on 127.0.0.1 and a free port. It
// prints "listening ADDR" on stdout, takes "cpu-start FILE" / "cpu-stop"
// on stdin (a CPU profile of this replica), and shuts down when stdin
// closes.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"runtime/pprof"
	"strings"
	"time"

	"rendezvous/service"
)

func runReplica() error {
	cfg, err := service.ConfigFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	cfg.Logger = service.NewLogger(os.Getenv("LOG_LEVEL"))
	cfg.HTTP.RateLimit, cfg.HTTP.RateBurst = 0, 0 // the bench is one caller sending hundreds per second
	cfg.HTTP.ServerRateLimit = 0
	cfg.HTTP.MaxSubscriptionsPerConnection = 100000
	cfg.Engine.PurgeInterval = 24 * time.Hour
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sctx, scancel := context.WithTimeout(ctx, 2*time.Minute)
	svc, err := service.New(sctx, cfg)
	scancel()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		svc.Close()
		return err
	}
	served := make(chan error, 1)
	go func() { served <- svc.Serve(ctx, ln) }()
	fmt.Printf("listening %s\n", ln.Addr())
	in := bufio.NewScanner(os.Stdin)
	var prof *os.File
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		switch cmd {
		case "cpu-start":
			if prof != nil {
				continue
			}
			if prof, err = os.Create(arg); err == nil {
				err = pprof.StartCPUProfile(prof)
			}
			if err != nil {
				log.Printf("replica cpu profile: %v", err)
				prof = nil
			}
		case "cpu-stop":
			if prof != nil {
				pprof.StopCPUProfile()
				prof.Close()
				prof = nil
			}
		}
	}
	if prof != nil {
		pprof.StopCPUProfile()
		prof.Close()
	}
	cancel()
	return <-served
}

// replica is the bench's handle on a replica process.
type replica struct {
	name     string
	cmd      *exec.Cmd
	in       io.WriteCloser
	endpoint string
	exited   chan struct{}
}

// startReplica starts a replica with env (DATABASE_URL, REDIS_URL, …) on
// top of the bench's own environment and waits until it listens.
func startReplica(ctx context.Context, name string, env ...string) (*replica, error) {
	c, err := startChild("-galera-replica", name, append(append(os.Environ(), "LOG_LEVEL=error"), env...), prefixWriter{prefix: name + ": ", w: os.Stderr})
	if err != nil {
		return nil, err
	}
	cmd, in, out := c.cmd, c.in, c.out
	r := &replica{name: name, cmd: cmd, in: in, exited: make(chan struct{})}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "listening "); ok {
				addr <- a
			}
		}
	}()
	go func() { cmd.Wait(); close(r.exited) }()
	select {
	case a := <-addr:
		r.endpoint = "http://" + a + "/query"
		return r, nil
	case <-r.exited:
		return nil, fmt.Errorf("%s exited before it listened", name)
	case <-ctx.Done():
		r.stop()
		return nil, ctx.Err()
	case <-time.After(2 * time.Minute):
		r.stop()
		return nil, fmt.Errorf("%s did not listen within 2 minutes", name)
	}
}

func (r *replica) pid() int { return r.cmd.Process.Pid }

func (r *replica) send(line string) {
	if _, err := io.WriteString(r.in, line+"\n"); err != nil && !errors.Is(err, os.ErrClosed) {
		log.Printf("%s: %v", r.name, err)
	}
}

// stop closes stdin (a graceful shutdown) and kills the replica if it is
// not gone within 30 s.
func (r *replica) stop() {
	r.in.Close()
	select {
	case <-r.exited:
	case <-time.After(30 * time.Second):
		r.cmd.Process.Kill()
		<-r.exited
	}
}

type prefixWriter struct {
	prefix string
	w      io.Writer
}

func (p prefixWriter) Write(b []byte) (int, error) {
	for line := range strings.SplitSeq(strings.TrimRight(string(b), "\n"), "\n") {
		fmt.Fprintf(p.w, "%s%s\n", p.prefix, line)
	}
	return len(b), nil
}

package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// selfCPU is the user+system CPU time of this process so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// clockTicks is USER_HZ, which Linux fixes at 100 for /proc.
const clockTicks = 100

// pidCPU is the user+system CPU time of another process so far, from
// /proc/<pid>/stat; 0 when pid is 0 or unreadable.
func pidCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64) // field 14 of the whole line
	stime, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	return time.Duration(utime+stime) * time.Second / clockTicks
}

// machineBusy is the CPU time all processes have used so far, from the
// first line of /proc/stat (everything but idle and iowait).
func machineBusy() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var busy int64
	for i, v := range f[1:] {
		if i == 3 || i == 4 || i >= 8 { // idle, iowait; guest time is already in user
			continue
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		busy += n
	}
	return time.Duration(busy) * time.Second / clockTicks
}

// cpuMark is where a measured window starts.
type cpuMark struct {
	at                          time.Time
	machine, self, client, dbms time.Duration
}

// cpuUse is how many cores each party kept busy during a window.
type cpuUse struct {
	name                              string
	wall                              time.Duration
	server, client, dbms, others, all float64
}

func (s *suite) mark(ctx context.Context) cpuMark {
	m := cpuMark{at: time.Now(), machine: machineBusy(), self: selfCPU(), dbms: pidCPU(s.dbPID)}
	if r, err := s.client.do(ctx, command{Op: "cpu"}); err == nil {
		m.client = r.CPU
	}
	return m
}

// since closes a window opened by mark and records it under name.
func (s *suite) since(ctx context.Context, name string, m cpuMark) cpuUse {
	return s.window(name, m, s.mark(ctx))
}

// window records the CPU each part used between two marks, in cores.
func (s *suite) window(name string, m, now cpuMark) cpuUse {
	wall := now.at.Sub(m.at)
	cores := func(d time.Duration) float64 { return d.Seconds() / wall.Seconds() }
	u := cpuUse{
		name:   name,
		wall:   wall,
		server: cores(now.self - m.self),
		client: cores(now.client - m.client),
		dbms:   cores(now.dbms - m.dbms),
		all:    cores(now.machine - m.machine),
	}
	u.others = max(u.all-u.server-u.client-u.dbms, 0)
	s.res.cpu = append(s.res.cpu, u)
	return u
}

// listenerPID returns the pid of the process with one of the names that
// listens on the TCP port (the database server the bench talks to, when
// several run: a Galera cluster beside the default server, say); 0 when
// none is found.
func listenerPID(port int, names ...string) int {
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 10 || fs[3] != "0A" { // 0A: LISTEN
				continue
			}
			_, hexPort, _ := strings.Cut(fs[1], ":")
			if p, err := strconv.ParseInt(hexPort, 16, 32); err == nil && int(p) == port {
				inodes["socket:["+fs[9]+"]"] = true
			}
		}
	}
	if len(inodes) == 0 {
		return 0
	}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		comm, err := os.ReadFile(filepath.Join(d, "comm"))
		if err != nil || !slices.Contains(names, strings.TrimSpace(string(comm))) {
			continue
		}
		fds, _ := filepath.Glob(filepath.Join(d, "fd", "*"))
		for _, fd := range fds {
			if link, err := os.Readlink(fd); err == nil && inodes[link] {
				pid, _ := strconv.Atoi(filepath.Base(d))
				return pid
			}
		}
	}
	return 0
}

func servePprof(ctx context.Context, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("-pprof %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-pprof %q: listen on a loopback address", addr)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	context.AfterFunc(ctx, func() { srv.Close() })
	log.Printf("pprof on http://%s/debug/pprof/", ln.Addr())
	return nil
}

func machineLine() string {
	return fmt.Sprintf("%d CPUs, %s %s/%s", runtime.NumCPU(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

func sizeLine(o options) string {
	z := o.Sizes
	mode := "full"
	if o.Quick {
		mode = "-quick"
	}
	return fmt.Sprintf("%s: throughput %s, latency %d notifies, delivery %s at %.0f/s beside %d idle (one websocket each) + %d multiplexed idle, multiplexed memory %d, fan-out %d %v per websocket, seeded %d waiters + %d lookback events; 1 KB = 1000 bytes",
		mode, z.ThroughputFor, z.LatencyN, z.DeliveryFor, z.DeliveryRate, z.Idle, z.DeliveryMux, z.Mux, z.FanOut, z.FanOutPerConn, z.SeedWaiters, z.SeedLookback)
}

// child is a process of the bench (its client, the peer's server, a
// replica): this executable run with flag, commanded on its stdin and
// answering on its stdout.
type child struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out io.ReadCloser
}

// startChild starts this executable with flag as a child that is killed
// when the bench dies. env is its environment (nil: the bench's own);
// stderr takes its stderr.
func startChild(flag, name string, env []string, stderr io.Writer) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, flag)
	cmd.Env, cmd.Stderr = env, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return &child{cmd: cmd, in: in, out: out}, nil
}

// waitOrKill waits for a child told to exit (its stdin closed), and kills
// it if it has not exited within grace.
func waitOrKill(cmd *exec.Cmd, grace time.Duration) {
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(grace):
		cmd.Process.Kill()
		<-done
	}
}

// envWithout is the bench's environment less the variables with these
// prefixes (such as "GODEBUG=", meant for the server process).
func envWithout(prefixes ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(kv, p) }) {
			env = append(env, kv)
		}
	}
	return env
}

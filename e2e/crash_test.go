package e2e

// Fault tests against the real binary on MariaDB: the server is SIGKILLed
// while notifies and waits are in flight, restarted on the same database,
// and everything the clients were told is audited against what the
// database recorded.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
)

// ---------------------------------------------------------------------------
// The real binary as a subprocess.

// crashBuild builds the server binary (the module root is the parent of the
// e2e package) into the test's temp dir, with the given build tags.
func crashBuild(t *testing.T, tags ...string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "rendezvous")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-tags", strings.Join(tags, ","), "-o", bin, ".")
	cmd.Dir = ".."
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return bin
}

// crashServer runs the binary, one process at a time, on one database.
type crashServer struct {
	t    *testing.T
	bin  string
	db   string
	env  []string
	logs *syncBuffer

	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{} // closed when the process has been waited for
	cancel   context.CancelFunc
	base     string // http://127.0.0.1:port
	starts   int
	kills    int
	lastExit string
}

func newCrashServer(t *testing.T, bin, db string, env ...string) *crashServer {
	s := &crashServer{t: t, bin: bin, db: db, env: env, logs: &syncBuffer{}}
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			t.Logf("server log (tail):\n%s", crashTail(s.logs.String(), 40000))
		}
	})
	return s
}

func crashTail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// endpoint is the /query URL of the current process.
func (s *crashServer) endpoint() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.base + "/query"
}

// start runs a new process on a free port and waits until /readyz says 200.
func (s *crashServer) start() {
	s.t.Helper()
	for attempt := 1; ; attempt++ {
		err := s.tryStart()
		if err == nil {
			return
		}
		if attempt == 3 {
			s.t.Fatalf("the server did not start: %v", err)
		}
		s.t.Logf("start attempt %d: %v; trying another port", attempt, err)
	}
}

func (s *crashServer) tryStart() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()

	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, s.bin)
	cmd.Env = append(os.Environ(),
		"DATABASE_URL="+s.db,
		"PORT="+port,
		"REDIS_URL=",
		"LOG_LEVEL=info",
		"RENDEZVOUS_RATE_LIMIT=0",
		"RENDEZVOUS_TOKENS=",
		"RENDEZVOUS_TOKENS_FILE=",
		"RENDEZVOUS_REQUIRE_TOKENS=false",
	)
	cmd.Env = append(cmd.Env, s.env...)
	cmd.Stdout, cmd.Stderr = s.logs, s.logs
	s.mu.Lock()
	s.starts++
	n := s.starts
	s.mu.Unlock()
	fmt.Fprintf(s.logs, "=== process %d on port %s\n", n, port)
	if err := cmd.Start(); err != nil {
		cancel()
		return fmt.Errorf("start %s: %w", s.bin, err)
	}
	done := make(chan struct{})
	go func() {
		err := cmd.Wait()
		s.mu.Lock()
		s.lastExit = fmt.Sprint(err)
		s.mu.Unlock()
		close(done)
	}()
	s.mu.Lock()
	s.cmd, s.done, s.cancel, s.base = cmd, done, cancel, "http://127.0.0.1:"+port
	s.mu.Unlock()

	deadline := time.Now().Add(30 * time.Second)
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		if crashReady(s.base) {
			return nil
		}
		select {
		case <-done:
			s.mu.Lock()
			exit := s.lastExit
			s.cmd = nil
			s.mu.Unlock()
			cancel()
			return fmt.Errorf("process %d exited before it was ready: %s", n, exit)
		case <-time.After(delay): // polling interval of /readyz
		}
		if time.Now().After(deadline) {
			s.kill()
			return fmt.Errorf("process %d: /readyz not 200 within 30s", n)
		}
	}
}

func crashReady(base string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/readyz", nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// kill SIGKILLs the process (no graceful stop) and waits for it. Safe to
// call from any goroutine, and when nothing runs.
func (s *crashServer) kill() {
	s.mu.Lock()
	cmd, done, cancel := s.cmd, s.done, s.cancel
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		s.t.Errorf("process %d did not exit within 15s of SIGKILL", cmd.Process.Pid)
	}
	cancel()
	s.mu.Lock()
	s.kills++
	s.mu.Unlock()
	fmt.Fprintf(s.logs, "=== SIGKILL (%s)\n", s.lastExitLocked())
	// Keep-alive connections to the dead process are useless now.
	http.DefaultClient.CloseIdleConnections()
}

func (s *crashServer) lastExitLocked() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastExit
}

// ---------------------------------------------------------------------------
// Small client helpers for a server at an endpoint.

func crashDial(t *testing.T, endpoint string) *gqlclient.Conn {
	t.Helper()
	c, err := gqlclient.Dial(ctxT(t), endpoint, gqlclient.TransportWS, nil)
	require.NoError(t, err)
	t.Cleanup(func() { c.CloseNow() })
	return c
}

func crashTrigger(t *testing.T, endpoint, prefix string) string {
	t.Helper()
	var out struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
		} `json:"trigger"`
	}
	sdOK(t, endpoint, triggerMutation, map[string]any{"id": uid(prefix)}, &out)
	return out.Trigger.WorkflowRunID
}

func crashRunView(t *testing.T, endpoint, id string) *runView {
	t.Helper()
	var out struct {
		WorkflowRun *runView `json:"workflowRun"`
	}
	sdOK(t, endpoint, runQuery, map[string]any{"id": id}, &out)
	require.NotNil(t, out.WorkflowRun, "run %s", id)
	return out.WorkflowRun
}

func crashSubscribe(t *testing.T, c *gqlclient.Conn, eventID string, o waitOpts) *gqlclient.Sub {
	t.Helper()
	s, err := c.Subscribe(ctxT(t), waitSubscription, waitVars(eventID, o))
	require.NoError(t, err)
	return s
}

// crashNonce is the nonce a notify of these tests carries in its eventData.
func crashNonce(raw json.RawMessage) string {
	var v struct {
		Nonce string `json:"nonce"`
	}
	_ = json.Unmarshal(raw, &v)
	return v.Nonce
}

func crashJSONEqual(a, b json.RawMessage) bool {
	var x, y any
	if len(a) == 0 {
		a = json.RawMessage("null")
	}
	if len(b) == 0 {
		b = json.RawMessage("null")
	}
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return string(a) == string(b)
	}
	return reflect.DeepEqual(x, y)
}

func crashStr(p *string) string {
	if p == nil {
		return "<nil>"
	}
	return *p
}

// crashSameResult says how two results of the same waiter differ, or "".
func crashSameResult(a, b *waitResult) string {
	var d []string
	if a.WaiterID != b.WaiterID {
		d = append(d, fmt.Sprintf("waiterId %s vs %s", a.WaiterID, b.WaiterID))
	}
	if a.EventID != b.EventID {
		d = append(d, fmt.Sprintf("eventId %s vs %s", a.EventID, b.EventID))
	}
	if a.Timeout != b.Timeout {
		d = append(d, fmt.Sprintf("timeout %v vs %v", a.Timeout, b.Timeout))
	}
	if crashStr(a.MessageID) != crashStr(b.MessageID) {
		d = append(d, fmt.Sprintf("messageId %s vs %s", crashStr(a.MessageID), crashStr(b.MessageID)))
	}
	if !crashJSONEqual(a.EventData, b.EventData) {
		d = append(d, fmt.Sprintf("eventData %s vs %s", a.EventData, b.EventData))
	}
	if crashStr(a.StepName) != crashStr(b.StepName) {
		d = append(d, fmt.Sprintf("stepName %s vs %s", crashStr(a.StepName), crashStr(b.StepName)))
	}
	return strings.Join(d, "; ")
}

// ---------------------------------------------------------------------------
// TestCrashKillLoop

const (
	crashIterations   = 10
	crashWaiterRuns   = 24 // runs with a durable waiter registered before the storm
	crashLookbackRuns = 12 // runs without one: targeted notifies store lookback events
	crashNotifiers    = 12 // concurrent notifiers
	crashDrainPerRun  = 2  // lookback events consumed per run by later waits
	crashBudget       = 60 * time.Second
)

// Kinds of notify. The crashErr* ones must fail (and change nothing).
const (
	crashToWaiterRun   = "to-waiter-run"
	crashToLookbackRun = "to-lookback-run"
	crashFinisher      = "finisher"
	crashErrNoRun      = "err-no-run"         // target run does not exist: NOT_FOUND
	crashErrNoStepRun  = "err-step-no-run"    // step of a run that does not exist: NOT_FOUND
	crashErrEndedStep  = "err-step-ended-run" // step of a canceled run: RUN_NOT_ACTIVE
)

const (
	crashAcked   = "acked"
	crashFailed  = "failed"  // a GraphQL error other than OUTCOME_UNKNOWN
	crashUnknown = "unknown" // no response, or OUTCOME_UNKNOWN
)

type crashRun struct {
	id, ev string
	kind   string // "W" or "L"
	late   atomic.Bool
	// Filled by the audit.
	steps     map[string]*crashStep
	remaining []string // messageIds of the lookback events left after the drain
}

type crashStep struct {
	name     string
	waiterID string
	res      *waitResult
}

type crashNotify struct {
	kind    string
	nonce   string
	target  *crashRun // nil for crashErrNoRun
	vars    map[string]any
	hasStep bool

	outcome  string
	code     string
	err      string
	resp     *notifyView
	repeated string // for an unknown notify step repeated after the restart: "was-committed" or "now-committed"
}

// messageID is the id of the acknowledged notification.
func (n *crashNotify) messageID() string {
	if n.resp == nil {
		return ""
	}
	if len(n.resp.NotifyResponse) > 0 {
		return n.resp.NotifyResponse[0].MessageID
	}
	if n.resp.Lookback != nil {
		return n.resp.Lookback.MessageID
	}
	return ""
}

type crashLive struct {
	run  *crashRun
	step string
	sub  *gqlclient.Sub
	res  *waitResult
	errs []gqlclient.Error
}

type crashIter struct {
	n         int
	runs      []*crashRun // W then L
	wRuns     []*crashRun
	lRuns     []*crashRun
	ended     string
	notifRuns []string
	notifies  []*crashNotify
	byNonce   map[string]*crashNotify
	live      []*crashLive
	threshold int
}

type crashStats struct {
	sent, acked, failed, unknown           int
	finishers                              int // notifies the audit sent to end waiting waiters
	unknownRepeatedCommitted               int // unknown notify steps found committed by their repeat
	unknownRepeatedNotCommitted            int // … found not committed (the repeat did it)
	unknownPlainDelivered, unknownPlainNot int // unknown notifies without step: landed or not
	resolvedWaiter, storedLookback         int // acked: how
	deliveriesAudited                      int // acked notifies found at their waiter or lookback
	resubscribes                           int // re-subscribes compared with the database
	liveChecked                            int // results clients got before a kill, compared after
	drained                                int // lookback events consumed by later waits
	errCodes                               map[string]int
}

type crashTest struct {
	t     *testing.T
	srv   *crashServer
	rng   *rand.Rand
	iters []*crashIter
	st    crashStats
}

// Server killed mid-flight: durable waiters and concurrent targeted notifies,
// SIGKILL at a random moment, restart, audit, N times.
func TestCrashKillLoop(t *testing.T) {
	db := testdb.MySQL(t)
	bin := crashBuild(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	ct := &crashTest{t: t, srv: newCrashServer(t, bin, db), rng: rand.New(rand.NewSource(seed))}
	ct.st.errCodes = map[string]int{}
	began := time.Now()
	ct.srv.start()
	for i := 1; i <= crashIterations; i++ {
		if time.Since(began) > crashBudget {
			t.Logf("time budget spent after %d iterations", i-1)
			break
		}
		it := ct.setup(i)
		ct.storm(it)
		ct.collectLive(it)
		ct.srv.start()
		ct.audit(it)
		ct.iters = append(ct.iters, it)
		if t.Failed() {
			break
		}
	}
	ct.finalAudit()

	st := ct.st
	t.Logf("kills: %d (SIGKILL), processes started: %d, elapsed %s", ct.srv.kills, ct.srv.starts, time.Since(began).Round(time.Millisecond))
	t.Logf("notifies sent during the storms: %d; acknowledged: %d; GraphQL errors: %d %v; unknown outcome (no response): %d",
		st.sent, st.acked, st.failed, st.errCodes, st.unknown)
	t.Logf("acknowledged in all (storm, repeats of unknown steps, %d audit finishers): resolved a waiter: %d, stored a lookback event: %d",
		st.finishers, st.resolvedWaiter, st.storedLookback)
	t.Logf("unknown outcomes: notify steps repeated after restart: %d had committed, %d had not; without step: %d landed, %d did not",
		st.unknownRepeatedCommitted, st.unknownRepeatedNotCommitted, st.unknownPlainDelivered, st.unknownPlainNot)
	t.Logf("deliveries audited: %d acknowledged notifies found at their waiter or lookback; %d re-subscribes compared with the database; %d pre-kill client results re-checked; %d lookback events drained by later waits",
		st.deliveriesAudited, st.resubscribes, st.liveChecked, st.drained)
}

// setup creates the runs of an iteration and registers the durable waiters.
func (ct *crashTest) setup(n int) *crashIter {
	t := ct.t
	ep := ct.srv.endpoint()
	it := &crashIter{n: n, byNonce: map[string]*crashNotify{}}
	for k := range crashWaiterRuns + crashLookbackRuns {
		r := &crashRun{kind: "W", steps: map[string]*crashStep{}}
		if k >= crashWaiterRuns {
			r.kind = "L"
		}
		r.id = crashTrigger(t, ep, fmt.Sprintf("crash%d%s", n, r.kind))
		r.ev = uid(fmt.Sprintf("crash-ev-%d", n))
		it.runs = append(it.runs, r)
		if r.kind == "W" {
			it.wRuns = append(it.wRuns, r)
		} else {
			it.lRuns = append(it.lRuns, r)
		}
	}
	for range crashNotifiers {
		it.notifRuns = append(it.notifRuns, crashTrigger(t, ep, fmt.Sprintf("crash%dN", n)))
	}
	it.ended = crashTrigger(t, ep, fmt.Sprintf("crash%dX", n))
	sdOK(t, ep, `mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`, map[string]any{"id": it.ended}, nil)

	conns := []*gqlclient.Conn{crashDial(t, ep), crashDial(t, ep)}
	for k, r := range it.wRuns {
		sub := crashSubscribe(t, conns[k%len(conns)], r.ev, waitOpts{run: r.id, step: "wait", timeout: "1h"})
		it.live = append(it.live, &crashLive{run: r, step: "wait", sub: sub})
	}
	for _, r := range it.wRuns {
		eventually(t, 10*time.Second, func() bool { return len(sdWaiters(t, ep, r.ev)) == 1 },
			"iteration %d: the waiter of %s registered", n, r.id)
	}
	return it
}

// storm runs the concurrent notifiers (and late waiters on the lookback
// runs) and SIGKILLs the server when a random number of them has been sent.
func (ct *crashTest) storm(it *crashIter) {
	t := ct.t
	ep := ct.srv.endpoint()
	it.threshold = 20 + ct.rng.Intn(380)
	lateConn := crashDial(t, ep)
	var (
		sent   atomic.Int64
		killed atomic.Bool
		mu     sync.Mutex
		wg     sync.WaitGroup
	)
	for g := range crashNotifiers {
		seed := ct.rng.Int63()
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed))
			var mine []*crashNotify
			var lives []*crashLive
			defer func() {
				mu.Lock()
				it.notifies = append(it.notifies, mine...)
				it.live = append(it.live, lives...)
				mu.Unlock()
			}()
			for seq := 0; !killed.Load(); seq++ {
				k := sent.Add(1)
				if k > int64(it.threshold) {
					return
				}
				if k == int64(it.threshold) {
					killed.Store(true)
					ct.srv.kill()
					return
				}
				// Now and then a late durable waiter on a lookback run,
				// racing the notifies to that run.
				if r.Intn(100) < 10 {
					lr := it.lRuns[r.Intn(len(it.lRuns))]
					if lr.late.CompareAndSwap(false, true) {
						ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
						sub, err := lateConn.Subscribe(ctx, waitSubscription, waitVars(lr.ev, waitOpts{run: lr.id, step: "late", timeout: "1h"}))
						cancel()
						if err == nil {
							lives = append(lives, &crashLive{run: lr, step: "late", sub: sub})
						}
						continue
					}
				}
				mine = append(mine, ct.sendOne(it, g, seq, r, ep))
			}
		}()
	}
	wg.Wait()
	require.True(t, killed.Load())
	ct.st.sent += len(it.notifies)
}

// sendOne sends one notify of a random kind and records what came back.
func (ct *crashTest) sendOne(it *crashIter, g, seq int, r *rand.Rand, ep string) *crashNotify {
	n := &crashNotify{nonce: fmt.Sprintf("i%d-g%d-s%d-%d", it.n, g, seq, r.Int63())}
	data := map[string]any{"nonce": n.nonce, "iteration": it.n, "text": "crash ✓ <&>"}
	p := r.Intn(100)
	switch {
	case p < 50:
		n.kind, n.target = crashToWaiterRun, it.wRuns[r.Intn(len(it.wRuns))]
	case p < 85:
		n.kind, n.target = crashToLookbackRun, it.lRuns[r.Intn(len(it.lRuns))]
	case p < 90:
		n.kind = crashErrNoRun
	case p < 95:
		n.kind, n.target = crashErrNoStepRun, it.wRuns[r.Intn(len(it.wRuns))]
	default:
		n.kind, n.target = crashErrEndedStep, it.wRuns[r.Intn(len(it.wRuns))]
	}
	n.vars = map[string]any{"data": data}
	switch n.kind {
	case crashErrNoRun:
		n.vars["ev"] = uid("crash-nobody")
		n.vars["run"] = "wfr_" + uid("crash-missing")
	case crashErrNoStepRun:
		n.vars["ev"], n.vars["run"] = n.target.ev, n.target.id
		n.vars["step"] = map[string]any{"workflowRunId": "wfr_" + uid("crash-missing"), "stepName": "s"}
		n.hasStep = true
	case crashErrEndedStep:
		n.vars["ev"], n.vars["run"] = n.target.ev, n.target.id
		n.vars["step"] = map[string]any{"workflowRunId": it.ended, "stepName": fmt.Sprintf("n-%d-%d", g, seq)}
		n.hasStep = true
	default:
		n.vars["ev"], n.vars["run"] = n.target.ev, n.target.id
		if r.Intn(2) == 0 {
			n.vars["step"] = map[string]any{"workflowRunId": it.notifRuns[g], "stepName": fmt.Sprintf("n-%d", seq)}
			n.hasStep = true
		}
	}
	crashPost(n, ep)
	return n
}

// crashPost sends the notify and classifies the outcome.
func crashPost(n *crashNotify, ep string) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := gqlclient.Post(ctx, ep, notifyMutation, n.vars)
	switch {
	case err != nil:
		n.outcome, n.err = crashUnknown, err.Error()
	case len(resp.Errors) > 0:
		n.code = resp.FirstCode()
		n.err = resp.Errors[0].Message
		if n.code == "OUTCOME_UNKNOWN" {
			n.outcome = crashUnknown
		} else {
			n.outcome = crashFailed
		}
	default:
		var out struct {
			Notify *notifyView `json:"notify"`
		}
		if derr := resp.Decode(&out); derr != nil || out.Notify == nil {
			n.outcome, n.err = crashUnknown, fmt.Sprintf("undecodable response %s: %v", resp.Data, derr)
			return
		}
		n.outcome, n.resp = crashAcked, out.Notify
	}
}

// collectLive waits for the clients' websockets to drop with the process and
// keeps what each subscription received before.
func (ct *crashTest) collectLive(it *crashIter) {
	t := ct.t
	for _, l := range it.live {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	read:
		for {
			ev, err := l.sub.Next(ctx)
			switch {
			case err != nil:
				// The connection dropped (or, wrongly, stayed open).
				require.NotErrorIs(t, err, context.DeadlineExceeded, "iteration %d: the websocket of %s/%s outlived the process", it.n, l.run.id, l.step)
				break read
			case ev.Complete:
				break read
			case ev.Errors != nil:
				l.errs = ev.Errors
				break read
			case ev.Response != nil:
				if len(ev.Response.Errors) > 0 {
					l.errs = ev.Response.Errors
					continue
				}
				var d struct {
					WaitForEvent *waitResult `json:"waitForEvent"`
				}
				require.NoError(t, ev.Response.Decode(&d))
				l.res = d.WaitForEvent
			}
		}
		cancel()
		if len(l.errs) > 0 {
			t.Errorf("iteration %d: the subscriber of %s/%s got an error before the kill: %+v", it.n, l.run.id, l.step, l.errs)
		}
	}
}

// audit runs after the restart: it resolves what it can of the unknown
// outcomes, re-subscribes every durable step, and checks every notify
// against the database.
func (ct *crashTest) audit(it *crashIter) {
	t := ct.t
	ep := ct.srv.endpoint()
	st := &ct.st
	stormNotifies, drainedBefore, unknownBefore := len(it.notifies), st.drained, st.unknown

	// Classify; a notify step whose outcome is unknown is repeated: the repeat
	// says whether the first call committed, or commits it now.
	for _, n := range it.notifies {
		it.byNonce[n.nonce] = n
		isErr := strings.HasPrefix(n.kind, "err-")
		switch n.outcome {
		case crashAcked:
			if isErr {
				t.Errorf("iteration %d: a notify that must fail (%s) was acknowledged: %+v", it.n, n.kind, n.resp)
			}
		case crashFailed:
			st.errCodes[n.code]++
			if !isErr {
				t.Logf("iteration %d: notify %s (%s) failed: %s %s", it.n, n.nonce, n.kind, n.code, n.err)
			}
		case crashUnknown:
			st.unknown++
			if n.hasStep && !isErr {
				crashPost(n, ep)
				require.Equal(t, crashAcked, n.outcome, "iteration %d: repeating notify step %s after the restart: %s %s", it.n, n.nonce, n.code, n.err)
				if n.resp.Deduplicated {
					n.repeated = "was-committed"
					st.unknownRepeatedCommitted++
				} else {
					n.repeated = "now-committed"
					st.unknownRepeatedNotCommitted++
				}
				continue
			}
		}
	}

	// Every durable step, re-subscribed.
	conn := crashDial(t, ep)
	type pending struct {
		run *crashRun
		w   waiterView
		sub *gqlclient.Sub
	}
	var ps []pending
	for _, r := range it.runs {
		v := crashRunView(t, ep, r.id)
		require.Equal(t, "RUN_STARTED", v.State, "run %s", r.id)
		steps := map[string]stepView{}
		for _, s := range v.Steps {
			require.Equal(t, "WAIT_FOR_EVENT", s.Type, "run %s step %s", r.id, s.StepName)
			steps[s.StepName] = s
		}
		require.Len(t, v.Waiters, len(v.Steps), "run %s: one waiter per step: waiters %+v steps %+v", r.id, v.Waiters, v.Steps)
		waiting := 0
		for _, w := range v.Waiters {
			require.NotNil(t, w.StepName, "run %s: a waiter without a step: %+v", r.id, w)
			s, ok := steps[*w.StepName]
			require.True(t, ok, "run %s: waiter %s has no step %q", r.id, w.ID, *w.StepName)
			require.Equal(t, r.ev, s.EventID)
			require.Equal(t, w.State != "WAITING", s.CompletedAt != nil, "run %s step %s: completedAt vs state %s", r.id, s.StepName, w.State)
			require.Contains(t, []string{"WAITING", "NOTIFIED"}, w.State, "run %s waiter %s", r.id, w.ID)
			if w.State == "WAITING" {
				waiting++
			}
			ps = append(ps, pending{run: r, w: w, sub: crashSubscribe(t, conn, r.ev, waitOpts{run: r.id, step: *w.StepName, timeout: "1h"})})
		}
		if waiting > 0 && len(v.LookbackEvents) > 0 {
			t.Errorf("iteration %d: run %s has a WAITING waiter and %d unconsumed lookback events on the same event id (rule 5: the event should have reached the waiter): waiters %+v lookback %+v",
				it.n, r.id, len(v.LookbackEvents), v.Waiters, v.LookbackEvents)
		}
		require.LessOrEqual(t, waiting, 1, "run %s", r.id)
	}
	// Waiters that ended answer at once; the waiting ones get a finisher.
	for _, p := range ps {
		if p.w.State == "WAITING" {
			continue
		}
		o := result(t, p.sub, 10*time.Second)
		require.Empty(t, o.Errors, "re-subscribe %s/%s", p.run.id, *p.w.StepName)
		require.NotNil(t, o.Result, "re-subscribe %s/%s", p.run.id, *p.w.StepName)
		ct.recordStep(it, p.run, p.w, o.Result)
	}
	for _, p := range ps {
		if p.w.State != "WAITING" {
			continue
		}
		fin := &crashNotify{kind: crashFinisher, target: p.run, nonce: uid(fmt.Sprintf("fin%d", it.n))}
		fin.vars = map[string]any{"ev": p.run.ev, "run": p.run.id, "data": map[string]any{"nonce": fin.nonce}}
		crashPost(fin, ep)
		require.Equal(t, crashAcked, fin.outcome, "finisher for %s: %s %s", p.run.id, fin.code, fin.err)
		require.Len(t, fin.resp.NotifyResponse, 1, "finisher for %s/%s must resolve its waiting waiter: %+v", p.run.id, *p.w.StepName, fin.resp)
		require.Equal(t, p.w.ID, fin.resp.NotifyResponse[0].Waiter.ID)
		it.notifies = append(it.notifies, fin)
		it.byNonce[fin.nonce] = fin
		o := result(t, p.sub, 10*time.Second)
		require.Empty(t, o.Errors)
		require.NotNil(t, o.Result)
		require.Equal(t, fin.messageID(), crashStr(o.Result.MessageID), "the re-subscribed client of %s/%s gets the finisher", p.run.id, *p.w.StepName)
		p.w.State = "NOTIFIED"
		ct.recordStep(it, p.run, p.w, o.Result)
	}
	// What the clients saw before the kill is what the database says now.
	for _, l := range it.live {
		if l.res == nil {
			continue
		}
		s := l.run.steps[l.step]
		if s == nil {
			t.Errorf("iteration %d: the client of %s/%s got a result before the kill, but the step is not in the database: %+v", it.n, l.run.id, l.step, l.res)
			continue
		}
		if d := crashSameResult(l.res, s.res); d != "" {
			t.Errorf("iteration %d: %s/%s: the result the client got before the kill differs from the re-subscribed one: %s", it.n, l.run.id, l.step, d)
		}
		st.liveChecked++
	}

	// Every delivery in the database: waiter results and stored lookback events.
	type place struct {
		run       *crashRun
		where     string // "waiter <id>" or "lookback <id>"
		messageID string
		data      json.RawMessage
	}
	deliveries := map[string][]place{} // by nonce
	lookbacks := map[*crashRun][]lookbackView{}
	for _, r := range it.runs {
		for _, s := range r.steps {
			if s.res.Timeout {
				continue
			}
			nonce := crashNonce(s.res.EventData)
			deliveries[nonce] = append(deliveries[nonce], place{run: r, where: "waiter " + s.waiterID, messageID: crashStr(s.res.MessageID), data: s.res.EventData})
		}
		v := crashRunView(t, ep, r.id)
		lookbacks[r] = v.LookbackEvents
		for _, lb := range v.LookbackEvents {
			require.Equal(t, r.ev, lb.EventID)
			nonce := crashNonce(lb.EventData)
			deliveries[nonce] = append(deliveries[nonce], place{run: r, where: "lookback " + lb.ID, messageID: lb.MessageID, data: lb.EventData})
		}
	}
	for nonce, ps := range deliveries {
		n := it.byNonce[nonce]
		if n == nil {
			t.Errorf("iteration %d: a delivery of a notification nobody sent (nonce %q): %+v", it.n, nonce, ps)
			continue
		}
		if len(ps) > 1 {
			t.Errorf("iteration %d: notify %s (%s, %s) delivered %d times: %+v", it.n, nonce, n.kind, n.outcome, len(ps), ps)
		}
		for _, p := range ps {
			if p.run != n.target {
				t.Errorf("iteration %d: notify %s for run %v delivered to run %s", it.n, nonce, n.vars["run"], p.run.id)
			}
			if !crashJSONEqual(p.data, mustJSON(n.vars["data"])) {
				t.Errorf("iteration %d: notify %s: eventData %s, sent %s", it.n, nonce, p.data, mustJSON(n.vars["data"]))
			}
		}
		if strings.HasPrefix(n.kind, "err-") || n.outcome == crashFailed {
			t.Errorf("iteration %d: notify %s (%s) returned %s %q (%s) yet it was delivered: %+v", it.n, nonce, n.kind, n.outcome, n.code, n.err, ps)
		}
	}
	for _, n := range it.notifies {
		ps := deliveries[n.nonce]
		switch {
		case n.outcome == crashAcked:
			switch {
			case n.kind == crashFinisher:
				st.finishers++
			case n.repeated == "":
				st.acked++
			}
			mid := n.messageID()
			switch {
			case len(n.resp.NotifyResponse) > 0:
				st.resolvedWaiter++
				if len(n.resp.NotifyResponse) != 1 {
					t.Errorf("iteration %d: notify %s resolved %d waiters of a run that has at most one: %+v", it.n, n.nonce, len(n.resp.NotifyResponse), n.resp.NotifyResponse)
				}
				if n.resp.Lookback != nil {
					t.Errorf("iteration %d: notify %s resolved a waiter and stored a lookback event: %+v", it.n, n.nonce, n.resp)
				}
				want := "waiter " + n.resp.NotifyResponse[0].Waiter.ID
				if len(ps) != 1 || ps[0].where != want || ps[0].messageID != mid {
					t.Errorf("iteration %d: acknowledged notify %s (%s, repeat %q) resolved %s with message %s, but the database has: %+v", it.n, n.nonce, n.kind, n.repeated, want, mid, ps)
					continue
				}
			case n.resp.Lookback != nil:
				st.storedLookback++
				if len(ps) != 1 || ps[0].messageID != mid {
					t.Errorf("iteration %d: acknowledged notify %s (%s, repeat %q) stored lookback %s (message %s), but the database has: %+v", it.n, n.nonce, n.kind, n.repeated, n.resp.Lookback.ID, mid, ps)
					continue
				}
				if strings.HasPrefix(ps[0].where, "lookback ") && ps[0].where != "lookback "+n.resp.Lookback.ID {
					t.Errorf("iteration %d: notify %s stored lookback %s, the run has it as %s", it.n, n.nonce, n.resp.Lookback.ID, ps[0].where)
				}
			default:
				t.Errorf("iteration %d: targeted notify %s neither resolved a waiter nor stored a lookback event: %+v", it.n, n.nonce, n.resp)
				continue
			}
			st.deliveriesAudited++
		case n.outcome == crashUnknown && !strings.HasPrefix(n.kind, "err-"):
			if len(ps) > 0 {
				st.unknownPlainDelivered++
			} else {
				st.unknownPlainNot++
			}
		}
		if n.outcome == crashFailed {
			st.failed++
		}
	}

	// Later waits consume the stored lookback events, oldest first.
	for j := range crashDrainPerRun {
		var drains []pending
		for _, r := range it.runs {
			if lbs := lookbacks[r]; len(lbs) > j {
				name := fmt.Sprintf("drain-%d", j)
				sub := crashSubscribe(t, conn, r.ev, waitOpts{run: r.id, step: name, timeout: "1h"})
				drains = append(drains, pending{run: r, w: waiterView{StepName: &name, State: "NOTIFIED"}, sub: sub})
			}
		}
		for _, d := range drains {
			lb := lookbacks[d.run][j]
			o := result(t, d.sub, 10*time.Second)
			require.Empty(t, o.Errors, "drain %s/%s", d.run.id, *d.w.StepName)
			require.NotNil(t, o.Result)
			require.False(t, o.Result.Timeout)
			require.Equal(t, lb.MessageID, crashStr(o.Result.MessageID), "iteration %d: %s/%s consumes the oldest lookback event", it.n, d.run.id, *d.w.StepName)
			require.True(t, crashJSONEqual(lb.EventData, o.Result.EventData), "drain eventData %s vs %s", o.Result.EventData, lb.EventData)
			d.w.ID = o.Result.WaiterID
			ct.recordStep(it, d.run, d.w, o.Result)
			st.drained++
		}
	}
	for _, r := range it.runs {
		v := crashRunView(t, ep, r.id)
		want := lookbacks[r][min(crashDrainPerRun, len(lookbacks[r])):]
		r.remaining = nil
		for _, lb := range want {
			r.remaining = append(r.remaining, lb.MessageID)
		}
		var got []string
		for _, lb := range v.LookbackEvents {
			got = append(got, lb.MessageID)
		}
		require.Equal(t, r.remaining, got, "iteration %d: run %s lookback events after the drain", it.n, r.id)
		require.Len(t, v.Waiters, len(r.steps), "run %s", r.id)
	}
	conn.CloseNow()
	t.Logf("iteration %d: SIGKILL at send #%d: %d notifies (%d unknown outcome), %d late waiters; audit: %d finishers, %d lookback events drained",
		it.n, it.threshold, stormNotifies, st.unknown-unknownBefore, len(it.live)-crashWaiterRuns, len(it.notifies)-stormNotifies, st.drained-drainedBefore)
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// recordStep checks a re-subscribed result against the database's waiter and keeps it.
func (ct *crashTest) recordStep(it *crashIter, r *crashRun, w waiterView, res *waitResult) {
	t := ct.t
	name := *w.StepName
	require.Equal(t, w.ID, res.WaiterID, "iteration %d: %s/%s: the re-subscribe attached to another waiter", it.n, r.id, name)
	require.Equal(t, r.ev, res.EventID)
	require.Equal(t, name, crashStr(res.StepName))
	require.Equal(t, r.id, crashStr(res.WorkflowRunID))
	require.Equal(t, w.State == "TIMED_OUT", res.Timeout, "iteration %d: %s/%s: database state %s, client got %+v", it.n, r.id, name, w.State, res)
	if w.State == "NOTIFIED" {
		require.NotNil(t, res.MessageID, "%s/%s", r.id, name)
		require.NotNil(t, res.NotifiedAt, "%s/%s", r.id, name)
		require.NotEmpty(t, crashNonce(res.EventData), "%s/%s: eventData %s", r.id, name, res.EventData)
	}
	require.Nil(t, r.steps[name], "%s/%s recorded twice", r.id, name)
	r.steps[name] = &crashStep{name: name, waiterID: w.ID, res: res}
	ct.st.resubscribes++
}

// finalAudit re-subscribes every step of every iteration once more, after
// all the later kills: the results have not changed, nor have the lookback
// events left.
func (ct *crashTest) finalAudit() {
	t := ct.t
	if len(ct.iters) == 0 || t.Failed() {
		return
	}
	ep := ct.srv.endpoint()
	for _, it := range ct.iters {
		conn := crashDial(t, ep)
		type pend struct {
			r   *crashRun
			s   *crashStep
			sub *gqlclient.Sub
		}
		var ps []pend
		for _, r := range it.runs {
			v := crashRunView(t, ep, r.id)
			var got []string
			for _, lb := range v.LookbackEvents {
				got = append(got, lb.MessageID)
			}
			require.Equal(t, r.remaining, got, "final: run %s lookback events", r.id)
			require.Len(t, v.Waiters, len(r.steps), "final: run %s waiters", r.id)
			names := make([]string, 0, len(r.steps))
			for name := range r.steps {
				names = append(names, name)
			}
			sort.Strings(names)
			for _, name := range names {
				ps = append(ps, pend{r: r, s: r.steps[name], sub: crashSubscribe(t, conn, r.ev, waitOpts{run: r.id, step: name, timeout: "1h"})})
			}
		}
		for _, p := range ps {
			o := result(t, p.sub, 10*time.Second)
			require.Empty(t, o.Errors)
			require.NotNil(t, o.Result)
			if d := crashSameResult(p.s.res, o.Result); d != "" {
				t.Errorf("final: %s/%s changed since its audit: %s", p.r.id, p.s.name, d)
			}
			ct.st.resubscribes++
		}
		conn.CloseNow()
	}
}

// ---------------------------------------------------------------------------
// TestCrashRestartTimers

// Restart with timers pending: durable waiters whose deadline passes while
// the server is dead are TIMED_OUT after the restart; those whose deadline
// is still ahead fire on time.
func TestCrashRestartTimers(t *testing.T) {
	db := testdb.MySQL(t)
	bin := crashBuild(t)
	srv := newCrashServer(t, bin, db)
	srv.start()
	ep := srv.endpoint()

	const nShort, nLong = 8, 8
	const shortTimeout, longTimeout = 2 * time.Second, 8 * time.Second
	shortEv, longEv := uid("crash-short"), uid("crash-long")
	type timed struct {
		run, ev, step string
		short         bool
		waiterID      string
		deadline      time.Time
	}
	var ws []*timed
	conn := crashDial(t, ep)
	var subs []*gqlclient.Sub
	for k := range nShort + nLong {
		w := &timed{run: crashTrigger(t, ep, "crash-timer"), ev: longEv, step: fmt.Sprintf("timer-%d", k), short: k < nShort}
		timeout := "8s"
		if w.short {
			w.ev, timeout = shortEv, "2s"
		}
		ws = append(ws, w)
		subs = append(subs, crashSubscribe(t, conn, w.ev, waitOpts{run: w.run, step: w.step, timeout: timeout}))
	}
	var registered time.Time
	eventually(t, 10*time.Second, func() bool {
		return len(sdWaiters(t, ep, shortEv)) == nShort && len(sdWaiters(t, ep, longEv)) == nLong
	}, "all waiters registered")
	registered = time.Now()
	byRun := map[string]*timed{}
	for _, w := range ws {
		byRun[w.run] = w
	}
	var lastShort, firstLong time.Time
	for _, ev := range []string{shortEv, longEv} {
		for _, v := range sdWaiters(t, ep, ev) {
			w := byRun[crashStr(v.WorkflowRunID)]
			require.NotNil(t, w, "waiter %+v", v)
			d, err := time.Parse(time.RFC3339Nano, v.Deadline)
			require.NoError(t, err)
			w.waiterID, w.deadline = v.ID, d
			if w.short {
				require.WithinDuration(t, registered.Add(shortTimeout), d, 2*time.Second)
				if d.After(lastShort) {
					lastShort = d
				}
			} else {
				require.WithinDuration(t, registered.Add(longTimeout), d, 2*time.Second)
				if firstLong.IsZero() || d.Before(firstLong) {
					firstLong = d
				}
			}
		}
	}

	srv.kill()
	killedAt := time.Now()
	require.True(t, killedAt.Before(lastShort), "the kill came after a short deadline; the test machine is too slow")
	// The clients lose their connection, without a result.
	select {
	case <-conn.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the websocket outlived the process")
	}
	for i, s := range subs {
		for ev := range s.C {
			require.Nil(t, ev.Response, "waiter %d got a result before its deadline: %+v", i, ev)
		}
	}

	// Wait, with the server dead, until the short deadlines have passed.
	eventually(t, 10*time.Second, func() bool { return time.Now().After(lastShort.Add(100 * time.Millisecond)) },
		"the short deadlines pass")
	srv.start()
	ep = srv.endpoint()
	restarted := time.Now()
	require.True(t, restarted.Before(firstLong.Add(-time.Second)), "restarted %s, too close to the long deadlines %s", restarted, firstLong)
	t.Logf("killed %s after registration; restarted %s after the last short deadline, %s before the first long one",
		killedAt.Sub(registered).Round(time.Millisecond), restarted.Sub(lastShort).Round(time.Millisecond), firstLong.Sub(restarted).Round(time.Millisecond))

	// Short ones: TIMED_OUT everywhere, at once.
	require.Empty(t, sdWaiters(t, ep, shortEv), "no short waiter may still be WAITING")
	require.Len(t, sdWaiters(t, ep, longEv), nLong, "the long waiters still wait")
	conn2 := crashDial(t, ep)
	type resub struct {
		w   *timed
		sub *gqlclient.Sub
	}
	var shorts []resub
	for _, w := range ws {
		v := crashRunView(t, ep, w.run)
		require.Len(t, v.Waiters, 1)
		require.Len(t, v.Steps, 1)
		if w.short {
			require.Equal(t, "TIMED_OUT", v.Waiters[0].State, "short waiter of %s after the restart", w.run)
			require.NotNil(t, v.Steps[0].CompletedAt, "the step of %s completed", w.run)
			shorts = append(shorts, resub{w, crashSubscribe(t, conn2, w.ev, waitOpts{run: w.run, step: w.step, timeout: "2s"})})
		} else {
			require.Equal(t, "WAITING", v.Waiters[0].State, "long waiter of %s after the restart", w.run)
			require.Nil(t, v.Steps[0].CompletedAt)
		}
	}
	for _, r := range shorts {
		asked := time.Now()
		o := result(t, r.sub, 5*time.Second)
		require.Empty(t, o.Errors)
		require.NotNil(t, o.Result)
		require.True(t, o.Completed)
		require.True(t, o.Result.Timeout, "short waiter of %s: %+v", r.w.run, o.Result)
		require.Equal(t, r.w.waiterID, o.Result.WaiterID)
		require.Equal(t, "null", strings.TrimSpace(string(orNull(o.Result.EventData))))
		require.Nil(t, o.Result.MessageID)
		require.Less(t, time.Since(asked), time.Second, "a timed-out step answers at once")
	}

	// Long ones: re-subscribed clients get timeout:true on time.
	type arrival struct {
		w   *timed
		at  time.Time
		o   outcome
		err error
	}
	arrivals := make(chan arrival, nLong)
	var wg sync.WaitGroup
	for _, w := range ws {
		if w.short {
			continue
		}
		sub := crashSubscribe(t, conn2, w.ev, waitOpts{run: w.run, step: w.step, timeout: "8s"})
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			a := arrival{w: w}
			for {
				ev, err := sub.Next(ctx)
				if err != nil {
					a.err = err
					break
				}
				if ev.Response != nil {
					a.at = time.Now()
					if len(ev.Response.Errors) > 0 {
						a.o.Errors = ev.Response.Errors
						continue
					}
					var d struct {
						WaitForEvent *waitResult `json:"waitForEvent"`
					}
					a.err = ev.Response.Decode(&d)
					a.o.Result = d.WaitForEvent
					continue
				}
				if ev.Errors != nil {
					a.o.Errors = ev.Errors
				}
				a.o.Completed = ev.Complete
				break
			}
			arrivals <- a
		}()
	}
	wg.Wait()
	close(arrivals)
	for a := range arrivals {
		require.NoError(t, a.err, "long waiter of %s", a.w.run)
		require.Empty(t, a.o.Errors)
		require.NotNil(t, a.o.Result)
		require.True(t, a.o.Completed)
		require.True(t, a.o.Result.Timeout, "long waiter of %s: %+v", a.w.run, a.o.Result)
		require.Equal(t, a.w.waiterID, a.o.Result.WaiterID)
		early := a.w.deadline.Sub(a.at)
		require.False(t, a.at.Before(a.w.deadline), "long waiter of %s timed out %s before its deadline %s", a.w.run, early, a.w.deadline.Format(time.RFC3339Nano))
		late := a.at.Sub(a.w.deadline)
		require.LessOrEqual(t, late, 2*time.Second, "long waiter of %s timed out %s after its deadline", a.w.run, late)
		t.Logf("long waiter %s: timeout:true %s after its deadline", a.w.run, late.Round(time.Millisecond))
	}
	for _, w := range ws {
		v := crashRunView(t, ep, w.run)
		require.Equal(t, "TIMED_OUT", v.Waiters[0].State, "waiter of %s at the end", w.run)
	}
	require.Empty(t, sdWaiters(t, ep, longEv))
}

func orNull(raw json.RawMessage) json.RawMessage {
	if len(raw) == 0 {
		return json.RawMessage("null")
	}
	return raw
}

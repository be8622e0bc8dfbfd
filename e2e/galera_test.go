package e2e

// Several replicas on a three-node MariaDB Galera cluster (scripts/galera):
// three server processes (the real binary), each on its own node, one
// Redis, clients spread at random over the replicas. Galera replicates
// writes, not row locks: a SELECT … FOR UPDATE on one node does not block
// the same statement on another, so these tests catch whatever relies on a
// locking read for exactly-once.
//
// Skipped unless a cluster answers (scripts/galera start, or
// RENDEZVOUS_TEST_GALERA=1 to have the test start one); CI sets
// RENDEZVOUS_REQUIRE_GALERA=1. RENDEZVOUS_GALERA_TRIALS sets the race's
// trial count (default galeraTrialsShort).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testgalera"
)

const (
	galeraTrialsShort = 1000
	galeraWorkers     = 6
	galeraConnsPer    = 2 // websocket connections per replica
)

// galeraTrials is the race's trial count: RENDEZVOUS_GALERA_TRIALS or the default.
func galeraTrials(t *testing.T) int {
	if v := os.Getenv("RENDEZVOUS_GALERA_TRIALS"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, "RENDEZVOUS_GALERA_TRIALS")
		return n
	}
	return galeraTrialsShort
}

// galeraReplicas is three replicas, replica i on node i+1.
type galeraReplicas struct {
	t     *testing.T
	urls  []string
	srvs  []*crashServer
	conns [][]*gqlclient.Conn
}

// newGaleraReplicas builds the binary and starts one replica per node. With
// redisURL "" the replicas run without Redis (catch-up only). The first
// replica starts alone, so that only one runs the migrations.
func newGaleraReplicas(t *testing.T, redisURL string, extraEnv ...string) *galeraReplicas {
	t.Helper()
	urls := testgalera.Database(t)
	bin := crashBuild(t)
	g := &galeraReplicas{t: t, urls: urls}
	env := append([]string{
		"REDIS_URL=" + redisURL,
		// One channel for the three: derived, it would differ per node's port.
		"RENDEZVOUS_BUS_CHANNEL=" + uid("rendezvous-galera"),
		"LOG_LEVEL=warn",
	}, extraEnv...)
	for _, u := range urls {
		g.srvs = append(g.srvs, newCrashServer(t, bin, u, env...))
	}
	g.srvs[0].start()
	var wg sync.WaitGroup
	for _, s := range g.srvs[1:] {
		wg.Add(1)
		go func() { defer wg.Done(); s.start() }()
	}
	wg.Wait()
	g.dialAll()
	return g
}

func (g *galeraReplicas) dialAll() {
	g.conns = make([][]*gqlclient.Conn, len(g.srvs))
	for i, s := range g.srvs {
		for range galeraConnsPer {
			g.conns[i] = append(g.conns[i], crashDial(g.t, s.endpoint()))
		}
	}
}

func (g *galeraReplicas) ep(i int) string { return g.srvs[i].endpoint() }

// post sends a GraphQL request without failing the test (for goroutines).
func galeraPost(endpoint, query string, vars map[string]any, v any) (code string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := gqlclient.Post(ctx, endpoint, query, vars)
	if err != nil {
		return "", err
	}
	if len(resp.Errors) > 0 {
		return resp.FirstCode(), fmt.Errorf("%s: %s", resp.FirstCode(), resp.Errors[0].Message)
	}
	if v != nil {
		return "", resp.Decode(v)
	}
	return "", nil
}

func galeraRunView(endpoint, id string) (*runView, error) {
	var out struct {
		WorkflowRun *runView `json:"workflowRun"`
	}
	if _, err := galeraPost(endpoint, runQuery, map[string]any{"id": id}, &out); err != nil {
		return nil, err
	}
	if out.WorkflowRun == nil {
		return nil, fmt.Errorf("run %s not found", id)
	}
	return out.WorkflowRun, nil
}

// raceStats counts what the trials of the race saw.
type raceStats struct {
	mu                          sync.Mutex
	trials                      int
	resolvedWaiter, viaLookback int // acknowledged notifies: how they were delivered
	lost                        int // lookback stored while the waiter kept waiting
	duplicated                  int
	otherWrong                  int
	notifyErrors                map[string]int // codes of notifies that failed (retried by a finisher)
	examples                    []string
}

func (s *raceStats) wrong(kind *int, format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	*kind++
	if len(s.examples) < 10 {
		s.examples = append(s.examples, fmt.Sprintf(format, args...))
	}
}

// Rule 5 on Galera: trigger, a targeted notify and a durable wait of the
// same run, each sent to a random replica, the notify and the wait at the
// same moment. Every acknowledged notify must reach the waiter exactly
// once: resolve it, or be stored and consumed by it. Never a lookback event
// stored while the waiter keeps waiting (what a locking read that Galera
// does not replicate gives), never both.
func TestGaleraNotifyWaitRace(t *testing.T) {
	testgalera.Require(t)
	g := newGaleraReplicas(t, redisURL(t))
	trials := galeraTrials(t)
	seed := time.Now().UnixNano()
	t.Logf("seed %d, %d trials, %d workers", seed, trials, galeraWorkers)
	st := &raceStats{notifyErrors: map[string]int{}}
	began := time.Now()
	var wg sync.WaitGroup
	next := make(chan int)
	for w := range galeraWorkers {
		rng := rand.New(rand.NewSource(seed + int64(w)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range next {
				g.raceTrial(k, rng, st)
			}
		}()
	}
	for k := range trials {
		next <- k
	}
	close(next)
	wg.Wait()
	t.Logf("%d trials in %s: acknowledged notifies delivered to the waiter directly: %d, through lookback: %d; notify errors (then finished by another notify): %v",
		st.trials, time.Since(began).Round(time.Millisecond), st.resolvedWaiter, st.viaLookback, st.notifyErrors)
	t.Logf("wrong: lost (lookback stored, waiter kept waiting): %d, delivered twice: %d, other: %d", st.lost, st.duplicated, st.otherWrong)
	for _, e := range st.examples {
		t.Log(e)
	}
	require.Zero(t, st.lost+st.duplicated+st.otherWrong, "rule 5 broken on Galera in %d of %d trials", st.lost+st.duplicated+st.otherWrong, st.trials)
	require.Equal(t, trials, st.trials)
}

// raceTrial runs one trial; what went wrong goes to st (it runs on a
// worker goroutine: no require here).
func (g *galeraReplicas) raceTrial(k int, rng *rand.Rand, st *raceStats) {
	a, b, c := rng.Intn(3), rng.Intn(3), rng.Intn(3)
	var tr struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
		} `json:"trigger"`
	}
	if _, err := galeraPost(g.ep(a), triggerMutation, map[string]any{"id": uid("galera-race")}, &tr); err != nil {
		st.wrong(&st.otherWrong, "trial %d: trigger on replica %d: %v", k, a, err)
		return
	}
	run := tr.Trigger.WorkflowRunID
	ev := uid("galera-ev")
	nonce := fmt.Sprintf("trial-%d-%d", k, rng.Int63())
	data := map[string]any{"nonce": nonce}
	where := fmt.Sprintf("trial %d (run %s: trigger on %d, notify on %d, wait on %d)", k, run, a, b, c)

	// Notify and wait at the same moment, one of them a little later now and then.
	delayNotify, delayWait := time.Duration(0), time.Duration(0)
	switch rng.Intn(3) {
	case 0:
		delayNotify = time.Duration(rng.Intn(3000)) * time.Microsecond
	case 1:
		delayWait = time.Duration(rng.Intn(3000)) * time.Microsecond
	}
	conn := g.conns[c][rng.Intn(len(g.conns[c]))]
	start := make(chan struct{})
	var (
		nv      notifyView
		nCode   string
		nErr    error
		sub     *gqlclient.Sub
		subErr  error
		started sync.WaitGroup
	)
	started.Add(2)
	go func() {
		defer started.Done()
		<-start
		time.Sleep(delayNotify) // the race's order, not a wait for an event
		var out struct {
			Notify notifyView `json:"notify"`
		}
		nCode, nErr = galeraPost(g.ep(b), notifyMutation, map[string]any{"ev": ev, "run": run, "data": data}, &out)
		nv = out.Notify
	}()
	go func() {
		defer started.Done()
		<-start
		time.Sleep(delayWait) // the race's order, not a wait for an event
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		sub, subErr = conn.Subscribe(ctx, waitSubscription, waitVars(ev, waitOpts{run: run, step: "w", timeout: "1h"}))
	}()
	close(start)
	started.Wait()
	if subErr != nil {
		st.wrong(&st.otherWrong, "%s: subscribe: %v", where, subErr)
		return
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = sub.Stop(ctx)
	}()

	wantMessage := ""
	switch {
	case nErr == nil:
		switch {
		case len(nv.NotifyResponse) == 1 && nv.Lookback == nil:
			wantMessage = nv.NotifyResponse[0].MessageID
		case len(nv.NotifyResponse) == 0 && nv.Lookback != nil:
			wantMessage = nv.Lookback.MessageID
		default:
			st.wrong(&st.otherWrong, "%s: notify answered %+v", where, nv)
			return
		}
	default:
		// A failed notify: whatever the code, the run must still get one
		// event. A finisher sends it; the audit below then accepts either
		// (the first one, if its outcome was unknown and it did land).
		code := nCode
		if code == "" {
			code = "no response"
		}
		st.mu.Lock()
		st.notifyErrors[code]++
		st.mu.Unlock()
		if _, err := galeraPost(g.ep(rng.Intn(3)), notifyMutation, map[string]any{"ev": ev, "run": run, "data": map[string]any{"nonce": nonce + "-finisher"}}, nil); err != nil {
			st.wrong(&st.otherWrong, "%s: the finisher notify after %v: %v", where, nErr, err)
			return
		}
	}

	res, stuck, err := g.awaitResult(sub, run, c)
	switch {
	case err != nil:
		st.wrong(&st.otherWrong, "%s: %v", where, err)
		return
	case stuck != nil:
		st.wrong(&st.lost, "%s: LOST: notify answered %s; the waiter kept waiting beside lookback events %+v", where, galeraNotifySummary(nv, nErr), stuck.LookbackEvents)
		return
	}
	got := crashNonce(res.EventData)
	if nErr == nil && (got != nonce || crashStr(res.MessageID) != wantMessage) {
		st.wrong(&st.otherWrong, "%s: the waiter got %s (message %s); the acknowledged notify was message %s (%s)", where, res.EventData, crashStr(res.MessageID), wantMessage, galeraNotifySummary(nv, nErr))
		return
	}
	// Delivered once: one waiter, NOTIFIED, and nothing left in lookback.
	v, err := galeraRunView(g.ep(rng.Intn(3)), run)
	if err != nil {
		st.wrong(&st.otherWrong, "%s: read the run: %v", where, err)
		return
	}
	if len(v.LookbackEvents) > 0 || len(v.Waiters) != 1 || v.Waiters[0].State != "NOTIFIED" {
		st.wrong(&st.duplicated, "%s: after the waiter got %s the run has waiters %+v, lookback %+v", where, got, v.Waiters, v.LookbackEvents)
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	st.trials++
	switch {
	case nErr != nil:
	case nv.Lookback != nil:
		st.viaLookback++
	default:
		st.resolvedWaiter++
	}
}

func galeraNotifySummary(nv notifyView, err error) string {
	if err != nil {
		return "error " + err.Error()
	}
	b, _ := json.Marshal(nv)
	return string(b)
}

// awaitResult waits for the subscription's result. Meanwhile it reads the
// run: a WAITING waiter beside an unconsumed lookback event on its event id
// is the lost delivery (both committed: the registration should have
// consumed it, or the notify resolved the waiter), returned as stuck.
func (g *galeraReplicas) awaitResult(sub *gqlclient.Sub, run string, replica int) (*waitResult, *runView, error) {
	deadline := time.Now().Add(20 * time.Second)
	var res *waitResult
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
		ev, err := sub.Next(ctx)
		cancel()
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			v, err := galeraRunView(g.ep(replica), run)
			if err != nil {
				return nil, nil, fmt.Errorf("read the run: %w", err)
			}
			waiting := 0
			for _, w := range v.Waiters {
				if w.State == "WAITING" {
					waiting++
				}
			}
			if waiting > 0 && len(v.LookbackEvents) > 0 {
				return nil, v, nil
			}
		case err != nil:
			return nil, nil, fmt.Errorf("subscription: %w", err)
		case ev.Complete:
			if res == nil {
				return nil, nil, errors.New("the subscription completed without a result")
			}
			return res, nil, nil
		case ev.Errors != nil:
			return nil, nil, fmt.Errorf("subscription error: %+v", ev.Errors)
		case ev.Response != nil:
			if len(ev.Response.Errors) > 0 {
				return nil, nil, fmt.Errorf("subscription error: %+v", ev.Response.Errors)
			}
			var d struct {
				WaitForEvent *waitResult `json:"waitForEvent"`
			}
			if err := ev.Response.Decode(&d); err != nil {
				return nil, nil, err
			}
			if res != nil {
				return nil, nil, errors.New("a second result")
			}
			res = d.WaitForEvent
		}
	}
	return nil, nil, errors.New("no result within 20s, and no lookback event beside the waiting waiter")
}

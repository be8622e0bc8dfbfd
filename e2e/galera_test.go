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
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
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
	g.race(galeraTrials(t), nil)
}

// race runs the trials of the notify-vs-wait race on galeraWorkers
// workers and fails the test on any wrong delivery. before, when set, is
// called before trial k is handed out (to inject faults mid-run).
func (g *galeraReplicas) race(trials int, before func(k int)) {
	t := g.t
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
		if before != nil {
			before(k)
		}
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
	require.Zero(t, st.lost+st.duplicated+st.otherWrong, "rule 5 broken on Galera in %d of %d trials", st.lost+st.duplicated+st.otherWrong, trials)
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
	var (
		nv     notifyView
		nCode  string
		nErr   error
		sub    *gqlclient.Sub
		subErr error
	)
	together(
		func() {
			time.Sleep(delayNotify) // the race's order, not a wait for an event
			var out struct {
				Notify notifyView `json:"notify"`
			}
			nCode, nErr = galeraPost(g.ep(b), notifyMutation, map[string]any{"ev": ev, "run": run, "data": data}, &out)
			nv = out.Notify
		},
		func() {
			time.Sleep(delayWait) // the race's order, not a wait for an event
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			sub, subErr = conn.Subscribe(ctx, waitSubscription, waitVars(ev, waitOpts{run: run, step: "w", timeout: "1h"}))
		},
	)
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
		st.wrong(&st.otherWrong, "%s: notify answered %s; %v", where, galeraNotifySummary(nv, nErr), err)
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
	v, err := galeraRunView(g.ep(replica), run)
	return nil, nil, fmt.Errorf("no result within 20s, and no lookback event beside the waiting waiter: run %+v (%v); rows: %s", v, err, g.dump(run))
}

const cancelMutation2 = `mutation($id: ID!) { cancel(workflowRunId: $id) { state } }`

// galeraTrigger creates a run through replica i.
func (g *galeraReplicas) trigger(i int) string {
	g.t.Helper()
	var out struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
		} `json:"trigger"`
	}
	sdOK(g.t, g.ep(i), triggerMutation, map[string]any{"id": uid("galera")}, &out)
	return out.Trigger.WorkflowRunID
}

func (g *galeraReplicas) conn(rng *rand.Rand, i int) *gqlclient.Conn {
	return g.conns[i][rng.Intn(len(g.conns[i]))]
}

// Broadcasts, time-outs and cancels with the parties spread over the three
// replicas (on three nodes): every waiter ends once, and what each party
// was told agrees with what the others were told.
func TestGaleraBroadcastTimeoutCancel(t *testing.T) {
	testgalera.Require(t)
	g := newGaleraReplicas(t, redisURL(t))
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))

	t.Run("broadcast", func(t *testing.T) {
		for round := range 5 {
			ev := uid("galera-bc")
			const n = 12
			subs := make([]*gqlclient.Sub, n)
			for k := range subs {
				s, err := g.conn(rng, k%3).Subscribe(ctxT(t), waitSubscription, waitVars(ev, waitOpts{timeout: "1h"}))
				require.NoError(t, err)
				subs[k] = s
			}
			for i := range 3 {
				eventually(t, 10*time.Second, func() bool { return len(sdWaiters(t, g.ep(i), ev)) == n },
					"round %d: replica %d lists the %d waiters", round, i, n)
			}
			var out struct {
				Notify notifyView `json:"notify"`
			}
			sdOK(t, g.ep(rng.Intn(3)), notifyMutation, map[string]any{"ev": ev, "data": map[string]any{"round": round}}, &out)
			require.Len(t, out.Notify.NotifyResponse, n, "round %d: the broadcast resolves every waiter of the three replicas", round)
			byWaiter := map[string]string{}
			for _, r := range out.Notify.NotifyResponse {
				byWaiter[r.Waiter.ID] = r.MessageID
			}
			for _, s := range subs {
				res := mustResult(t, s)
				require.Equal(t, byWaiter[res.WaiterID], crashStr(res.MessageID), "round %d: waiter %s", round, res.WaiterID)
				delete(byWaiter, res.WaiterID)
			}
			require.Empty(t, byWaiter, "round %d: resolved waiters no subscriber had", round)
			require.Empty(t, sdWaiters(t, g.ep(rng.Intn(3)), ev))
		}
	})

	t.Run("timeouts racing notifies", func(t *testing.T) {
		// Durable waiters with a short deadline, each with a targeted
		// notify sent about when it passes: the waiter ends TIMED_OUT and
		// the notify is stored, or the notify resolves it; never both.
		const n = 18
		type trial struct {
			run, ev string
			sub     *gqlclient.Sub
			nv      notifyView
		}
		trials := make([]*trial, n)
		for k := range trials {
			tr := &trial{run: g.trigger(rng.Intn(3)), ev: uid("galera-to")}
			s, err := g.conn(rng, rng.Intn(3)).Subscribe(ctxT(t), waitSubscription, waitVars(tr.ev, waitOpts{run: tr.run, step: "w", timeout: "1s"}))
			require.NoError(t, err)
			tr.sub = s
			trials[k] = tr
		}
		for _, tr := range trials {
			eventually(t, 10*time.Second, func() bool { return len(sdWaiters(t, g.ep(0), tr.ev)) == 1 }, "waiter of %s", tr.run)
		}
		time.Sleep(700 * time.Millisecond) // to bring the notifies near the deadline, not a wait for an event
		var wg sync.WaitGroup
		for k, tr := range trials {
			wg.Add(1)
			go func() {
				defer wg.Done()
				time.Sleep(time.Duration(k*40) * time.Millisecond) // spread over the deadline, not a wait for an event
				var out struct {
					Notify notifyView `json:"notify"`
				}
				_, err := galeraPost(g.ep(k%3), notifyMutation, map[string]any{"ev": tr.ev, "run": tr.run, "data": "late"}, &out)
				if err != nil {
					t.Errorf("notify %s: %v", tr.run, err)
				}
				tr.nv = out.Notify
			}()
		}
		wg.Wait()
		timedOut, resolved := 0, 0
		for _, tr := range trials {
			res := mustResult(t, tr.sub)
			v := crashRunView(t, g.ep(rng.Intn(3)), tr.run)
			require.Len(t, v.Waiters, 1)
			if res.Timeout {
				timedOut++
				require.Equal(t, "TIMED_OUT", v.Waiters[0].State)
				require.Empty(t, tr.nv.NotifyResponse, "run %s: the waiter timed out, yet the notify says it resolved it", tr.run)
				require.NotNil(t, tr.nv.Lookback, "run %s: the notify after the time-out is stored", tr.run)
				require.Len(t, v.LookbackEvents, 1)
			} else {
				resolved++
				require.Equal(t, "NOTIFIED", v.Waiters[0].State)
				require.Len(t, tr.nv.NotifyResponse, 1, "run %s: the waiter got the notify: %+v", tr.run, tr.nv)
				require.Equal(t, tr.nv.NotifyResponse[0].MessageID, crashStr(res.MessageID))
				require.Empty(t, v.LookbackEvents)
			}
		}
		t.Logf("%d waiters: %d timed out (the notify stored), %d resolved by the notify", n, timedOut, resolved)
	})

	t.Run("notify steps racing", func(t *testing.T) {
		// The same notify step sent through two replicas at once: one
		// notifies, the other is its deduplicated repeat; the event is
		// delivered once.
		const n = 30
		for k := range n {
			target, notifier, ev := g.trigger(rng.Intn(3)), g.trigger(rng.Intn(3)), uid("galera-st")
			a := rng.Intn(3)
			b := (a + 1 + rng.Intn(2)) % 3 // another replica
			var (
				nvs  [2]notifyView
				errs [2]error
				wg   sync.WaitGroup
			)
			for j, rep := range []int{a, b} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var out struct {
						Notify notifyView `json:"notify"`
					}
					_, errs[j] = galeraPost(g.ep(rep), notifyMutation, map[string]any{"ev": ev, "run": target, "data": k,
						"step": map[string]any{"workflowRunId": notifier, "stepName": "s"}}, &out)
					nvs[j] = out.Notify
				}()
			}
			wg.Wait()
			require.NoError(t, errs[0], "trial %d", k)
			require.NoError(t, errs[1], "trial %d", k)
			require.NotEqual(t, nvs[0].Deduplicated, nvs[1].Deduplicated, "trial %d: exactly one of the two is the repeat: %+v", k, nvs)
			for _, nv := range nvs {
				require.NotNil(t, nv.Lookback, "trial %d: nobody waits: the first stores, the repeat returns the same: %+v", k, nv)
			}
			require.Equal(t, nvs[0].Lookback.MessageID, nvs[1].Lookback.MessageID, "trial %d", k)
			v := crashRunView(t, g.ep(rng.Intn(3)), target)
			require.Len(t, v.LookbackEvents, 1, "trial %d: stored once", k)
		}
	})

	t.Run("cancel racing notifies", func(t *testing.T) {
		const n = 30
		notified, canceledFirst := 0, 0
		for k := range n {
			run, ev := g.trigger(rng.Intn(3)), uid("galera-cx")
			sub, err := g.conn(rng, rng.Intn(3)).Subscribe(ctxT(t), waitSubscription, waitVars(ev, waitOpts{run: run, step: "w", timeout: "1h"}))
			require.NoError(t, err)
			eventually(t, 10*time.Second, func() bool { return len(sdWaiters(t, g.ep(k%3), ev)) == 1 }, "waiter of %s", run)
			var (
				nv           notifyView
				nCode, cCode string
				nErr, cErr   error
				wg           sync.WaitGroup
			)
			notifyOn, cancelOn := rng.Intn(3), rng.Intn(3) // rng is not for goroutines
			wg.Add(2)
			go func() {
				defer wg.Done()
				var out struct {
					Notify notifyView `json:"notify"`
				}
				nCode, nErr = galeraPost(g.ep(notifyOn), notifyMutation, map[string]any{"ev": ev, "run": run, "data": k}, &out)
				nv = out.Notify
			}()
			go func() {
				defer wg.Done()
				cCode, cErr = galeraPost(g.ep(cancelOn), cancelMutation2, map[string]any{"id": run}, nil)
			}()
			wg.Wait()
			require.NoError(t, cErr, "cancel of %s (%s): the run was started", run, cCode)
			o := result(t, sub, 15*time.Second)
			v := crashRunView(t, g.ep(rng.Intn(3)), run)
			require.Equal(t, "RUN_CANCELED", v.State)
			require.Empty(t, v.LookbackEvents, "run %s: a canceled run keeps no lookback event", run)
			require.Len(t, v.Waiters, 1)
			if nErr == nil {
				notified++
				require.Len(t, nv.NotifyResponse, 1, "run %s: the notify before the cancel resolved the waiter: %+v", run, nv)
				require.Nil(t, nv.Lookback)
				require.Empty(t, o.Errors, "run %s: the notify was acknowledged, the subscriber must get it", run)
				require.NotNil(t, o.Result)
				require.Equal(t, nv.NotifyResponse[0].MessageID, crashStr(o.Result.MessageID))
				require.Equal(t, "NOTIFIED", v.Waiters[0].State)
			} else {
				canceledFirst++
				require.Equal(t, "RUN_NOT_ACTIVE", nCode, "run %s: the notify after the cancel: %v", run, nErr)
				require.Equal(t, "RUN_NOT_ACTIVE", o.code(), "run %s: the subscriber of a canceled run: %+v", run, o)
				require.Equal(t, "CANCELED", v.Waiters[0].State)
			}
		}
		t.Logf("%d races: notify first %d, cancel first %d", n, notified, canceledFirst)
	})
}

// Durable steps outlive their replica: the replica their clients used is
// SIGKILLed, notifies keep arriving through the others, and the clients
// re-attach through another replica (on another node) to the same waiters.
func TestGaleraReattachAfterReplicaKill(t *testing.T) {
	testgalera.Require(t)
	g := newGaleraReplicas(t, redisURL(t))
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	const n = 20
	type step struct {
		run, ev, waiterID string
		nv                *notifyView
	}
	steps := make([]*step, n)
	for k := range steps {
		s := &step{run: g.trigger(rng.Intn(3)), ev: uid("galera-re")}
		_, err := g.conn(rng, 0).Subscribe(ctxT(t), waitSubscription, waitVars(s.ev, waitOpts{run: s.run, step: "w", timeout: "1h"}))
		require.NoError(t, err)
		steps[k] = s
	}
	for _, s := range steps {
		eventually(t, 10*time.Second, func() bool {
			ws := sdWaiters(t, g.ep(1+rng.Intn(2)), s.ev)
			if len(ws) == 1 {
				s.waiterID = ws[0].ID
			}
			return len(ws) == 1
		}, "the waiter of %s", s.run)
	}
	g.srvs[0].kill()
	// Half are notified while their clients are away.
	for _, s := range steps[:n/2] {
		var out struct {
			Notify notifyView `json:"notify"`
		}
		sdOK(t, g.ep(1+rng.Intn(2)), notifyMutation, map[string]any{"ev": s.ev, "run": s.run, "data": s.run}, &out)
		require.Len(t, out.Notify.NotifyResponse, 1, "run %s: the durable waiter of a dead replica's client is resolved", s.run)
		require.Equal(t, s.waiterID, out.Notify.NotifyResponse[0].Waiter.ID)
		s.nv = &out.Notify
	}
	subs := make([]*gqlclient.Sub, n)
	for k, s := range steps {
		sub, err := g.conn(rng, 1+rng.Intn(2)).Subscribe(ctxT(t), waitSubscription, waitVars(s.ev, waitOpts{run: s.run, step: "w", timeout: "1h"}))
		require.NoError(t, err)
		subs[k] = sub
	}
	for k, s := range steps[:n/2] {
		res := mustResult(t, subs[k])
		require.Equal(t, s.waiterID, res.WaiterID)
		require.Equal(t, s.nv.NotifyResponse[0].MessageID, crashStr(res.MessageID), "run %s: re-attached, the result of the notify", s.run)
	}
	for k, s := range steps[n/2:] {
		k += n / 2
		eventually(t, 10*time.Second, func() bool { return len(sdWaiters(t, g.ep(1+rng.Intn(2)), s.ev)) == 1 }, "still one waiter on %s", s.run)
		var out struct {
			Notify notifyView `json:"notify"`
		}
		sdOK(t, g.ep(1+rng.Intn(2)), notifyMutation, map[string]any{"ev": s.ev, "run": s.run, "data": s.run}, &out)
		require.Len(t, out.Notify.NotifyResponse, 1, "run %s: %+v", s.run, out.Notify)
		require.Equal(t, s.waiterID, out.Notify.NotifyResponse[0].Waiter.ID, "run %s: the re-attached client has the same waiter", s.run)
		res := mustResult(t, subs[k])
		require.Equal(t, s.waiterID, res.WaiterID)
		require.Equal(t, out.Notify.NotifyResponse[0].MessageID, crashStr(res.MessageID))
	}
	g.srvs[0].start() // the replica comes back on its node
	for _, s := range steps {
		v := crashRunView(t, g.ep(0), s.run)
		require.Len(t, v.Waiters, 1)
		require.Equal(t, "NOTIFIED", v.Waiters[0].State)
		require.Empty(t, v.LookbackEvents)
	}
}

// galeraReadyStatus is the HTTP status of a replica's /readyz (0: no answer).
func galeraReadyStatus(base string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/readyz", nil)
	if err != nil {
		return 0
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// A Galera node killed mid-run, under a storm of targeted notifies spread
// over the three replicas: the replica on the dead node turns unready, its
// clients get SERVICE_UNAVAILABLE or OUTCOME_UNKNOWN (nothing else), the
// others go on; the node rejoins, the replica recovers by itself; and every
// acknowledged notify is found once at its waiter or lookback event, every
// refused one nowhere.
func TestGaleraNodeKilled(t *testing.T) {
	testgalera.Require(t)
	g := newGaleraReplicas(t, redisURL(t))
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	const (
		victim    = 1 // replica 1, on node 2
		waitRuns  = 24
		plainRuns = 8
		notifiers = 6
	)
	type nrun struct {
		id, ev string
		sub    *gqlclient.Sub
	}
	var runs []*nrun
	for k := range waitRuns + plainRuns {
		r := &nrun{id: g.trigger(rng.Intn(3)), ev: uid("galera-nk")}
		if k < waitRuns {
			sub, err := g.conn(rng, rng.Intn(3)).Subscribe(ctxT(t), waitSubscription, waitVars(r.ev, waitOpts{run: r.id, step: "w", timeout: "1h"}))
			require.NoError(t, err)
			r.sub = sub
		}
		runs = append(runs, r)
	}
	for _, r := range runs[:waitRuns] {
		eventually(t, 10*time.Second, func() bool { return len(sdWaiters(t, g.ep(0), r.ev)) == 1 }, "the waiter of %s", r.id)
	}

	type sent struct {
		run            *nrun
		nonce, replica string
		outcome, code  string
		nv             notifyView
	}
	var (
		mu    sync.Mutex
		all   []*sent
		stop  = make(chan struct{})
		wg    sync.WaitGroup
		phase atomic.Int32 // 0 before the kill, 1 node down, 2 rejoined
	)
	for w := range notifiers {
		r := rand.New(rand.NewSource(seed + int64(w) + 1))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := 0; ; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				run := runs[r.Intn(len(runs))]
				rep := r.Intn(3)
				s := &sent{run: run, nonce: fmt.Sprintf("w%d-%d-%d", w, seq, r.Int63()), replica: strconv.Itoa(rep)}
				var out struct {
					Notify notifyView `json:"notify"`
				}
				code, err := galeraPost(g.ep(rep), notifyMutation, map[string]any{"ev": run.ev, "run": run.id, "data": map[string]any{"nonce": s.nonce}}, &out)
				switch {
				case err == nil:
					s.outcome, s.nv = crashAcked, out.Notify
				case code == "" || code == "OUTCOME_UNKNOWN":
					s.outcome, s.code = crashUnknown, code
				default:
					s.outcome, s.code = crashFailed, code
				}
				s.replica += fmt.Sprintf("/phase%d", phase.Load())
				mu.Lock()
				all = append(all, s)
				mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond) // a failing replica: pace the retries, not a wait for an event
				}
			}
		}()
	}
	began := time.Now()
	waitSent := func(n int) {
		eventually(t, 30*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(all) >= n }, "%d notifies sent", n)
	}
	waitSent(200)
	require.NoError(t, testgalera.Run(ctxT(t), "kill", strconv.Itoa(victim+1)))
	phase.Store(1)
	killedAt := time.Now()
	eventually(t, 30*time.Second, func() bool { return galeraReadyStatus(g.srvs[victim].base) == http.StatusServiceUnavailable },
		"replica %d's /readyz says 503 once its node is dead", victim)
	t.Logf("replica %d unready %s after its node was killed", victim, time.Since(killedAt).Round(time.Millisecond))
	mu.Lock()
	before := len(all)
	mu.Unlock()
	waitSent(before + 200)
	// The rejoin (IST) takes 11-17 s on a quiet machine and more on a busy
	// one: as long as scripts/galera itself waits for Synced (2 minutes),
	// not ctxT's 30 s (a run on a loaded machine had it killed mid-rejoin).
	rctx, rcancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer rcancel()
	require.NoError(t, testgalera.Run(rctx, "restart", strconv.Itoa(victim+1)))
	restartedAt := time.Now()
	eventually(t, 60*time.Second, func() bool { return galeraReadyStatus(g.srvs[victim].base) == http.StatusOK },
		"replica %d ready again once its node rejoined", victim)
	phase.Store(2)
	t.Logf("node %d rejoined in %s; replica %d ready %s after", victim+1, restartedAt.Sub(killedAt).Round(time.Millisecond), victim, time.Since(restartedAt).Round(time.Millisecond))
	mu.Lock()
	before = len(all)
	mu.Unlock()
	waitSent(before + 200)
	close(stop)
	wg.Wait()

	// The subscribers: a result, or (on the dead node's replica) an error
	// saying the service is unavailable; then everyone re-attaches through
	// replica 0 and the waiting ones get a finisher.
	byNonce := map[string]*sent{}
	codes := map[string]int{}
	acked, failed, unknown := 0, 0, 0
	for _, s := range all {
		byNonce[s.nonce] = s
		switch s.outcome {
		case crashAcked:
			acked++
		case crashFailed:
			failed++
			codes[s.code]++
			if s.code != "SERVICE_UNAVAILABLE" {
				t.Errorf("notify %s through replica %s: %s (only SERVICE_UNAVAILABLE or OUTCOME_UNKNOWN may come of a dead node)", s.nonce, s.replica, s.code)
			}
		default:
			unknown++
			codes["unknown:"+s.code]++
		}
	}
	conn := crashDial(t, g.ep(0))
	deliveries := map[string][]string{}
	subErrs := map[string]int{}
	for _, r := range runs {
		if r.sub != nil {
			sub := crashSubscribe(t, conn, r.ev, waitOpts{run: r.id, step: "w", timeout: "1h"})
			v := crashRunView(t, g.ep(0), r.id)
			require.Len(t, v.Waiters, 1, "run %s", r.id)
			if v.Waiters[0].State == "WAITING" {
				require.Empty(t, v.LookbackEvents, "run %s: a waiting waiter beside lookback events", r.id)
				sdOK(t, g.ep(0), notifyMutation, map[string]any{"ev": r.ev, "run": r.id, "data": map[string]any{"nonce": "finisher"}}, nil)
			}
			res := mustResult(t, sub)
			if n := crashNonce(res.EventData); n != "finisher" {
				deliveries[n] = append(deliveries[n], r.id+" waiter")
			}
			// The first subscriber, whichever replica it was on (the one on
			// the dead node included), got the same result, or an error
			// saying its replica could not reach the database.
			o := result(t, r.sub, 15*time.Second)
			switch {
			case len(o.Errors) > 0:
				subErrs[o.code()]++
				if c := o.code(); c != "SERVICE_UNAVAILABLE" && c != "OUTCOME_UNKNOWN" {
					t.Errorf("run %s: the first subscriber got %+v", r.id, o.Errors)
				}
			case o.Result == nil:
				t.Errorf("run %s: the first subscriber's stream ended without a result", r.id)
			default:
				subErrs["result"]++
				if d := crashSameResult(o.Result, res); d != "" {
					t.Errorf("run %s: the first subscriber's result differs from the re-attached one: %s", r.id, d)
				}
			}
		}
		v := crashRunView(t, g.ep(0), r.id)
		for _, lb := range v.LookbackEvents {
			n := crashNonce(lb.EventData)
			deliveries[n] = append(deliveries[n], r.id+" lookback "+lb.ID)
		}
	}
	for n, where := range deliveries {
		s := byNonce[n]
		switch {
		case s == nil:
			t.Errorf("delivered a notification nobody sent: %q at %v", n, where)
		case len(where) > 1:
			t.Errorf("notify %s delivered %d times: %v", n, len(where), where)
		case s.outcome == crashFailed:
			t.Errorf("notify %s through replica %s answered %s, yet it was delivered at %v", n, s.replica, s.code, where)
		}
	}
	for _, s := range all {
		if s.outcome == crashAcked && len(deliveries[s.nonce]) != 1 {
			t.Errorf("acknowledged notify %s through replica %s (%+v) found %d times: %v", s.nonce, s.replica, s.nv, len(deliveries[s.nonce]), deliveries[s.nonce])
		}
	}
	t.Logf("%d notifies in %s: %d acknowledged (all audited), %d refused, %d unknown outcome; codes %v; subscribers' errors %v",
		len(all), time.Since(began).Round(time.Millisecond), acked, failed, unknown, codes, subErrs)
}

// privateRedis is a redis-server of the test's own (the machine's Redis is
// shared: the test must not kill it), on a fixed port so that a restart
// comes back where the replicas look for it.
type privateRedis struct {
	t    *testing.T
	port string
	cmd  *exec.Cmd
	done chan struct{}
}

func newPrivateRedis(t *testing.T) *privateRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv(testgalera.EnvRequire) == "1" {
			t.Fatalf("redis-server not installed: %v", err)
		}
		t.Skipf("redis-server not installed: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	r := &privateRedis{t: t, port: strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)}
	ln.Close()
	r.start()
	t.Cleanup(r.kill)
	return r
}

func (r *privateRedis) url() string { return "redis://127.0.0.1:" + r.port + "/0" }

func (r *privateRedis) start() {
	r.t.Helper()
	r.cmd = exec.Command("redis-server", "--port", r.port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning")
	require.NoError(r.t, r.cmd.Start())
	r.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(r.cmd, r.done)
	eventually(r.t, 10*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+r.port, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, "redis-server on port %s answers", r.port)
}

func (r *privateRedis) kill() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGKILL)
	<-r.done
	r.cmd = nil
}

// Redis, the replicas' bus, SIGKILLed in the middle of the race and
// started again: deliveries go on through the catch-up poll while it is
// away, and through Redis once it is back; nothing is lost or doubled.
func TestGaleraRedisKilled(t *testing.T) {
	testgalera.Require(t)
	rd := newPrivateRedis(t)
	g := newGaleraReplicas(t, rd.url(), "RENDEZVOUS_CATCHUP_INTERVAL=300ms")
	trials := max(150, galeraTrials(t)/4)
	g.race(trials, func(k int) {
		switch k {
		case trials / 3:
			rd.kill()
			t.Logf("Redis killed before trial %d", k)
		case 2 * trials / 3:
			rd.start()
			t.Logf("Redis started again before trial %d", k)
		}
	})
}

// No Redis at all: the replicas hear of each other's waiter ends only
// through the catch-up poll.
func TestGaleraNoRedis(t *testing.T) {
	testgalera.Require(t)
	g := newGaleraReplicas(t, "", "RENDEZVOUS_CATCHUP_INTERVAL=300ms")
	g.race(max(100, galeraTrials(t)/10), nil)
}

// dump lists the run's rows as each node has them (for failure messages).
func (g *galeraReplicas) dump(run string) string {
	var b strings.Builder
	for i, u := range g.urls {
		p, _ := url.Parse(u)
		cfg := mysql.NewConfig()
		cfg.Net, cfg.Addr, cfg.User, cfg.DBName = "tcp", p.Host, "root", strings.TrimPrefix(p.Path, "/")
		db, err := sql.Open("mysql", cfg.FormatDSN())
		if err != nil {
			fmt.Fprintf(&b, "node %d: %v; ", i+1, err)
			continue
		}
		for _, q := range []string{
			"SELECT seq, consumed, COALESCE(consumed_at,''), created_at, expires_at, message_id FROM lookback_events WHERE run_id = ?",
			"SELECT seq, state, created_at, COALESCE(ended_at,''), COALESCE(message_id,''), '', '' FROM waiters WHERE run_id = ?",
			"SELECT seq, state, lock_version, updated_at, '', '' FROM runs WHERE id = ?",
		} {
			rows, err := db.Query(q, run)
			if err != nil {
				fmt.Fprintf(&b, "node %d: %v; ", i+1, err)
				continue
			}
			cols, _ := rows.Columns()
			for rows.Next() {
				vals := make([]sql.RawBytes, len(cols))
				ptrs := make([]any, len(cols))
				for k := range vals {
					ptrs[k] = &vals[k]
				}
				_ = rows.Scan(ptrs...)
				fmt.Fprintf(&b, "node %d %s:", i+1, strings.Fields(q)[len(strings.Fields(q))-5])
				for _, v := range vals {
					fmt.Fprintf(&b, " %s", v)
				}
				b.WriteString("; ")
			}
			rows.Close()
		}
		db.Close()
	}
	return b.String()
}

// Replicas starting at once on the three nodes of an empty database: each
// starts on its first try (the migrations run once, under a lock that is a
// row, since GET_LOCK is per node on Galera).
func TestGaleraReplicasStartTogether(t *testing.T) {
	testgalera.Require(t)
	bin := crashBuild(t)
	for round := range 3 {
		urls := testgalera.Database(t)
		errs := make([]error, len(urls))
		var wg sync.WaitGroup
		for i, u := range urls {
			s := newCrashServer(t, bin, u, "LOG_LEVEL=warn")
			wg.Add(1)
			go func() { defer wg.Done(); errs[i] = s.tryStart() }()
		}
		wg.Wait()
		for i, err := range errs {
			require.NoError(t, err, "round %d: replica %d (node %d) did not start on its first try", round, i, i+1)
		}
	}
}

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
)

// The "replicas with faults" harness. Three replicas, each a process of the
// real binary (crashBuild, crashServer), share one MariaDB database and one
// Redis: one with its clock a minute ahead, one a minute behind (and its
// database connection behind a proxy that black-holes it for three leases
// at a time, so that the others take it for dead and reap its waiters), one
// on time; the Redis between them is dropped now and then. Workers run the rule-5 race across them (a wait on one replica, a
// targeted notify of the same run on another, at once), some waits with a
// 2 s timeout, some as durable steps, and every acknowledged notify is
// audited at the end: its message is delivered exactly once, to the racing
// subscriber or, as a lookback event, to the audit's next subscription of
// the run; never both, never neither; and every subscription ends.
//
// A short run is part of the normal suite; RENDEZVOUS_SOAK=10m runs the
// load for that long (README "Testing").

type hfNotify struct {
	data     string // a JSON string, unique to this notify
	acked    bool
	msgID    string
	resolved bool // it resolved the racing waiter (NotifyResponse)
	waiterID string
	lookback bool // it was stored as a lookback event
	failure  string
}

type hfRace struct {
	id             int
	run, ev        string
	subOn, notOn   int
	short, durable bool
	subErr         string // the subscribe call itself failed
	out            outcome
	outErr         error // the subscription did not end, or misbehaved
	took           time.Duration
	notifies       []*hfNotify
}

// hfSoak is the load's duration: RENDEZVOUS_SOAK, or the short run's.
func hfSoak() time.Duration {
	if v := os.Getenv("RENDEZVOUS_SOAK"); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d > 0 {
			return d
		}
	}
	return 20 * time.Second
}

func TestReplicasWithFaults(t *testing.T) {
	db := testdb.MySQL(t)
	rURL := redisURL(t)
	ru, err := url.Parse(rURL)
	if err != nil {
		t.Fatal(err)
	}
	const lease = 2 * time.Second
	redisProxy := newDBProxy(t, ru.Host)
	dbCut := newDBProxy(t, mysqlTarget(t, db))
	// The replicas are processes of the real binary, built with the tag
	// that lets RENDEZVOUS_TEST_CLOCK_SKEW set a process's clock off.
	bin := crashBuild(t, "rendezvous_testclock")
	replica := func(skew time.Duration, dbURL string) *crashServer {
		return newCrashServer(t, bin, dbURL,
			"REDIS_URL="+redisProxy.url(t, rURL),
			// One channel for all: derived from the database's address, the
			// cut-off replica's (the proxy's) would differ from the others'.
			"RENDEZVOUS_BUS_CHANNEL="+uid("rendezvous-hf"),
			"RENDEZVOUS_LEASE_TTL="+lease.String(),
			"RENDEZVOUS_SWEEP_INTERVAL=100ms",
			"RENDEZVOUS_CATCHUP_INTERVAL=200ms",
			"RENDEZVOUS_TEST_CLOCK_SKEW="+skew.String(),
			"LOG_LEVEL=warn",
		)
	}
	srvs := []*crashServer{replica(clockSkew, db), replica(-clockSkew, dbCut.url(t, db)), replica(0, db)}
	const healthy = 2 // never cut off: the audit uses it
	// The healthy replica first, alone: one process applies the migrations.
	srvs[healthy].start()
	var starting sync.WaitGroup
	for _, s := range srvs[:healthy] {
		starting.Add(1)
		go func() { defer starting.Done(); s.start() }()
	}
	starting.Wait()
	eps := make([]string, len(srvs))
	for i, s := range srvs {
		eps[i] = s.endpoint()
	}
	// The skew took: each skewed process said at start that its clock is
	// off the database's (engine.SyncClock).
	for _, i := range []int{0, 1} {
		if !strings.Contains(srvs[i].logs.String(), "clock differs from the database's") {
			t.Fatalf("replica %d did not report its skewed clock; its log:\n%s", i, srvs[i].logs.String())
		}
	}

	const workers = 6
	conns := make([][]*gqlclient.Conn, workers)
	for w := range conns {
		for _, ep := range eps {
			conns[w] = append(conns[w], crashDial(t, ep))
		}
	}

	soak := hfSoak()
	began := time.Now()
	stop := began.Add(soak)
	var (
		mu        sync.Mutex
		races     []*hfRace
		faults    []string
		seq       atomic.Int64
		wg        sync.WaitGroup
		sentinels sync.WaitGroup
	)
	logFault := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		faults = append(faults, fmt.Sprintf("%6.1fs ", time.Since(began).Seconds())+fmt.Sprintf(format, args...))
	}

	// Faults: every 20 s, replica 1 is cut off from the database for three
	// leases, then Redis is dropped for 4 s.
	faultsDone := make(chan struct{})
	go func() {
		defer close(faultsDone)
		sleepUntil := func(at time.Time) bool {
			d := time.Until(at)
			if d > 0 {
				time.Sleep(d) // the fault schedule, not a wait for a condition
			}
			return time.Now().Before(stop)
		}
		for cycle := began; ; cycle = cycle.Add(20 * time.Second) {
			if !sleepUntil(cycle.Add(2 * time.Second)) {
				return
			}
			// A sentinel: a wait on replica 1 from before the cut, notified
			// (on replica 2) only after it, so that its waiter is reaped
			// under it every time.
			sentinel := hfSentinel(eps, 1, healthy, int(seq.Add(1)))
			dbCut.blackhole()
			logFault("replica 1 cut off from the database")
			sleepUntil(cycle.Add(2*time.Second + 3*lease))
			dbCut.restore()
			logFault("replica 1 reconnected")
			if sentinel != nil {
				sentinels.Add(1)
				go func() {
					defer sentinels.Done()
					sentinel.finish()
					mu.Lock()
					races = append(races, sentinel.race)
					mu.Unlock()
				}()
			}
			if !sleepUntil(cycle.Add(11 * time.Second)) {
				return
			}
			redisProxy.drop()
			logFault("Redis dropped")
			sleepUntil(cycle.Add(15 * time.Second))
			redisProxy.restore()
			logFault("Redis back")
		}
	}()

	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), uint64(began.UnixNano())))
			for time.Now().Before(stop) {
				r := hfRun(eps, healthy, conns[w], rng, int(seq.Add(1)))
				if r == nil {
					continue
				}
				mu.Lock()
				races = append(races, r)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	<-faultsDone
	sentinels.Wait()
	dbCut.restore()
	redisProxy.restore()
	loadTook := time.Since(began)

	// The audit.
	var (
		violations                                    []string
		acked, unacked, resolved, atRegistration      int
		byAudit, timeouts, lost, unavailable, unended int
		codes                                         = map[string]int{}
	)
	violate := func(r *hfRace, format string, args ...any) {
		violations = append(violations, fmt.Sprintf("race %d (run %s, wait on %d, notify on %d, short %v, durable %v): ", r.id, r.run, r.subOn, r.notOn, r.short, r.durable)+fmt.Sprintf(format, args...))
	}
	audit := eps[healthy]
	for _, r := range races {
		datas := map[string]*hfNotify{}
		var delivered []string // message ids, each must appear once
		for _, n := range r.notifies {
			datas[n.data] = n
			if n.acked {
				acked++
				if n.resolved == n.lookback {
					violate(r, "notify %s both or neither resolved a waiter and stored a lookback event", n.msgID)
				}
			} else {
				unacked++
			}
		}
		switch {
		case r.subErr != "":
			codes["subscribe: "+r.subErr]++
		case r.outErr != nil:
			unended++
			violate(r, "the subscription did not end properly: %v", r.outErr)
		case r.out.Result != nil && r.out.Result.Timeout:
			timeouts++
			if !r.short {
				violate(r, "a wait without a short timeout timed out")
			}
			if r.took < 2*time.Second-50*time.Millisecond {
				violate(r, "a 2 s timeout fired after %s", r.took)
			}
		case r.out.Result != nil:
			if r.out.Result.MessageID == nil {
				violate(r, "a result without messageId")
				break
			}
			n := datas[string(r.out.Result.EventData)]
			if n == nil {
				violate(r, "the subscriber got data %s that no notify of the run sent", r.out.Result.EventData)
				break
			}
			if n.acked && n.msgID != *r.out.Result.MessageID {
				violate(r, "the subscriber got message %s for notify %s", *r.out.Result.MessageID, n.msgID)
			}
			if n.acked && n.lookback {
				atRegistration++
			}
			if n.acked && n.resolved {
				resolved++
			}
			delivered = append(delivered, *r.out.Result.MessageID)
		default:
			code := r.out.code()
			codes[code]++
			switch code {
			case "WAITER_LOST":
				lost++
			case "SERVICE_UNAVAILABLE", "OUTCOME_UNKNOWN":
				unavailable++
			default:
				violate(r, "the subscription ended with %+v", r.out.Errors)
			}
		}
		// A durable step that a notify resolved keeps its result: ask for it
		// when the racing subscriber did not hear it.
		for _, n := range r.notifies {
			if n.acked && n.resolved && !slices.Contains(delivered, n.msgID) && r.durable {
				o := hfSubscribe(audit, r.ev, waitOpts{run: r.run, step: "s"})
				if o.Result != nil && o.Result.MessageID != nil {
					delivered = append(delivered, *o.Result.MessageID)
				}
			}
		}
		// What is left as lookback events goes to the next subscriptions.
		for range len(r.notifies) + 1 {
			var rv struct {
				WorkflowRun *runView `json:"workflowRun"`
			}
			resp, err := gqlclient.Post(ctxT(t), audit, runQuery, map[string]any{"id": r.run})
			if err != nil || len(resp.Errors) > 0 || resp.Decode(&rv) != nil || rv.WorkflowRun == nil {
				violate(r, "audit could not read the run: %v %+v", err, resp)
				break
			}
			if len(rv.WorkflowRun.LookbackEvents) == 0 {
				break
			}
			o := hfSubscribe(audit, r.ev, waitOpts{run: r.run, timeout: "5s"})
			if o.Result == nil || o.Result.Timeout || o.Result.MessageID == nil {
				violate(r, "a pending lookback event was not delivered to a new subscription: %+v", o)
				break
			}
			delivered = append(delivered, *o.Result.MessageID)
			if n := datas[string(o.Result.EventData)]; n != nil && n.acked {
				byAudit++
			}
		}
		for _, n := range r.notifies {
			if !n.acked {
				continue
			}
			switch c := countOf(delivered, n.msgID); {
			case c == 0:
				violate(r, "acknowledged notify %s (resolved %v, lookback %v) was never delivered", n.msgID, n.resolved, n.lookback)
			case c > 1:
				violate(r, "acknowledged notify %s was delivered %d times", n.msgID, c)
			}
		}
	}
	sort.Strings(faults)
	t.Logf("replicas with faults: load %s (RENDEZVOUS_SOAK=%s), %d races; notifies acknowledged %d, not %d; "+
		"racing subscriber got the event: %d resolved, %d as lookback at registration; lookback delivered to the audit's subscription: %d; "+
		"subscriptions ended by timeout %d, WAITER_LOST %d, unavailable %d, not ended %d; codes %v",
		loadTook.Round(time.Second), soak, len(races), acked, unacked, resolved, atRegistration, byAudit, timeouts, lost, unavailable, unended, codes)
	t.Logf("faults:\n%s", strings.Join(faults, "\n"))
	// Every process rode the faults out: none exited or panicked.
	for i, s := range srvs {
		s.mu.Lock()
		exited := s.done != nil && isClosed(s.done)
		s.mu.Unlock()
		logs := s.logs.String()
		if exited || strings.Contains(logs, "panic") || strings.Contains(logs, "fatal error") {
			t.Errorf("replica %d exited (%v) or panicked during the faults; see its log", i, exited)
		}
		t.Logf("replica %d logged %d errors and %d warnings", i, strings.Count(logs, `"level":"ERROR"`), strings.Count(logs, `"level":"WARN"`))
	}
	if len(races) < 20 {
		t.Errorf("only %d races ran", len(races))
	}
	for i, v := range violations {
		if i == 30 {
			t.Errorf("… and %d more", len(violations)-30)
			break
		}
		t.Error(v)
	}
}

func countOf(ids []string, id string) int {
	n := 0
	for _, x := range ids {
		if x == id {
			n++
		}
	}
	return n
}

// hfSubscribe subscribes on a fresh connection and reads the outcome.
func hfSubscribe(endpoint, ev string, o waitOpts) outcome {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := gqlclient.Dial(ctx, endpoint, gqlclient.TransportWS, nil)
	if err != nil {
		return outcome{Errors: []gqlclient.Error{{Message: err.Error()}}}
	}
	defer c.CloseNow()
	s, err := c.Subscribe(ctx, waitSubscription, waitVars(ev, o))
	if err != nil {
		return outcome{Errors: []gqlclient.Error{{Message: err.Error()}}}
	}
	out, err := raceReadOutcome(ctx, s)
	if err != nil {
		return outcome{Errors: []gqlclient.Error{{Message: err.Error()}}}
	}
	return out
}

// hfRun runs one race; nil when its run could not even be created.
func hfRun(eps []string, healthy int, conns []*gqlclient.Conn, rng *rand.Rand, id int) *hfRace {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	r := &hfRace{id: id, ev: uid("hf"), subOn: rng.IntN(len(eps)), notOn: rng.IntN(len(eps)),
		short: rng.IntN(4) == 0, durable: rng.IntN(5) == 0}
	tr, err := gqlclient.Post(ctx, eps[healthy], triggerMutation, map[string]any{"id": uid("hf-run")})
	if err != nil || len(tr.Errors) > 0 {
		return nil
	}
	var out struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
		} `json:"trigger"`
	}
	if tr.Decode(&out) != nil {
		return nil
	}
	r.run = out.Trigger.WorkflowRunID
	opts := waitOpts{run: r.run}
	if r.short {
		opts.timeout = "2s"
	}
	if r.durable {
		opts.step = "s"
	}
	notify := func(on int) *hfNotify {
		n := &hfNotify{data: fmt.Sprintf("%q", fmt.Sprintf("hf-%d-%d", id, rng.Int64()))}
		nctx, cancel := context.WithTimeout(ctx, 50*time.Second)
		defer cancel()
		var data any
		_ = json.Unmarshal([]byte(n.data), &data)
		c := notifyCallOf(gqlclient.Post(nctx, eps[on], notifyMutation, notifyVars(r.ev, data, r.run)))
		switch {
		case c.err != nil:
			n.failure = c.err.Error()
		case len(c.errors) > 0:
			n.failure = c.errors[0].Code()
		default:
			n.acked = true
			if len(c.view.NotifyResponse) > 0 {
				n.resolved, n.msgID, n.waiterID = true, c.view.NotifyResponse[0].MessageID, c.view.NotifyResponse[0].Waiter.ID
			}
			if c.view.Lookback != nil {
				n.lookback, n.msgID = true, c.view.Lookback.MessageID
			}
		}
		return n
	}

	// Some notifies come after a short wait's deadline: the wait times out
	// and the notify is kept as a lookback event.
	late := r.short && rng.IntN(3) == 0
	// And some waits without a short timeout wait longer than a cut-off
	// lasts, so that a cut-off replica's waiter may be reaped under them.
	slow := !r.short && (r.subOn == 1 && rng.IntN(2) == 0 || rng.IntN(8) == 0)
	began := time.Now()
	together(
		func() {
			sub, err := conns[r.subOn].Subscribe(ctx, waitSubscription, waitVars(r.ev, opts))
			if err != nil {
				r.subErr = err.Error()
				return
			}
			// Bounded: a registration on the replica that is cut off waits for
			// the database up to the transaction bound (30 s), a COMMIT's (10
			// s) and the read-back of a COMMIT that failed (15 s); a notify
			// that failed is sent again after its own bound (50 s).
			octx, cancel := context.WithTimeout(ctx, 150*time.Second)
			r.out, r.outErr = raceReadOutcome(octx, sub)
			cancel()
			r.took = time.Since(began)
		},
		func() {
			switch {
			case late:
				time.Sleep(2500 * time.Millisecond) // the scenario: a notify after the 2 s deadline
			case slow:
				time.Sleep(7 * time.Second) // the scenario: a notify after a cut-off (3 leases)
			}
			r.notifies = append(r.notifies, notify(r.notOn))
			// A client whose notify failed sends it again (to a replica that
			// answers), until one is acknowledged: the racing subscriber may
			// otherwise wait, rightly, for ever.
			for i := 0; i < 3 && !r.notifies[len(r.notifies)-1].acked; i++ {
				r.notifies = append(r.notifies, notify(healthy))
			}
		},
	)
	return r
}

// hfSentinelWait is a wait started before a cut-off, notified after it.
type hfSentinelWait struct {
	race   *hfRace
	sub    *gqlclient.Sub
	conn   *gqlclient.Conn
	notify string // the endpoint the notify goes to
}

// hfSentinel subscribes on replica on (a run's wait, no timeout) and waits
// until the waiter is registered; nil if it could not.
func hfSentinel(eps []string, on, healthy, id int) *hfSentinelWait {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tr, err := gqlclient.Post(ctx, eps[healthy], triggerMutation, map[string]any{"id": uid("hf-sentinel")})
	if err != nil || len(tr.Errors) > 0 {
		return nil
	}
	var out struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
		} `json:"trigger"`
	}
	if tr.Decode(&out) != nil {
		return nil
	}
	r := &hfRace{id: id, run: out.Trigger.WorkflowRunID, ev: uid("hf-sentinel"), subOn: on, notOn: healthy}
	c, err := gqlclient.Dial(ctx, eps[on], gqlclient.TransportWS, nil)
	if err != nil {
		return nil
	}
	sub, err := c.Subscribe(context.Background(), waitSubscription, waitVars(r.ev, waitOpts{run: r.run}))
	if err != nil {
		c.CloseNow()
		return nil
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		resp, err := gqlclient.Post(ctx, eps[healthy], waitersQuery, map[string]any{"ev": r.ev})
		var ws struct {
			Waiters []waiterView `json:"waiters"`
		}
		if err == nil && len(resp.Errors) == 0 && resp.Decode(&ws) == nil && len(ws.Waiters) == 1 {
			break
		}
		time.Sleep(20 * time.Millisecond) // polling interval of the condition
	}
	return &hfSentinelWait{race: r, sub: sub, conn: c, notify: eps[healthy]}
}

// finish notifies the sentinel's run and reads its subscription's end.
func (s *hfSentinelWait) finish() {
	defer s.conn.CloseNow()
	r := s.race
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	n := &hfNotify{data: fmt.Sprintf("%q", fmt.Sprintf("hf-sentinel-%d", r.id))}
	var data any
	_ = json.Unmarshal([]byte(n.data), &data)
	for range 4 {
		c := notifyCallOf(gqlclient.Post(ctx, s.notify, notifyMutation, notifyVars(r.ev, data, r.run)))
		if c.err == nil && len(c.errors) == 0 {
			n.acked = true
			if len(c.view.NotifyResponse) > 0 {
				n.resolved, n.msgID = true, c.view.NotifyResponse[0].MessageID
			}
			if c.view.Lookback != nil {
				n.lookback, n.msgID = true, c.view.Lookback.MessageID
			}
			break
		}
		time.Sleep(time.Second) // a client's pause before sending again
	}
	r.notifies = append(r.notifies, n)
	began := time.Now()
	r.out, r.outErr = raceReadOutcome(ctx, s.sub)
	r.took = time.Since(began)
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

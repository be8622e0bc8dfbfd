package e2e

// Stress: many clients at once on MariaDB, and one broadcast to ten thousand
// waiters.
//
// TestStressContentionAudit runs at least 64 concurrent clients for a fixed
// time, doing a mix of trigger, targeted and broadcast notify, waitForEvent
// (without a run, with a run, as a durable step, fresh and re-attached) and
// cancel on a handful of shared runs and event ids, so that row locks are
// waited for and deadlocks happen. Its goroutines only record what they saw;
// once every subscriber has ended the test goroutine audits the whole record
// against the rules: each delivery matches exactly one notification, each
// waiter a notify lists reached its subscriber, nothing twice, each stored
// lookback event consumed once or still pending or dropped by a cancel, and
// no notify failed with INTERNAL_SERVER_ERROR or SERVICE_UNAVAILABLE
// (conflicts are retried inside the service).
//
// TestStressFanOut10k sends one broadcast to 10,000 waiters multiplexed on
// ten websockets while targeted notifies on other runs keep flowing.

import (
	"bytes"
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// stressSecondsEnv sets how long TestStressContentionAudit runs its
// workload. The default, 20 s, keeps CI fast; 60 is the soak setting.
const stressSecondsEnv = "RENDEZVOUS_STRESS_SECONDS"

func stressDuration(t *testing.T) time.Duration {
	t.Helper()
	secs := 20
	if v := os.Getenv(stressSecondsEnv); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err, "%s=%q", stressSecondsEnv, v)
		require.Positive(t, n, "%s=%q", stressSecondsEnv, v)
		secs = n
	}
	return time.Duration(secs) * time.Second
}

// stressServerStatus reads MariaDB's server-wide lock counters (row lock
// waits, deadlocks): evidence that the workload really contends, though they
// also count other clients of the same server.
func stressServerStatus(t *testing.T, dbURL string) map[string]int64 {
	t.Helper()
	u, err := url.Parse(dbURL)
	require.NoError(t, err)
	cfg := mysql.NewConfig()
	cfg.Net, cfg.Addr = "tcp", u.Host
	if u.User != nil {
		cfg.User = u.User.Username()
		cfg.Passwd, _ = u.User.Password()
	}
	db, err := sql.Open("mysql", cfg.FormatDSN())
	require.NoError(t, err)
	defer db.Close()
	rows, err := db.QueryContext(ctxT(t), `SHOW GLOBAL STATUS WHERE Variable_name IN ('Innodb_row_lock_waits', 'Innodb_deadlocks')`)
	require.NoError(t, err)
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var name string
		var v int64
		require.NoError(t, rows.Scan(&name, &v))
		out[name] = v
	}
	require.NoError(t, rows.Err())
	return out
}

// ---- an HTTP client of the test's own

// stressHTTP posts GraphQL requests over a pool of kept-alive connections:
// http.DefaultClient keeps two idle connections per host, so 64 clients
// through it would open (and leave in TIME_WAIT) a connection for most
// requests.
type stressHTTP struct {
	endpoint string
	client   *http.Client
}

func newStressHTTP(t *testing.T, endpoint string) *stressHTTP {
	tr := &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256, IdleConnTimeout: 30 * time.Second}
	t.Cleanup(tr.CloseIdleConnections)
	return &stressHTTP{endpoint: endpoint, client: &http.Client{Transport: tr}}
}

func (h *stressHTTP) post(ctx context.Context, query string, vars map[string]any) (*gqlclient.Response, error) {
	body, err := json.Marshal(map[string]any{"query": query, "variables": vars})
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.endpoint, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r gqlclient.Response
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("status %d, body %.300q: %w", resp.StatusCode, b, err)
	}
	r.HTTPStatus, r.Header = resp.StatusCode, resp.Header
	return &r, nil
}

func (h *stressHTTP) notify(ctx context.Context, eventID string, data []byte, run string) raceNotifyCall {
	return notifyCallOf(h.post(ctx, notifyMutation, notifyVars(eventID, json.RawMessage(data), run)))
}

// trigger returns the run's full id and created, or what went wrong.
func (h *stressHTTP) trigger(ctx context.Context, id string) (string, bool, []gqlclient.Error, error) {
	r, err := h.post(ctx, triggerMutation, map[string]any{"id": id})
	if err != nil {
		return "", false, nil, err
	}
	if len(r.Errors) > 0 {
		return "", false, r.Errors, nil
	}
	var out struct {
		Trigger struct {
			WorkflowRunID string `json:"workflowRunId"`
			Created       bool   `json:"created"`
		} `json:"trigger"`
	}
	if err := r.Decode(&out); err != nil {
		return "", false, nil, err
	}
	return out.Trigger.WorkflowRunID, out.Trigger.Created, nil, nil
}

func (h *stressHTTP) cancel(ctx context.Context, run string) ([]gqlclient.Error, error) {
	r, err := h.post(ctx, raceCancelMutation, map[string]any{"id": run})
	if err != nil {
		return nil, err
	}
	return r.Errors, nil
}

// ---- what the clients of the contention test record

type stressNotify struct {
	client, n int
	eventID   string
	run       string // "" for a broadcast
	data      []byte
	call      raceNotifyCall
	latency   time.Duration
}

func (n *stressNotify) String() string {
	kind := "broadcast"
	if n.run != "" {
		kind = "targeted at " + n.run
	}
	return fmt.Sprintf("notify c%d#%d (%s, event %s): %s", n.client, n.n, kind, n.eventID, n.call)
}

// lists reports whether the notify's response lists the waiter.
func (n *stressNotify) lists(waiterID string) bool {
	for _, r := range n.call.view.NotifyResponse {
		if r.Waiter.ID == waiterID {
			return true
		}
	}
	return false
}

type stressSub struct {
	client, n int
	eventID   string
	run, step string
	reattach  bool
	timeout   any
	sub       *gqlclient.Sub
	subErr    error
	out       outcome
	outErr    error
}

func (s *stressSub) String() string {
	return fmt.Sprintf("subscriber c%d#%d (event %s, run %q, step %q, reattach %v, timeout %v): %s",
		s.client, s.n, s.eventID, s.run, s.step, s.reattach, s.timeout, raceDescribe(s.out))
}

type stressCancel struct {
	run  string
	errs []gqlclient.Error
	err  error
}

type stressTrigger struct {
	id          string // as sent
	got         string // the full id returned
	again       bool   // an id that exists: created must be false
	created     bool
	errs        []gqlclient.Error
	err         error
	replacement bool // a new run taking a slot
}

// stressRecord is one client's record; only that client writes it, except
// the outcome fields of its subscriptions, which their readers fill in.
type stressRecord struct {
	ops      map[string]int
	notifies []*stressNotify
	subs     []*stressSub
	cancels  []*stressCancel
	triggers []*stressTrigger
}

type stressStep struct{ name, eventID string }

// stressWorld is the shared state of the workload: the run slots the clients
// pick from, the event ids, the websocket connections.
type stressWorld struct {
	http    *stressHTTP
	conns   []*gqlclient.Conn
	room    []chan struct{} // per connection: subscriptions it may still take
	events  []string
	readCtx context.Context
	readers sync.WaitGroup

	mu      sync.Mutex
	slots   []string
	allRuns []string
	steps   map[string][]stressStep // durable steps used per run
}

func (w *stressWorld) pickRun(rng *rand.Rand) (int, string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	i := rng.IntN(len(w.slots))
	return i, w.slots[i]
}

// replace puts a new run in slot i, if it still holds old.
func (w *stressWorld) replace(i int, old, run string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.allRuns = append(w.allRuns, run)
	if w.slots[i] == old {
		w.slots[i] = run
	}
}

func (w *stressWorld) anyRun(rng *rand.Rand) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.allRuns[rng.IntN(len(w.allRuns))]
}

// step picks a durable step for the run: mostly a new one, sometimes one
// the run already has (re-attach, which keeps that step's event id).
func (w *stressWorld) step(rng *rand.Rand, run, eventID string, client, n int) (stressStep, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if used := w.steps[run]; len(used) > 0 && rng.IntN(100) < 30 {
		return used[rng.IntN(len(used))], true
	}
	s := stressStep{name: fmt.Sprintf("step-c%d-%d", client, n), eventID: eventID}
	w.steps[run] = append(w.steps[run], s)
	return s, false
}

// client runs operations until stopAt and records them in rec.
func (w *stressWorld) client(ctx context.Context, id int, stopAt time.Time, rec *stressRecord) {
	rng := rand.New(rand.NewPCG(uint64(id), uint64(time.Now().UnixNano())))
	for n := 0; time.Now().Before(stopAt) && ctx.Err() == nil; n++ {
		opCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		p := rng.IntN(1000)
		switch {
		case p < 7:
			w.opCancel(opCtx, rng, rec)
		case p < 30:
			w.opTrigger(opCtx, rng, n, rec)
		case p < 330:
			w.opNotify(opCtx, rng, id, n, true, rec)
		case p < 460:
			w.opNotify(opCtx, rng, id, n, false, rec)
		default:
			if !w.opWait(rng, id, n, rec) {
				w.opNotify(opCtx, rng, id, n, true, rec) // every connection is full
			}
		}
		cancel()
	}
}

func (w *stressWorld) opNotify(ctx context.Context, rng *rand.Rand, client, n int, targeted bool, rec *stressRecord) {
	r := &stressNotify{client: client, n: n, eventID: w.events[rng.IntN(len(w.events))]}
	if targeted {
		_, r.run = w.pickRun(rng)
		rec.ops["notify (targeted)"]++
	} else {
		rec.ops["notify (broadcast)"]++
	}
	r.data, _ = json.Marshal(map[string]any{"client": client, "n": n, "nonce": uid("d"), "text": "ünï ✓"})
	began := time.Now()
	r.call = w.http.notify(ctx, r.eventID, r.data, r.run)
	r.latency = time.Since(began)
	rec.notifies = append(rec.notifies, r)
}

func (w *stressWorld) opCancel(ctx context.Context, rng *rand.Rand, rec *stressRecord) {
	rec.ops["cancel"]++
	i, run := w.pickRun(rng)
	c := &stressCancel{run: run}
	c.errs, c.err = w.http.cancel(ctx, run)
	rec.cancels = append(rec.cancels, c)
	// The slot gets a fresh run, whoever canceled the old one.
	rec.ops["trigger"]++
	tr := &stressTrigger{id: uid("stress"), replacement: true}
	tr.got, tr.created, tr.errs, tr.err = w.http.trigger(ctx, tr.id)
	rec.triggers = append(rec.triggers, tr)
	if tr.err == nil && len(tr.errs) == 0 {
		w.replace(i, run, tr.got)
	}
}

func (w *stressWorld) opTrigger(ctx context.Context, rng *rand.Rand, n int, rec *stressRecord) {
	rec.ops["trigger"]++
	tr := &stressTrigger{}
	var slot int
	var old string
	if n%2 == 0 {
		tr.id, tr.again = w.anyRun(rng), true // the full id, as trigger returned it
	} else {
		// A new run takes a slot; the old run stays started, its waiters
		// waiting, until the final cancel.
		slot, old = w.pickRun(rng)
		tr.id, tr.replacement = uid("stress"), true
	}
	tr.got, tr.created, tr.errs, tr.err = w.http.trigger(ctx, tr.id)
	rec.triggers = append(rec.triggers, tr)
	if tr.replacement && tr.err == nil && len(tr.errs) == 0 {
		w.replace(slot, old, tr.got)
	}
}

// opWait subscribes on a connection with room and hands the subscription to
// a reader; false if every connection is full.
func (w *stressWorld) opWait(rng *rand.Rand, client, n int, rec *stressRecord) bool {
	c := -1
	for k, start := 0, rng.IntN(len(w.conns)); k < len(w.conns); k++ {
		i := (start + k) % len(w.conns)
		select {
		case w.room[i] <- struct{}{}:
			c = i
		default:
			continue
		}
		break
	}
	if c < 0 {
		return false
	}
	s := &stressSub{client: client, n: n, eventID: w.events[rng.IntN(len(w.events))]}
	switch k := rng.IntN(100); {
	case k < 30: // no run: only broadcasts reach it; a timeout ends it
		rec.ops["wait (no run)"]++
		s.timeout = fmt.Sprintf("%dms", 50+rng.IntN(1450))
	case k < 65: // the run's, without a step
		rec.ops["wait (run)"]++
		_, s.run = w.pickRun(rng)
		if rng.IntN(100) < 30 {
			s.timeout = fmt.Sprintf("%dms", 100+rng.IntN(1400))
		}
	default: // a durable step of the run
		_, s.run = w.pickRun(rng)
		st, again := w.step(rng, s.run, s.eventID, client, n)
		s.step, s.eventID, s.reattach = st.name, st.eventID, again
		if again {
			rec.ops["wait (step, re-attach)"]++
		} else {
			rec.ops["wait (step)"]++
		}
		if rng.IntN(100) < 20 {
			s.timeout = fmt.Sprintf("%dms", 100+rng.IntN(1400))
		}
	}
	rec.subs = append(rec.subs, s)
	s.sub, s.subErr = w.conns[c].Subscribe(w.readCtx, waitSubscription, waitVars(s.eventID, waitOpts{run: s.run, step: s.step, timeout: s.timeout}))
	if s.subErr != nil {
		<-w.room[c]
		return true
	}
	w.readers.Add(1)
	go func() {
		defer w.readers.Done()
		defer func() { <-w.room[c] }()
		s.out, s.outErr = raceReadOutcome(w.readCtx, s.sub)
	}()
	return true
}

// Many clients at once on shared runs and event ids, then an audit of
// everything they saw (see the top of this file).
func TestStressContentionAudit(t *testing.T) {
	const (
		clients  = 64
		nConns   = 4
		nSlots   = 8
		nEvents  = 4
		connRoom = 800 // subscriptions at once per connection (the cap is 1000)
	)
	e := newEnv(t, testdb.MySQL(t))
	dur := stressDuration(t)
	ctx := raceCtx(t, dur+3*time.Minute)
	readCtx, stopReaders := context.WithCancel(ctx)
	defer stopReaders()

	w := &stressWorld{
		http:    newStressHTTP(t, e.endpoint),
		conns:   e.raceDial(nConns),
		readCtx: readCtx,
		steps:   map[string][]stressStep{},
	}
	for range nConns {
		w.room = append(w.room, make(chan struct{}, connRoom))
	}
	for i := range nEvents {
		w.events = append(w.events, uid(fmt.Sprintf("stress-ev%d", i)))
	}
	w.slots = e.raceTrigger(ctx, nSlots)
	w.allRuns = slices.Clone(w.slots)

	// The workload.
	statusBefore := stressServerStatus(t, e.dbURL)
	recs := make([]*stressRecord, clients)
	began := time.Now()
	stopAt := began.Add(dur)
	var workers sync.WaitGroup
	for i := range recs {
		recs[i] = &stressRecord{ops: map[string]int{}}
		workers.Add(1)
		go func() {
			defer workers.Done()
			w.client(ctx, i, stopAt, recs[i])
		}()
	}
	workers.Wait()
	workDone := time.Since(began)
	statusAfter := stressServerStatus(t, e.dbURL)

	// What is pending before the final cancels drops it.
	w.mu.Lock()
	allRuns := slices.Clone(w.allRuns)
	w.mu.Unlock()
	// No notify runs any more, so a run cannot have both a pending lookback
	// event and a waiter WAITING on the same event id: a targeted notify
	// stores one only when the run has no such waiter, and a wait consumes
	// one before it waits (rule 5: never neither).
	pendingAtEnd := map[string]string{} // lookback messageId -> run
	var coexist []string
	for _, v := range e.raceRuns(allRuns) {
		for _, lb := range v.LookbackEvents {
			pendingAtEnd[lb.MessageID] = v.WorkflowRunID
			for _, wv := range v.Waiters {
				if wv.State == "WAITING" && wv.EventID == lb.EventID {
					coexist = append(coexist, fmt.Sprintf("run %s has lookback event %s (message %s) pending while its waiter %s is WAITING on the same event id %s",
						v.WorkflowRunID, lb.ID, lb.MessageID, wv.ID, lb.EventID))
				}
			}
		}
	}

	// Cancel every run still started: that ends the remaining waiters.
	finalCancels := make([]*stressCancel, len(allRuns))
	var cw sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i, run := range allRuns {
		cw.Add(1)
		go func() {
			defer cw.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			c := &stressCancel{run: run}
			c.errs, c.err = w.http.cancel(ctx, run)
			finalCancels[i] = c
		}()
	}
	cw.Wait()

	// Every subscriber ends: a result, a timeout or RUN_NOT_ACTIVE.
	endedInTime := waitReaders(&w.readers, 60*time.Second, stopReaders)
	finalViews := e.raceRuns(allRuns)
	var leftWaiting [][]waiterView
	for _, ev := range w.events {
		leftWaiting = append(leftWaiting, e.waiters(ev))
	}

	a := stressAudit{p: &raceProblems{t: t}, pendingAtEnd: pendingAtEnd}
	a.p.list = append(a.p.list, coexist...)
	if !endedInTime {
		a.p.addf("subscribers still open 60s after every run was canceled (their reads were stopped; see below)")
	}
	a.run(recs, finalCancels, finalViews, w.events, leftWaiting)

	// The service's own account of conflicts.
	logs := e.logs.String()
	retries := strings.Count(logs, "transaction conflict, retrying")
	deadlocks := strings.Count(logs, "Error 1213")
	lockWaits := strings.Count(logs, "Error 1205")
	// A subscriber's own timeout (an UPDATE outside any transaction) that
	// hits a conflict is retried by its wait loop, which logs a warning.
	waitRetries := strings.Count(logs, "will retry")
	if n := strings.Count(logs, "internal error"); n > 0 {
		a.p.addf("the service logged %d internal errors", n)
	}

	ops := map[string]int{}
	for _, r := range recs {
		for k, v := range r.ops {
			ops[k] += v
		}
	}
	kinds := make([]string, 0, len(ops))
	total := 0
	for k, v := range ops {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, v))
		total += v
	}
	slices.Sort(kinds)
	t.Logf("%d clients for %s (%s=%s): %d operations (%.0f/s): %s",
		clients, workDone.Round(time.Millisecond), stressSecondsEnv, os.Getenv(stressSecondsEnv), total,
		float64(total)/workDone.Seconds(), strings.Join(kinds, ", "))
	t.Logf("notifies: %d targeted ok (%d resolved waiters, %d stored lookback), %d refused RUN_NOT_ACTIVE (run canceled), %d broadcasts ok (%d resolved waiters, %d empty); max notify latency %s",
		a.targetedOK, a.targetedListed, a.targetedLookback, a.targetedRefused, a.broadcastOK, a.broadcastListed, a.broadcastEmpty, a.maxLatency.Round(time.Millisecond))
	t.Logf("subscribers: %d; deliveries audited %d (%d waiters listed by a notify, %d lookback consumptions; %d re-attach copies), %d timeouts, %d RUN_NOT_ACTIVE (refused on an ended run, or canceled while waiting: %d waiters CANCELED in the database)",
		a.subs, a.deliveries, a.listedDeliveries, a.lookbackDeliveries, a.duplicateViews, a.timeouts, a.runNotActive, a.finalCanceledWaiters)
	t.Logf("lookback events: %d stored, %d consumed, %d pending at the end (dropped by the final cancel), %d dropped by a cancel during the run",
		a.targetedLookback, a.lbConsumed, a.lbPending, a.lbDropped)
	t.Logf("runs: %d (%d canceled during the workload); database conflicts retried by the service: %d transactions (errors logged: deadlocks 1213: %d, lock-wait timeouts 1205: %d), %d waits; server-wide during the workload: %d row lock waits, %d deadlocks; waiters in the database at the end: %s",
		len(allRuns), len(a.canceledMid), retries, deadlocks, lockWaits, waitRetries,
		statusAfter["Innodb_row_lock_waits"]-statusBefore["Innodb_row_lock_waits"], statusAfter["Innodb_deadlocks"]-statusBefore["Innodb_deadlocks"], a.dbStates)
	a.p.report("audit findings", a.subs+len(a.notifies))
}

// stressAudit checks a contention run's record.
type stressAudit struct {
	p            *raceProblems
	pendingAtEnd map[string]string

	notifies    []*stressNotify
	canceledMid map[string]bool

	targetedOK, targetedListed, targetedLookback, targetedRefused int
	broadcastOK, broadcastListed, broadcastEmpty                  int
	maxLatency                                                    time.Duration
	subs, deliveries, listedDeliveries, lookbackDeliveries        int
	duplicateViews, timeouts, runNotActive, finalCanceledWaiters  int
	lbConsumed, lbPending, lbDropped                              int
	dbStates                                                      string
}

func (a *stressAudit) run(recs []*stressRecord, finalCancels []*stressCancel, views []*runView, events []string, leftWaiting [][]waiterView) {
	p := a.p
	var subs []*stressSub
	a.canceledMid = map[string]bool{}
	for _, r := range recs {
		a.notifies = append(a.notifies, r.notifies...)
		subs = append(subs, r.subs...)
		for _, c := range r.cancels {
			switch {
			case c.err != nil:
				p.addf("cancel %s: %v", c.run, c.err)
			case len(c.errs) == 0:
				a.canceledMid[c.run] = true
			case c.errs[0].Code() != "RUN_NOT_ACTIVE": // two clients canceled the same run
				p.addf("cancel %s failed: %+v", c.run, c.errs)
			}
		}
		for _, tr := range r.triggers {
			switch {
			case tr.err != nil || len(tr.errs) > 0:
				p.addf("trigger %s: %v %+v", tr.id, tr.err, tr.errs)
			case tr.again && (tr.created || tr.got != tr.id):
				p.addf("trigger of the existing run %s returned %s, created %v", tr.id, tr.got, tr.created)
			case !tr.again && !tr.created:
				p.addf("trigger of the new id %s returned created false", tr.id)
			}
		}
	}
	for _, c := range finalCancels {
		if c.err != nil || (len(c.errs) > 0 && (c.errs[0].Code() != "RUN_NOT_ACTIVE" || !a.canceledMid[c.run])) {
			p.addf("final cancel of %s: %v %+v", c.run, c.err, c.errs)
		}
	}

	// The notifies: each answer well formed; who each message went to.
	byMsg := map[string][]*stressNotify{}
	listedBy := map[string][]*stressNotify{}
	for _, n := range a.notifies {
		a.maxLatency = max(a.maxLatency, n.latency)
		c := n.call
		if c.err != nil {
			p.addf("transport — {%s}", n)
			continue
		}
		if len(c.errors) > 0 {
			switch code := c.code(); {
			case code == "INTERNAL_SERVER_ERROR" || code == "SERVICE_UNAVAILABLE":
				p.addf("%s (a conflict must be retried inside the service) — {%s}", code, n)
			case code == "RUN_NOT_ACTIVE" && n.run != "" && a.canceledMid[n.run]:
				a.targetedRefused++
			default:
				p.addf("unexpected error — {%s}", n)
			}
			continue
		}
		v := c.view
		if v.EventID != n.eventID || !raceSameJSON(v.EventData, n.data) {
			p.addf("the answer names another event or data — {%s}", n)
		}
		msgs := map[string]bool{}
		seen := map[string]bool{}
		for _, r := range v.NotifyResponse {
			msgs[r.MessageID] = true
			if seen[r.Waiter.ID] {
				p.addf("lists waiter %s twice — {%s}", r.Waiter.ID, n)
			}
			seen[r.Waiter.ID] = true
			if r.Waiter.State != "NOTIFIED" || r.Waiter.EventID != n.eventID || r.MessageID == "" || r.Deduplicated || r.Error != nil {
				p.addf("lists %s — {%s}", raceJSON(r), n)
			}
			if n.run != "" && (raceStr(r.Waiter.WorkflowRunID) != n.run || raceStr(r.WorkflowRunID) != n.run) {
				p.addf("a targeted notify lists a waiter of another run: %s — {%s}", raceJSON(r), n)
			}
			listedBy[r.Waiter.ID] = append(listedBy[r.Waiter.ID], n)
		}
		if len(msgs) > 1 {
			p.addf("one notify, several messageIds — {%s}", n)
		}
		if lb := v.Lookback; lb != nil {
			msgs[lb.MessageID] = true
			if n.run == "" {
				p.addf("a broadcast stored a lookback event — {%s}", n)
			}
			if lb.MessageID == "" || lb.EventID != n.eventID || !raceSameJSON(lb.EventData, n.data) {
				p.addf("the stored lookback event is not this notify's — {%s}", n)
			}
		}
		for m := range msgs {
			byMsg[m] = append(byMsg[m], n)
		}
		switch {
		case n.run == "":
			a.broadcastOK++
			a.broadcastListed += len(v.NotifyResponse)
			if len(v.NotifyResponse) == 0 {
				a.broadcastEmpty++
			}
		case len(v.NotifyResponse) > 0 && v.Lookback != nil:
			p.addf("resolved waiters and stored a lookback event — {%s}", n)
		case len(v.NotifyResponse) == 0 && v.Lookback == nil:
			p.addf("neither resolved a waiter nor stored a lookback event — {%s}", n)
		default:
			a.targetedOK++
			a.targetedListed += len(v.NotifyResponse)
			if v.Lookback != nil {
				a.targetedLookback++
			}
		}
	}
	for m, ns := range byMsg {
		if len(ns) > 1 {
			p.addf("messageId %s returned by %d notifies: %s / %s", m, len(ns), ns[0], ns[1])
		}
	}
	for wid, ns := range listedBy {
		if len(ns) > 1 {
			p.addf("waiter %s listed by %d notifies: %s / %s", wid, len(ns), ns[0], ns[1])
		}
	}

	// The subscribers: every delivery matches exactly one notification.
	delivered := map[string]string{}    // waiter -> "msg:<id>" or "timeout"
	consumers := map[string][]string{}  // lookback messageId -> waiters that consumed it
	lookbackWaiter := map[string]bool{} // waiters born from a lookback event
	byWaiter := map[string]*stressSub{} // the first subscriber with the waiter's result
	a.subs = len(subs)
	for _, s := range subs {
		switch {
		case s.subErr != nil:
			p.addf("subscribe: %v — {%s}", s.subErr, s)
			continue
		case s.outErr != nil:
			p.addf("%v — {%s}", s.outErr, s)
			continue
		case len(s.out.Errors) > 0:
			if s.out.Result != nil || s.out.code() != "RUN_NOT_ACTIVE" || s.run == "" {
				p.addf("unexpected outcome — {%s}", s)
			}
			a.runNotActive++
			continue
		case s.out.Result == nil || !s.out.Completed:
			p.addf("want one result then complete — {%s}", s)
			continue
		}
		res := s.out.Result
		if res.EventID != s.eventID || raceStr(res.WorkflowRunID) != raceStr(raceNilIfEmpty(s.run)) || raceStr(res.StepName) != raceStr(raceNilIfEmpty(s.step)) || res.WaiterID == "" {
			p.addf("the result names another event, run, step or no waiter — {%s}", s)
			continue
		}
		wid := res.WaiterID
		key := "timeout"
		if !res.Timeout {
			key = "msg:" + raceStr(res.MessageID)
		}
		if prev, ok := delivered[wid]; ok {
			a.duplicateViews++ // several subscribers of one durable step
			if s.step == "" || prev != key {
				p.addf("waiter %s delivered again: first %s (%s), now %s — {%s}", wid, prev, byWaiter[wid], key, s)
			}
			continue
		}
		delivered[wid], byWaiter[wid] = key, s
		if res.Timeout {
			a.timeouts++
			if res.MessageID != nil || !raceIsNull(res.EventData) || res.NotifiedAt != nil {
				p.addf("a timeout carries a notification — {%s}", s)
			}
			if ns := listedBy[wid]; len(ns) > 0 {
				p.addf("timed out, yet %s lists its waiter — {%s}", ns[0], s)
			}
			continue
		}
		a.deliveries++
		if res.MessageID == nil || res.NotifiedAt == nil {
			p.addf("a delivery without messageId or notifiedAt — {%s}", s)
			continue
		}
		m := *res.MessageID
		ns := byMsg[m]
		if len(ns) == 0 {
			p.addf("delivered messageId %s, which no acknowledged notify returned — {%s}", m, s)
			continue
		}
		n := ns[0]
		if !raceSameJSON(res.EventData, n.data) {
			p.addf("eventData is not that of %s — {%s}", n, s)
		}
		switch {
		case n.lists(wid):
			a.listedDeliveries++
		case n.call.view.Lookback != nil && n.run == s.run && n.eventID == s.eventID:
			a.lookbackDeliveries++
			consumers[m] = append(consumers[m], wid)
			lookbackWaiter[wid] = true
			if ls := listedBy[wid]; len(ls) > 0 {
				p.addf("consumed the lookback of %s, yet %s lists its waiter — {%s}", n, ls[0], s)
			}
		default:
			p.addf("delivered %s, which neither lists waiter %s nor stored a lookback event for its run and event — {%s}", n, wid, s)
		}
	}

	// Every waiter a notify listed reached its subscriber, with that message.
	for wid, ns := range listedBy {
		want := "msg:" + ns[0].call.view.NotifyResponse[0].MessageID
		if got, ok := delivered[wid]; !ok || got != want {
			p.addf("waiter %s listed by %s: its subscriber got %q", wid, ns[0], got)
		}
	}

	// Every stored lookback event: consumed once, pending, or dropped by a cancel.
	for _, n := range a.notifies {
		lb := n.call.view.Lookback
		if !n.call.ok() || lb == nil {
			continue
		}
		switch cs := consumers[lb.MessageID]; {
		case len(cs) > 1:
			p.addf("lookback consumed by %d waiters %v — {%s}", len(cs), cs, n)
		case len(cs) == 1:
			a.lbConsumed++
		case a.pendingAtEnd[lb.MessageID] != "":
			a.lbPending++
		case a.canceledMid[n.run]:
			a.lbDropped++
		default:
			p.addf("lookback event lost: not consumed, not pending, and its run was not canceled — {%s}", n)
		}
	}
	a.checkLookbackOrder(consumers)
	for m, run := range a.pendingAtEnd {
		if len(byMsg[m]) == 0 {
			p.addf("run %s had a pending lookback event %s no notify stored", run, m)
		}
	}

	// The database agrees: nothing left waiting, every NOTIFIED waiter's
	// notification reached a subscriber, nothing canceled was delivered.
	states := map[string]int{}
	for _, v := range views {
		if v.State != "RUN_CANCELED" {
			p.addf("run %s is %s after the final cancel", v.WorkflowRunID, v.State)
		}
		if len(v.LookbackEvents) > 0 {
			p.addf("run %s keeps lookback events after its cancel: %s", v.WorkflowRunID, raceJSON(v.LookbackEvents))
		}
		for _, wv := range v.Waiters {
			states[wv.State]++
			got, ok := delivered[wv.ID]
			switch wv.State {
			case "NOTIFIED":
				if !ok || !strings.HasPrefix(got, "msg:") {
					p.addf("waiter %s of run %s is NOTIFIED, but no subscriber got a notification for it (got %q)", wv.ID, v.WorkflowRunID, got)
				}
			case "TIMED_OUT":
				if got != "timeout" {
					p.addf("waiter %s of run %s is TIMED_OUT, its subscriber got %q", wv.ID, v.WorkflowRunID, got)
				}
			case "CANCELED":
				a.finalCanceledWaiters++
				if ok {
					p.addf("waiter %s of run %s is CANCELED, yet a subscriber got %q", wv.ID, v.WorkflowRunID, got)
				}
				if ns := listedBy[wv.ID]; len(ns) > 0 {
					p.addf("waiter %s of run %s is CANCELED, yet %s lists it", wv.ID, v.WorkflowRunID, ns[0])
				}
			default:
				p.addf("waiter %s of run %s is %s after every run was canceled", wv.ID, v.WorkflowRunID, wv.State)
			}
		}
	}
	a.dbStates = raceJSON(states)
	for i, ws := range leftWaiting {
		if len(ws) > 0 {
			p.addf("event %s: %d waiters still WAITING at the end: %s", events[i], len(ws), raceJSON(ws[:min(len(ws), 3)]))
		}
	}
}

// checkLookbackOrder: a wait consumes the oldest unconsumed lookback event of
// (run, event id). Ids are ordered by their auto-increment suffix (DESIGN:
// "order by auto-increment ids"; both a lookback event and the waiter that
// consumes it are inserted holding the run's lock), so per (run, event id)
// the events consumed, taken in the order of their waiters, must come in
// the order they were stored, and before every event never consumed.
func (a *stressAudit) checkLookbackOrder(consumers map[string][]string) {
	type lb struct {
		seq, waiterSeq int64
		consumed       bool
		n              *stressNotify
	}
	groups := map[[2]string][]lb{}
	for _, n := range a.notifies {
		v := n.call.view.Lookback
		if !n.call.ok() || v == nil {
			continue
		}
		seq, ok := stressSeq(v.ID)
		if !ok {
			return // ids without an order: nothing to check
		}
		x := lb{seq: seq, n: n}
		if cs := consumers[v.MessageID]; len(cs) == 1 {
			x.consumed = true
			if x.waiterSeq, ok = stressSeq(cs[0]); !ok {
				return
			}
		}
		k := [2]string{n.run, n.eventID}
		groups[k] = append(groups[k], x)
	}
	for k, g := range groups {
		var consumed []lb
		minUnconsumed := int64(-1)
		for _, x := range g {
			if x.consumed {
				consumed = append(consumed, x)
			} else if minUnconsumed < 0 || x.seq < minUnconsumed {
				minUnconsumed = x.seq
			}
		}
		slices.SortFunc(consumed, func(x, y lb) int { return cmp.Compare(x.waiterSeq, y.waiterSeq) })
		for i, x := range consumed {
			if i > 0 && x.seq < consumed[i-1].seq {
				a.p.addf("run %s, event %s: lookback %d consumed after the younger %d (%s)", k[0], k[1], x.seq, consumed[i-1].seq, x.n)
			}
			if minUnconsumed >= 0 && x.seq > minUnconsumed {
				a.p.addf("run %s, event %s: lookback %d consumed while the older %d never was (%s)", k[0], k[1], x.seq, minUnconsumed, x.n)
			}
		}
	}
}

// stressSeq reads the number at the end of an id such as wtr_12 or lbe_7.
func stressSeq(id string) (int64, bool) {
	i := strings.LastIndexByte(id, '_')
	n, err := strconv.ParseInt(id[i+1:], 10, 64)
	return n, err == nil
}

// ---- fan-out

type fanSub struct {
	sub    *gqlclient.Sub
	subErr error
	out    outcome
	outErr error
	at     time.Time
}

type sideCall struct {
	began, ended time.Time
	call         raceNotifyCall
}

// One broadcast to 10,000 waiters on one event id resolves each exactly once,
// and targeted notifies on other runs and event ids keep completing while it
// runs.
func TestStressFanOut10k(t *testing.T) {
	const (
		nConns  = 10
		perConn = 1000
		total   = nConns * perConn
		sides   = 4 // goroutines sending targeted notifies meanwhile
	)
	e := newEnv(t, testdb.MySQL(t), func(c *service.Config) { c.HTTP.MaxSubscriptionsPerConnection = 2000 })
	ctx := raceCtx(t, 4*time.Minute)
	h := newStressHTTP(t, e.endpoint)
	conns := e.raceDial(nConns)
	sideRuns := e.raceTrigger(ctx, 8)
	eventID := uid("fanout")

	// Register: 1,000 subscriptions on each of 10 connections.
	began := time.Now()
	subs := make([]*fanSub, total)
	var wg sync.WaitGroup
	for c := range nConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perConn {
				s := &fanSub{}
				subs[c*perConn+i] = s
				s.sub, s.subErr = conns[c].Subscribe(ctx, waitSubscription, waitVars(eventID, waitOpts{}))
			}
		}()
	}
	wg.Wait()
	for i, s := range subs {
		require.NoError(t, s.subErr, "subscribe %d", i)
	}
	readCtx, stopReaders := context.WithCancel(ctx)
	defer stopReaders()
	var readers sync.WaitGroup
	var received atomic.Int64
	for _, s := range subs {
		readers.Add(1)
		go func() {
			defer readers.Done()
			s.out, s.outErr = raceReadOutcome(readCtx, s.sub)
			s.at = time.Now()
			received.Add(1)
		}()
	}
	// Poll the waiters list (ids only: it returns all 10,000) until it has
	// every registration.
	listed := map[string]bool{}
	poll := time.NewTicker(250 * time.Millisecond)
	for deadline := time.Now().Add(120 * time.Second); ; {
		r, err := h.post(ctx, `query($ev: String!) { waiters(eventId: $ev) { id } }`, map[string]any{"ev": eventID})
		require.NoError(t, err)
		require.Empty(t, r.Errors)
		var out struct {
			Waiters []struct {
				ID string `json:"id"`
			} `json:"waiters"`
		}
		require.NoError(t, r.Decode(&out))
		clear(listed)
		for _, w := range out.Waiters {
			require.False(t, listed[w.ID], "waiters lists %s twice", w.ID)
			listed[w.ID] = true
		}
		require.Zero(t, received.Load(), "a subscriber ended before any notify")
		if len(out.Waiters) >= total {
			require.Equal(t, total, len(out.Waiters), "waiters lists more than were registered")
			break
		}
		require.True(t, time.Now().Before(deadline), "after 120s waiters lists %d of %d", len(out.Waiters), total)
		<-poll.C // the polling interval, not a wait for an event
	}
	poll.Stop()
	registered := time.Since(began)

	// Targeted notifies on other runs and event ids, from other goroutines,
	// from before the broadcast until the last subscriber has its result.
	const warmUp = 40 // side notifies before the broadcast: the baseline latency
	stopSide := make(chan struct{})
	warm := make(chan struct{})
	var sideDone atomic.Int64
	sideLog := make([][]sideCall, sides)
	var sideWG sync.WaitGroup
	for g := range sides {
		sideWG.Add(1)
		go func() {
			defer sideWG.Done()
			for k := 0; ctx.Err() == nil; k++ {
				select {
				case <-stopSide:
					return
				default:
				}
				data, _ := json.Marshal(map[string]any{"side": g, "k": k})
				c := sideCall{began: time.Now()}
				c.call = h.notify(ctx, fmt.Sprintf("side-%d-%d", g, k%5), data, sideRuns[(g*2+k)%len(sideRuns)])
				c.ended = time.Now()
				sideLog[g] = append(sideLog[g], c)
				if sideDone.Add(1) == warmUp {
					close(warm)
				}
			}
		}()
	}
	select {
	case <-warm:
	case <-ctx.Done():
		close(stopSide)
		sideWG.Wait()
		t.Fatal("side notifies did not get going")
	}

	// The broadcast.
	want, _ := json.Marshal(map[string]any{"fanout": total, "nonce": uid("data")})
	bBegan := time.Now()
	b := h.notify(ctx, eventID, want, "")
	bEnded := time.Now()

	endedInTime := waitReaders(&readers, 90*time.Second, stopReaders)
	close(stopSide)
	sideWG.Wait()

	// The broadcast's answer: 10,000 waiters, each once, one message.
	require.True(t, b.ok(), "broadcast: %.2000s", b)
	require.Nil(t, b.view.Lookback, "a broadcast stores nothing")
	p := &raceProblems{t: t}
	msg := ""
	inResponse := map[string]bool{}
	for _, r := range b.view.NotifyResponse {
		if msg == "" {
			msg = r.MessageID
		}
		if r.MessageID != msg || msg == "" {
			p.addf("response lists messageIds %q and %q", msg, r.MessageID)
		}
		if inResponse[r.Waiter.ID] {
			p.addf("response lists waiter %s twice", r.Waiter.ID)
		}
		inResponse[r.Waiter.ID] = true
		if r.Waiter.State != "NOTIFIED" || r.Waiter.EventID != eventID {
			p.addf("response lists %s", raceJSON(r))
		}
	}
	if len(b.view.NotifyResponse) != total || len(inResponse) != total {
		p.addf("response lists %d entries, %d distinct waiters; want %d", len(b.view.NotifyResponse), len(inResponse), total)
	}
	for id := range listed {
		if !inResponse[id] {
			p.addf("waiter %s was listed WAITING before the broadcast, which does not list it", id)
		}
	}

	// Every subscriber: exactly one result, the broadcast's, for a waiter of its own.
	var first, last time.Time
	got := map[string]int{}
	for i, s := range subs {
		switch {
		case s.outErr != nil:
			p.addf("subscriber %d: %v", i, s.outErr)
			continue
		case s.out.Result == nil || len(s.out.Errors) > 0 || !s.out.Completed:
			p.addf("subscriber %d: want one result then complete, got %s", i, raceDescribe(s.out))
			continue
		}
		res := s.out.Result
		got[res.WaiterID]++
		if res.Timeout || raceStr(res.MessageID) != msg || !raceSameJSON(res.EventData, want) || !inResponse[res.WaiterID] {
			p.addf("subscriber %d: got %s, want messageId %s for a waiter the response lists", i, raceDescribe(s.out), msg)
		}
		if s.at.After(last) {
			last = s.at
		}
		if first.IsZero() || s.at.Before(first) {
			first = s.at
		}
	}
	for wid, n := range got {
		if n > 1 {
			p.addf("%d subscribers got waiter %s", n, wid)
		}
	}
	if !endedInTime {
		p.addf("subscribers without a result 90s after the broadcast was sent (reads stopped)")
	}

	// The other notifies kept completing during the fan-out.
	var during, duringBroadcastCall, sideErrs, sideTotal, overSecond int
	var maxAt time.Time
	var base, fan []time.Duration
	for _, calls := range sideLog {
		for _, c := range calls {
			sideTotal++
			if !c.call.ok() || (c.call.view.Lookback == nil && len(c.call.view.NotifyResponse) == 0) {
				sideErrs++
				if sideErrs <= 5 {
					p.addf("side notify: %s", c.call)
				}
			}
			d := c.ended.Sub(c.began)
			switch {
			case c.ended.Before(bBegan):
				base = append(base, d)
			case c.began.Before(last):
				during++
				if len(fan) == 0 || d > slices.Max(fan) {
					maxAt = c.began
				}
				fan = append(fan, d)
				if d > time.Second {
					overSecond++
				}
			}
			if c.began.After(bBegan) && c.ended.Before(bEnded) {
				duringBroadcastCall++
			}
		}
	}
	pct := func(ds []time.Duration, q float64) time.Duration {
		if len(ds) == 0 {
			return 0
		}
		ds = slices.Clone(ds)
		slices.Sort(ds)
		return ds[min(len(ds)-1, int(q*float64(len(ds))))].Round(time.Millisecond)
	}
	if duringBroadcastCall == 0 {
		p.addf("no targeted notify on another event id both began and completed while the broadcast call ran (%s)", bEnded.Sub(bBegan).Round(time.Millisecond))
	}
	if left := e.waiters(eventID); len(left) != 0 {
		p.addf("%d waiters still WAITING after the broadcast", len(left))
	}

	t.Logf("%d waiters on %d websockets registered and listed in %s; broadcast answered in %s listing %d waiters; subscribers had their results from %s to %s after the broadcast was sent",
		total, nConns, registered.Round(time.Millisecond), bEnded.Sub(bBegan).Round(time.Millisecond), len(b.view.NotifyResponse),
		first.Sub(bBegan).Round(time.Millisecond), last.Sub(bBegan).Round(time.Millisecond))
	t.Logf("targeted notifies on other runs: %d in all, %d failed; before the broadcast %d, latency p50 %s, max %s; "+
		"overlapping the fan-out (broadcast sent .. last subscriber served) %d, latency p50 %s, p90 %s, max %s (sent %s after the broadcast), %d over 1s; %d began and completed while the broadcast call ran",
		sideTotal, sideErrs, len(base), pct(base, 0.5), pct(base, 1), during, pct(fan, 0.5), pct(fan, 0.9), pct(fan, 1),
		maxAt.Sub(bBegan).Round(time.Millisecond), overSecond, duringBroadcastCall)
	p.report("fan-out checks", total)
}

// waitReaders waits up to d for the readers to end; past it, it stops them
// and waits for that. False when they had to be stopped.
func waitReaders(readers *sync.WaitGroup, d time.Duration, stop func()) bool {
	ended := make(chan struct{})
	go func() {
		readers.Wait()
		close(ended)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ended:
		return true
	case <-t.C:
		stop()
		<-ended
		return false
	}
}

package main

import (
	"context"
	"fmt"
	"log"
	"time"
)

// phaseInsertBaseline measures bare single-row INSERT+COMMITs with
// database/sql: throughput on as many connections as the throughput phase
// has clients, and latency on one.
func (s *suite) phaseInsertBaseline(ctx context.Context) error {
	b, err := newInsertBaseline(ctx, s.baseDB, s.kind)
	if err != nil {
		return err
	}
	for i := range warmups {
		if err := b.insert(ctx, int64(i)); err != nil {
			return err
		}
	}
	m, db0, q0 := s.mark(ctx), pidCPU(s.dbPID), s.questions(ctx)
	n, took, err := b.throughput(ctx, s.sz.ThroughputClients, s.sz.ThroughputFor)
	if err != nil {
		return err
	}
	s.res.insertDBCPU = pidCPU(s.dbPID) - db0
	s.res.insertStmts = float64(s.questions(ctx)-q0-1) / float64(max(n, 1))
	s.since(ctx, "bare INSERT throughput", m)
	s.res.insertN, s.res.insertRate = n, float64(n)/took.Seconds()
	m = s.mark(ctx)
	s.res.insertLat, err = b.latency(ctx, s.sz.LatencyN)
	s.since(ctx, "bare INSERT latency", m)
	s.detail("[%s]   bare INSERT+COMMIT: %.0f/s on %d connections; one connection p50 %s p99 %s",
		s.label, s.res.insertRate, s.sz.ThroughputClients, fmtDur(s.res.insertLat.P50), fmtDur(s.res.insertLat.P99))
	return err
}

func (s *suite) latencyLoad(endpoint string, count int) command {
	return command{Op: "load", Endpoint: endpoint, Prefix: latPrefix, Clients: 1, Runs: latRuns, EventID: latEvent, Count: count}
}

func (s *suite) throughputLoad(endpoint string, d time.Duration, count int) command {
	return command{Op: "load", Endpoint: endpoint, Prefix: tpPrefix, Clients: s.sz.ThroughputClients, Runs: tpRuns, EventID: tpEvent, Duration: d, Count: count}
}

// phaseLatency times targeted notifies (each stored as a lookback event)
// from one client on tables that hold nothing else.
func (s *suite) phaseLatency(ctx context.Context) error {
	if _, err := s.client.do(ctx, s.latencyLoad(s.endpoint, warmups)); err != nil {
		return err
	}
	var err error
	m := s.mark(ctx)
	s.res.latEmpty, err = s.client.do(ctx, s.latencyLoad(s.endpoint, s.sz.LatencyN))
	s.since(ctx, "notify latency", m)
	s.detail("[%s]   notify, one client: p50 %s p99 %s, %d errors", s.label, fmtDur(s.res.latEmpty.Lat.P50), fmtDur(s.res.latEmpty.Lat.P99), s.res.latEmpty.Errors)
	if err != nil {
		return err
	}
	// The HTTP part alone: the same requests from the same client, answered in memory.
	if _, err := s.client.do(ctx, s.latencyLoad(s.mem.endpoint, warmups)); err != nil {
		return err
	}
	s.res.latMem, err = s.client.do(ctx, s.latencyLoad(s.mem.endpoint, s.sz.LatencyN))
	return err
}

// phaseThroughput runs closed-loop clients sending targeted notifies to
// runs without waiters, and takes this process's CPU time around it; then
// the same clients against the in-memory server, for the CPU baseline.
func (s *suite) phaseThroughput(ctx context.Context) error {
	if _, err := s.client.do(ctx, s.throughputLoad(s.endpoint, 0, 10)); err != nil {
		return err
	}
	cpu0, db0, q0 := selfCPU(), pidCPU(s.dbPID), s.questions(ctx)
	m := s.mark(ctx)
	r, err := s.client.do(ctx, s.throughputLoad(s.endpoint, s.sz.ThroughputFor, 0))
	s.res.tpCPU, s.res.tpDBCPU = selfCPU()-cpu0, pidCPU(s.dbPID)-db0
	s.res.tpStmts = float64(s.questions(ctx)-q0-1) / float64(max(r.OK+r.Errors, 1))
	s.since(ctx, "notify throughput", m)
	if err != nil {
		return err
	}
	s.res.tp = r
	s.detail("[%s]   %d notifies in %s (%.0f/s), %d errors", s.label, r.OK, r.Elapsed.Round(time.Millisecond), float64(r.OK)/r.Elapsed.Seconds(), r.Errors)

	if _, err := s.client.do(ctx, s.throughputLoad(s.mem.endpoint, 0, 10)); err != nil {
		return err
	}
	cpu0 = selfCPU()
	r, err = s.client.do(ctx, s.throughputLoad(s.mem.endpoint, max(s.sz.ThroughputFor/3, 2*time.Second), 0))
	s.res.memTPCPU = selfCPU() - cpu0
	s.res.memTP = r
	return err
}

// phaseGrowth seeds the history, then times the same notifies as
// phaseLatency again.
func (s *suite) phaseGrowth(ctx context.Context) error {
	plan := &seedPlan{
		waiters:  s.sz.SeedWaiters,
		lookback: s.sz.SeedLookback,
		runs:     max(s.sz.SeedWaiters/10, 1),
		hotEvent: latEvent,
		now:      time.Now(),
	}
	for k := range latRuns {
		plan.hotRuns = append(plan.hotRuns, "wfr_"+runID(latPrefix, 0, k))
	}
	t := time.Now()
	if err := seedHistory(ctx, s.db, s.kind, plan); err != nil {
		return err
	}
	s.res.seedTook = time.Since(t)
	log.Printf("[%s]   seeded %d runs, %d ended waiters, %d lookback events in %s", s.label, plan.runs, plan.waiters, plan.lookback, s.res.seedTook.Round(time.Millisecond))
	time.Sleep(3 * time.Second) // let the database's own after-load work calm down
	if _, err := s.client.do(ctx, s.latencyLoad(s.endpoint, warmups)); err != nil {
		return err
	}
	var err error
	m := s.mark(ctx)
	s.res.latFull, err = s.client.do(ctx, s.latencyLoad(s.endpoint, s.sz.LatencyN))
	s.since(ctx, "notify latency, full tables", m)
	s.detail("[%s]   notify, one client, full tables: p50 %s p99 %s", s.label, fmtDur(s.res.latFull.Lat.P50), fmtDur(s.res.latFull.Lat.P99))
	return err
}

// subscribeIdle opens n subscriptions from the client process on the
// service, per to a websocket, and waits until the server has registered
// them all; it returns the server's memory before and after.
func (s *suite) subscribeIdle(ctx context.Context, set, prefix string, n, per int) (memDelta, error) {
	settle()
	d := memDelta{n: n, before: snapMem()}
	if s.opts.MemProfile != "" && s.kind == "mysql" {
		writeProfiles(s.opts.MemProfile + "-" + set + "-before")
	}
	r, err := s.client.do(ctx, command{Op: "subscribe", Set: set, Endpoint: s.endpoint, N: n, PerConn: per, Prefix: prefix})
	if err != nil {
		return d, err
	}
	log.Printf("[%s]   %d subscriptions sent on %d websockets in %s", s.label, n, (n+per-1)/per, r.Elapsed.Round(time.Millisecond))
	t := time.Now()
	if err := s.waitWaiting(ctx, prefix+"%", n, set, time.Minute); err != nil {
		return d, err
	}
	log.Printf("[%s]   all registered %s later", s.label, time.Since(t).Round(time.Millisecond))
	settle()
	d.after = snapMem()
	s.detail("[%s]   RSS %s → %s: %.1f KB per subscription", s.label, fmtBytes(d.before.rss), fmtBytes(d.after.rss), perSub(d.before.rss, d.after.rss, n)/1000)
	if s.opts.MemProfile != "" && s.kind == "mysql" {
		writeProfiles(s.opts.MemProfile + "-" + set)
	}
	return d, nil
}

// closeSubs closes a set of the client's subscriptions and waits until the
// server has removed their waiters (rule 7: a waiter without a step lives
// as long as its subscription). Waiters left behind are noted against the
// phase, which goes on.
func (s *suite) closeSubs(ctx context.Context, phase, set, like string) error {
	t := time.Now()
	if _, err := s.client.do(ctx, command{Op: "close", Set: set}); err != nil {
		return err
	}
	if like == "" {
		return nil
	}
	err := s.waitWaiting(ctx, like, 0, "", 20*time.Second)
	if err != nil && ctx.Err() == nil {
		var left int
		s.db.QueryRowContext(ctx, "SELECT COUNT(*) FROM waiters WHERE state = 'WAITING' AND event_id LIKE ?", like).Scan(&left)
		note := fmt.Sprintf("after the client closed its websockets, %s of these waiters stayed WAITING in the database (still there %s later)", fmtInt(left), time.Since(t).Round(time.Second))
		log.Printf("[%s]   %s", s.label, note)
		s.notes[phase] = append(s.notes[phase], note)
		return nil
	}
	log.Printf("[%s]   closed %s: its waiters were removed within %s", s.label, set, time.Since(t).Round(time.Millisecond))
	return err
}

// phaseIdle: memory per idle subscription with one websocket each, then
// the delivery latency while those subscriptions and DeliveryMux
// multiplexed ones stay connected and idle, with the GC figures of the
// server process over the delivery window.
func (s *suite) phaseIdle(ctx context.Context) error {
	defer s.client.do(context.WithoutCancel(ctx), command{Op: "close", Set: "idle"})
	var err error
	if s.res.idle, err = s.subscribeIdle(ctx, "idle", "idle-", s.sz.Idle, 1); err != nil {
		return err
	}
	defer s.client.do(context.WithoutCancel(ctx), command{Op: "close", Set: "idlemux"})
	if _, err := s.client.do(ctx, command{Op: "subscribe", Set: "idlemux", Endpoint: s.endpoint, N: s.sz.DeliveryMux, PerConn: s.sz.MuxPerConn, Prefix: "idlemux-"}); err != nil {
		return err
	}
	if err := s.waitWaiting(ctx, "idlemux-%", s.sz.DeliveryMux, "idlemux", time.Minute); err != nil {
		return err
	}
	n := s.deliveries()
	defer s.client.do(context.WithoutCancel(ctx), command{Op: "close", Set: "dlv"})
	if _, err := s.client.do(ctx, command{Op: "subscribe", Set: "dlv", Endpoint: s.endpoint, N: n, PerConn: 100, Prefix: "dlv-"}); err != nil {
		return err
	}
	if err := s.waitWaiting(ctx, "dlv-%", n, "dlv", time.Minute); err != nil {
		return err
	}
	s.prof.begin("delivery")
	m, g0 := s.mark(ctx), readGC()
	s.res.delivery, err = s.client.do(ctx, command{Op: "deliver", Set: "dlv", Rate: s.sz.DeliveryRate})
	s.res.deliveryGC = gcBetween(g0, readGC())
	s.since(ctx, "delivery", m)
	s.prof.end("delivery")
	if err != nil {
		return err
	}
	s.detail("[%s]   delivery: p50 %s p99 %s, %d missing, %d errors; GC: %s", s.label, fmtDur(s.res.delivery.Lat.P50), fmtDur(s.res.delivery.Lat.P99), s.res.delivery.Missing, s.res.delivery.Errors, s.res.deliveryGC)
	s.noteIdleTrouble(ctx, "idle", s.client, "idle", "idlemux")
	if err := s.closeSubs(ctx, "idle", "dlv", "dlv-%"); err != nil {
		return err
	}
	if err := s.closeSubs(ctx, "idle", "idlemux", "idlemux-%"); err != nil {
		return err
	}
	if err := s.closeSubs(ctx, "idle", "idle", "idle-%"); err != nil {
		return err
	}

	// Baseline: the same clients and measurement, in-memory server, nothing else connected.
	defer s.client.do(context.WithoutCancel(ctx), command{Op: "close", Set: "bdlv"})
	if _, err := s.client.do(ctx, command{Op: "subscribe", Set: "bdlv", Endpoint: s.mem.endpoint, N: n, PerConn: 100, Prefix: "bdlv-"}); err != nil {
		return err
	}
	if err := s.waitMem(ctx, n, "bdlv"); err != nil {
		return err
	}
	m = s.mark(ctx)
	s.res.deliveryBase, err = s.client.do(ctx, command{Op: "deliver", Set: "bdlv", Rate: s.sz.DeliveryRate})
	s.since(ctx, "delivery baseline", m)
	if err != nil {
		return err
	}
	s.detail("[%s]   delivery baseline: p50 %s p99 %s", s.label, fmtDur(s.res.deliveryBase.Lat.P50), fmtDur(s.res.deliveryBase.Lat.P99))
	return s.closeSubs(ctx, "idle", "bdlv", "")
}

// deliveries is how many notifies the delivery window sends.
func (s *suite) deliveries() int { return int(s.sz.DeliveryRate * s.sz.DeliveryFor.Seconds()) }

// noteIdleTrouble notes against phase any message or error the idle sets
// saw: an idle subscription must hear nothing.
func (s *suite) noteIdleTrouble(ctx context.Context, phase string, cl *clientHandle, sets ...string) {
	for _, set := range sets {
		r, err := cl.do(ctx, command{Op: "status", Set: set})
		if err != nil {
			s.notes[phase] = append(s.notes[phase], fmt.Sprintf("status of %s: %v", set, err))
			continue
		}
		if r.OK > 0 || r.Errors > 0 {
			s.notes[phase] = append(s.notes[phase], fmt.Sprintf("the idle set %s saw %d messages and %d errors (first: %.160s)", set, r.OK, r.Errors, r.FirstError))
		}
	}
}

// phaseMux: memory per idle subscription, many on each websocket.
func (s *suite) phaseMux(ctx context.Context) error {
	defer s.client.do(context.WithoutCancel(ctx), command{Op: "close", Set: "mux"})
	var err error
	if s.res.mux, err = s.subscribeIdle(ctx, "mux", "mux-", s.sz.Mux, s.sz.MuxPerConn); err != nil {
		return err
	}
	return s.closeSubs(ctx, "mux", "mux", "mux-%")
}

// phaseFanOut: one broadcast to many waiters on one event id, then the
// same through the in-memory server; once for each websocket layout.
func (s *suite) phaseFanOut(ctx context.Context) error {
	for i, per := range s.sz.FanOutPerConn {
		var f fanResult
		err := s.fanOut(ctx, fmt.Sprintf("fan-%d-", i), per, &f)
		s.res.fan = append(s.res.fan, f)
		if err != nil {
			return err
		}
	}
	return nil
}

func (s *suite) fanOut(ctx context.Context, event string, per int, f *fanResult) error {
	n := s.sz.FanOut
	f.perConn = per
	defer s.client.do(context.WithoutCancel(ctx), command{Op: "close", Set: "fan"})
	if _, err := s.client.do(ctx, command{Op: "subscribe", Set: "fan", Endpoint: s.endpoint, N: n, PerConn: per, Prefix: event, SameEvent: true}); err != nil {
		return err
	}
	if err := s.waitWaiting(ctx, event, n, "fan", time.Minute); err != nil {
		return err
	}
	settle()
	window := fmt.Sprintf("fan-out, %d per websocket", per)
	s.prof.begin("fanout-notify")
	m := s.mark(ctx)
	var err error
	f.got, err = s.client.do(ctx, command{Op: "fanout", Set: "fan"})
	s.since(ctx, window, m)
	s.prof.end("fanout-notify")
	if err != nil {
		return err
	}
	s.detail("[%s]   fan-out to %d, %d per websocket: first after %s, last after %s, notify answered in %s, %d missing",
		s.label, n, per, fmtDur(f.got.First), fmtDur(f.got.Last), fmtDur(f.got.NotifyTook), f.got.Missing)
	if err := s.closeSubs(ctx, "fanout", "fan", ""); err != nil {
		return err
	}

	defer s.client.do(context.WithoutCancel(ctx), command{Op: "close", Set: "bfan"})
	if _, err := s.client.do(ctx, command{Op: "subscribe", Set: "bfan", Endpoint: s.mem.endpoint, N: n, PerConn: per, Prefix: "b" + event, SameEvent: true}); err != nil {
		return err
	}
	if err := s.waitMem(ctx, n, "bfan"); err != nil {
		return err
	}
	m = s.mark(ctx)
	f.base, err = s.client.do(ctx, command{Op: "fanout", Set: "bfan"})
	s.since(ctx, window+", baseline", m)
	if err != nil {
		return err
	}
	s.detail("[%s]   fan-out baseline: last after %s", s.label, fmtDur(f.base.Last))
	return s.closeSubs(ctx, "fanout", "bfan", "")
}

// detail logs a measured figure as it comes in, with -v only: without -v
// figures appear only in the table, each beside its baseline.
func (s *suite) detail(format string, args ...any) {
	if s.opts.Verbose {
		log.Printf(format, args...)
	}
}

func perSub(before, after uint64, n int) float64 {
	if n == 0 || after < before {
		return 0
	}
	return float64(after-before) / float64(n)
}

func fmtDur(d time.Duration) string {
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	case d >= time.Millisecond:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond))
	}
}

func fmtBytes(b uint64) string {
	return fmt.Sprintf("%.1f MB", float64(b)/1e6)
}

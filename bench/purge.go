package main

// The retention figure: notify latency while the retention purge deletes a
// backlog of ended rows, beside the same notifies with that backlog in
// place and no purge running.

import (
	"context"
	"errors"
	"fmt"
	"log"
	"slices"
	"strconv"
	"time"

	"rendezvous/storage"
)

// purgePlan is the backlog: n rows that ended 60 days ago (past the default
// 30-day retention), a tenth each runs, their notify steps, their consumed
// lookback events and notifications, the rest waiters: five per run (two
// notified, sharing the run's notification, three canceled) and one without
// a run for each run. A tenth of the waiters are on the event id the
// measured notifies use, so the purge deletes in the index ranges they read.
type purgePlan struct {
	runs  int // n/10
	ended time.Time
}

func newPurgePlan(n int) *purgePlan {
	return &purgePlan{runs: max(n/10, 1), ended: time.Now().Add(-60 * 24 * time.Hour)}
}

func (p *purgePlan) rows() int { return 10 * p.runs }

func (p *purgePlan) run(i int) string { return "wfr_purge-" + strconv.Itoa(i) }

func (p *purgePlan) tables() []seedTable {
	t := func(i int) string { return ts(p.ended.Add(time.Duration(i) * time.Millisecond)) }
	return []seedTable{
		{"runs", "id, state, body, label, result, created_at, updated_at, ended_at", p.runs, func(i int) string {
			return "('" + p.run(i) + "','RUN_SUCCESS','{\"purge\":" + strconv.Itoa(i) + "}',NULL,NULL," + t(i) + "," + t(i) + "," + t(i) + ")"
		}},
		{"steps", "run_id, step_name, type, event_id, waiter_seq, result, created_at, completed_at", p.runs, func(i int) string {
			return "('" + p.run(i) + "','tell','NOTIFY','pg-told',NULL,'{}'," + t(i) + "," + t(i) + ")"
		}},
		{"lookback_events", "run_id, event_id, event_data, message_id, consumed, created_at, expires_at, consumed_at", p.runs, func(i int) string {
			// Consumed, not yet expired: the sweeper's lookback purge leaves it to the run's.
			return "('" + p.run(i) + "','pg-lb','{\"lb\":" + strconv.Itoa(i) + "}','msg_pglb" + strconv.Itoa(i) + "',1," + t(i) + "," + ts(time.Now().Add(24*time.Hour)) + "," + t(i) + ")"
		}},
		{"notifications", "message_id, event_id, event_data, created_at", p.runs, func(i int) string {
			return "('msg_pg" + strconv.Itoa(i) + "','pg-evt','{\"n\":" + strconv.Itoa(i) + "}'," + t(i) + ")"
		}},
		{"waiters", "event_id, run_id, step_name, state, deadline, created_at, ended_at, message_id, event_data, replica_id", 6 * p.runs, func(i int) string {
			event := "pg-evt-" + strconv.Itoa(i%seedEvents)
			if i%10 == 0 {
				event = latEvent
			}
			if i >= 5*p.runs {
				return "('" + event + "',NULL,NULL,'TIMED_OUT'," + t(i) + "," + t(i) + "," + t(i) + ",NULL,NULL,NULL)"
			}
			run := i / 5
			state, msg := "CANCELED", "NULL"
			if i%5 < 2 {
				state, msg = "NOTIFIED", "'msg_pg"+strconv.Itoa(run)+"'"
			}
			return "('" + event + "','" + p.run(run) + "',NULL,'" + state + "'," + t(i) + "," + t(i) + "," + t(i) + "," + msg + ",NULL,NULL)"
		}},
	}
}

type purgeOutcome struct {
	res  storage.PurgeResult
	err  error
	took time.Duration
}

// phasePurge seeds the backlog, times the latency notifies with it in
// place, then again while the engine's retention pass purges it.
func (s *suite) phasePurge(ctx context.Context) error {
	plan := newPurgePlan(s.sz.PurgeRows)
	t := time.Now()
	if err := seedTables(ctx, s.db, s.kind, plan.tables()); err != nil {
		return err
	}
	s.res.purgeSeedTook = time.Since(t)
	log.Printf("[%s]   seeded %d ended rows to purge in %s", s.label, plan.rows(), s.res.purgeSeedTook.Round(time.Millisecond))
	time.Sleep(3 * time.Second) // let the database's own after-load work calm down
	if _, err := s.client.do(ctx, s.latencyLoad(s.endpoint, warmups)); err != nil {
		return err
	}
	// Rounds that alternate: notifies with no purge running, then notifies
	// while the purge runs (started for the round, stopped after it; the
	// next start goes on where it stopped). Whatever else the machine does
	// then weighs on both sides alike. Each side's figure is the median of
	// its rounds' percentiles.
	per := max(s.sz.LatencyN/purgeRounds, 1)
	var without, during []reply
	var total storage.PurgeResult
	for range purgeRounds {
		m := s.mark(ctx)
		r, err := s.client.do(ctx, s.latencyLoad(s.endpoint, per))
		s.since(ctx, "notify latency, backlog in place", m)
		if err != nil {
			return err
		}
		without = append(without, r)

		purgeCtx, cancel := context.WithCancel(ctx)
		done := make(chan purgeOutcome, 1)
		started := time.Now()
		go func() {
			res, err := s.svc.Engine.Purge(purgeCtx)
			done <- purgeOutcome{res: res, err: err, took: time.Since(started)}
		}()
		m = s.mark(ctx)
		r, err = s.client.do(ctx, s.latencyLoad(s.endpoint, per))
		s.since(ctx, "notify latency, during the purge", m)
		select {
		case o := <-done:
			s.res.purgeEndedFirst = true // it had nothing left before the round was over
			total = total.Add(o.res)
		default:
			cancel()
			o := <-done
			total = total.Add(o.res)
			if o.err != nil && !errors.Is(o.err, context.Canceled) {
				return fmt.Errorf("purge: %w", o.err)
			}
		}
		cancel()
		s.res.purgeMeasured += time.Since(started)
		if err != nil {
			return err
		}
		during = append(during, r)
	}
	s.res.latNoPurge, s.res.latPurge = medianReply(without), medianReply(during)

	// The rest of the backlog, for the purge's own rate.
	t = time.Now()
	res, err := s.svc.Engine.Purge(ctx)
	if err != nil {
		return fmt.Errorf("purge: %w", err)
	}
	s.res.purge = purgeOutcome{res: total.Add(res), took: s.res.purgeMeasured + time.Since(t)}
	var left int
	if err := s.db.QueryRowContext(ctx, "SELECT COUNT(*) FROM runs WHERE id LIKE 'wfr_purge-%'").Scan(&left); err != nil {
		return err
	}
	if left != 0 {
		return fmt.Errorf("purge: %d seeded runs left", left)
	}
	s.detail("[%s]   purged %d rows in %s; notify during it p50 %s p99 %s", s.label, s.res.purge.res.Rows(), s.res.purge.took.Round(time.Millisecond),
		fmtDur(s.res.latPurge.Lat.P50), fmtDur(s.res.latPurge.Lat.P99))
	return nil
}

// purgeRounds is how many times the purge figure alternates between no
// purge and purge.
const purgeRounds = 5

// medianReply sums the rounds' counts and takes the median of their
// latency percentiles.
func medianReply(rs []reply) reply {
	var out reply
	pick := func(f func(reply) time.Duration) time.Duration {
		v := make([]time.Duration, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	for _, r := range rs {
		out.OK += r.OK
		out.Errors += r.Errors
		out.Elapsed += r.Elapsed
		out.Lat.N += r.Lat.N
		if out.FirstError == "" {
			out.FirstError = r.FirstError
		}
		out.Lat.Max = max(out.Lat.Max, r.Lat.Max)
	}
	out.Lat.P50 = pick(func(r reply) time.Duration { return r.Lat.P50 })
	out.Lat.P90 = pick(func(r reply) time.Duration { return r.Lat.P90 })
	out.Lat.P99 = pick(func(r reply) time.Duration { return r.Lat.P99 })
	return out
}

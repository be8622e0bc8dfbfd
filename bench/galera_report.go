package main

import (
	"fmt"
	"strings"
	"time"
)

// rows is the -galera table; a figure whose phase failed says so.
func (g *galeraBench) rows(errs map[string]error) []row {
	r, z := &g.res, g.o.Sizes
	const db = "Galera"
	var rows []row
	ran := func(p string) bool { return len(g.o.Only) == 0 || g.o.Only[p] }
	add := func(phases []string, figure, target string, measure func() (result, baseline string, ok, judged bool)) {
		for _, p := range phases {
			if !ran(p) {
				return
			}
		}
		rows = append(rows, measuredRow(db, figure, target, errs, phases, measure))
	}
	pp := func(l latency) string { return fmt.Sprintf("%s / %s", fmtDur(l.P50), fmtDur(l.P99)) }
	delTrouble := func(c crossResult) string {
		if c.errors == 0 && c.missing == 0 {
			return ""
		}
		return fmt.Sprintf("; %d errors, %d not delivered (first: %.400s)", c.errors, c.missing, c.firstErr)
	}
	nodes := len(g.nodes)
	del := func(c crossResult) string {
		return fmt.Sprintf("%s (n=%s, max %s); of which after the notify had answered (bus, wake-up, the subscriber's read): %s (same replica: %s); the notify's own response %s%s",
			pp(c.cross), fmtInt(c.cross.N), fmtDur(c.cross.Max), pp(c.afterCross), pp(c.afterSame), pp(c.call), delTrouble(c))
	}
	base := func(c crossResult) string {
		s := fmt.Sprintf("notify through the subscriber's own replica, same run: %s (n=%s)", pp(c.same), fmtInt(c.same.N))
		if ran("single") && errs["single"] == nil {
			s += fmt.Sprintf("; one replica on the plain MariaDB, same rate: %s, its notify's response %s", pp(r.singleDel.same), pp(r.singleDel.call))
		}
		return s
	}
	add([]string{"redis"},
		fmt.Sprintf("cross-replica delivery latency p50/p99, notify sent → subscriber received, %.0f broadcast notifies/s for %s, %d replicas (one per Galera node) with Redis, each notify through a random replica: notifies through another replica than the subscriber's", z.DeliveryRate, z.DeliveryFor, nodes),
		"p99 < 20 ms",
		func() (string, string, bool, bool) {
			return del(r.redis), base(r.redis), r.redis.cross.P99 < 20*time.Millisecond && r.redis.errors == 0 && r.redis.missing == 0, true
		})
	add([]string{"catchup"},
		fmt.Sprintf("cross-replica delivery latency p50/p99 as above, no Redis: catch-up only (RENDEZVOUS_CATCHUP_INTERVAL %s)", r.catchupInterval),
		fmt.Sprintf("p99 ≤ %s + 20 ms", r.catchupInterval),
		func() (string, string, bool, bool) {
			return del(r.catchup), base(r.catchup), r.catchup.cross.P99 <= r.catchupInterval+20*time.Millisecond && r.catchup.errors == 0 && r.catchup.missing == 0, true
		})
	tp := func(t tpResult) string {
		var p50s, p99s []string
		for _, l := range t.lat {
			p50s, p99s = append(p50s, fmtDur(l.P50)), append(p99s, fmtDur(l.P99))
		}
		s := fmt.Sprintf("%.0f notifies/s (latency p50 %s, p99 %s, per replica's clients)", t.rate(), strings.Join(p50s, ", "), strings.Join(p99s, ", "))
		if t.errors > 0 {
			s += fmt.Sprintf("; %d errors (first: %.160s)", t.errors, t.firstErr)
		}
		return s
	}
	add([]string{"redis", "catchup", "single"},
		fmt.Sprintf("targeted notify (stored as lookback) throughput, %d closed-loop HTTP clients for %s, spread over %d replicas on %d Galera nodes (each client its own runs)", z.ThroughputClients, z.ThroughputFor, nodes, nodes),
		"— (reported: ratio)",
		func() (string, string, bool, bool) {
			w := r.wsrep
			commits := max(w.sum("wsrep_local_commits"), 1)
			notifies := max(int64(r.tp3.ok+r.tp3.errors), 1)
			return fmt.Sprintf("%s = %.2f × one replica on the plain MariaDB, %.2f × one replica on one Galera node. wsrep over the run, all nodes: %s local commits (%.2f per notify), %d certification failures, %d brute-force aborts, flow control paused %.1f%% of the time; %.1f statements per notify",
					tp(r.tp3), r.tp3.rate()/r.tp1.rate(), r.tp3.rate()/r.tp1g.rate(),
					fmtInt(int(commits)), float64(commits)/float64(notifies), w.sum("wsrep_local_cert_failures"), w.sum("wsrep_local_bf_aborts"),
					100*float64(w.sum("wsrep_flow_control_paused_ns"))/float64(max(w.wall.Nanoseconds(), 1))/float64(nodes),
					float64(w.sum("Questions"))/float64(notifies)),
				fmt.Sprintf("one replica on the plain MariaDB, same clients: %s; one replica on Galera node 1 (the others stopped; the cluster replicates every commit): %s", tp(r.tp1), tp(r.tp1g)),
				false, false
		})
	add([]string{"statements"},
		"where the time goes: one bare INSERT+COMMIT (database/sql, one connection) p50/p99 on Galera node 1; rows/s on 16 connections",
		"— (reported)",
		func() (string, string, bool, bool) {
			return fmt.Sprintf("%s (%.1f × p50); %.0f/s (%.2f ×); innodb_flush_log_at_trx_commit=%s (a commit is made durable by the cluster, not by a flush)", pp(r.insG), float64(r.insG.P50)/float64(max(r.insS.P50, 1)), r.insGRate, r.insGRate/r.insSRate, r.flushG),
				fmt.Sprintf("the plain MariaDB: %s; %.0f/s; innodb_flush_log_at_trx_commit=%s", pp(r.insS), r.insSRate, r.flushS), false, false
		})
	add([]string{"statements"},
		"where the time goes: a point read on Galera node 2 with the service's wsrep_sync_wait=15 (it waits until the node has applied every write committed anywhere before it), p50/p99, cluster idle",
		"— (reported)",
		func() (string, string, bool, bool) {
			return pp(r.readSync), fmt.Sprintf("the same read with wsrep_sync_wait=0: %s", pp(r.readNoSync)), false, false
		})
	return rows
}

package main

import (
	"fmt"
	"io"
	"runtime"
	"strings"
	"time"
)

type row struct {
	db, figure, result, baseline, target, met string
}

const (
	metYes = "yes"
	metNo  = "**NO**"
)

func verdict(ok bool) string {
	if ok {
		return metYes
	}
	return metNo
}

// trouble describes errors and missing deliveries of a client reply.
func trouble(r reply) string {
	if r.Errors == 0 && r.Missing == 0 {
		return ""
	}
	return fmt.Sprintf("; %d errors, %d not delivered (first: %.160s)", r.Errors, r.Missing, r.FirstError)
}

func fmtInt(n int) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// measuredRow is one figure's row: "not measured" and missed when one of
// its phases failed (errs), else what measure says, judged or reported.
func measuredRow(db, figure, target string, errs map[string]error, phases []string, measure func() (result, baseline string, ok, judged bool)) row {
	rw := row{db: db, figure: figure, target: target}
	for _, p := range phases {
		if err := errs[p]; err != nil {
			rw.result, rw.baseline, rw.met = fmt.Sprintf("not measured: %s failed: %.200s", p, err), "—", metNo
			return rw
		}
	}
	var ok, judged bool
	rw.result, rw.baseline, ok, judged = measure()
	rw.met = "— (reported)"
	if judged {
		rw.met = verdict(ok)
	}
	return rw
}

// rows turns the suite's results into table rows; a figure whose phase
// failed says so and counts as missed.
func (s *suite) rows() []row {
	r, z := &s.res, s.sz
	var rows []row
	add := func(phases []string, figure, target string, measure func() (result, baseline string, ok bool, judged bool)) {
		for _, p := range phases {
			if !s.ran(p) {
				return
			}
		}
		rows = append(rows, measuredRow(s.label, figure, target, s.errs, append([]string{"setup"}, phases...), measure))
	}
	conns := fmt.Sprintf("%d connections", z.ThroughputClients)
	if s.kind == "sqlite" {
		conns = fmt.Sprintf("%d goroutines on SQLite's one writer connection", z.ThroughputClients)
	}

	add([]string{"baseline", "latency", "throughput"},
		fmt.Sprintf("targeted notify (stored as lookback) throughput, %d concurrent HTTP clients, %s", z.ThroughputClients, z.ThroughputFor),
		"≥ 0.5 × baseline",
		func() (string, string, bool, bool) {
			rate := float64(r.tp.OK) / r.tp.Elapsed.Seconds()
			ratio := rate / r.insertRate
			return fmt.Sprintf("%.0f notifies/s = %.2f × baseline%s%s", rate, ratio, trouble(r.tp), s.busy("notify throughput", "bare INSERT throughput")),
				fmt.Sprintf("%.0f bare single-row INSERT+COMMIT/s (database/sql, %s)", r.insertRate, conns),
				ratio >= 0.5 && r.tp.Errors == 0, true
		})
	add([]string{"baseline", "latency"},
		fmt.Sprintf("notify latency p50/p99, one client (%s targeted notifies, stored as lookback)", fmtInt(r.latEmpty.Lat.N)),
		"p50 ≤ 3 × baseline",
		func() (string, string, bool, bool) {
			ratio := float64(r.latEmpty.Lat.P50) / float64(r.insertLat.P50)
			return fmt.Sprintf("%s / %s (p50 = %.1f × baseline)%s%s", fmtDur(r.latEmpty.Lat.P50), fmtDur(r.latEmpty.Lat.P99), ratio, trouble(r.latEmpty), s.busy("notify latency", "bare INSERT latency")),
				fmt.Sprintf("one bare INSERT+COMMIT: %s / %s (for scale: the same HTTP requests answered by the in-memory handler: %s / %s)", fmtDur(r.insertLat.P50), fmtDur(r.insertLat.P99), fmtDur(r.latMem.Lat.P50), fmtDur(r.latMem.Lat.P99)),
				ratio <= 3 && r.latEmpty.Errors == 0, true
		})
	pr := s.peer
	peerOK := pr != nil && pr.done && pr.err == nil
	peerMissing := func() string {
		switch {
		case pr == nil || !pr.done:
			return "peer not measured (phase peer left out)"
		default:
			return fmt.Sprintf("peer not measured: %.200s", pr.err)
		}
	}
	population := fmt.Sprintf("%s notifies at %.0f/s, each to one subscription (100 per websocket), with %s subscriptions idle one websocket each + %s multiplexed %d per websocket",
		fmtInt(s.deliveries()), z.DeliveryRate, fmtInt(z.Idle), fmtInt(z.DeliveryMux), z.MuxPerConn)
	peerDelivery := func() string {
		if !peerOK {
			return peerMissing()
		}
		d := pr.delivery
		return fmt.Sprintf("peer (%s, same populations, publish through its server API from the same load generator): %s / %s (max %s)%s%s%s",
			peerVersion, fmtDur(d.Lat.P50), fmtDur(d.Lat.P99), fmtDur(d.Lat.Max), trouble(d), s.noteText("peer"), s.busy(peerWindow))
	}
	memBase := fmt.Sprintf("in-memory websocket server, same client and rate, nothing idle: %s / %s%s", fmtDur(r.deliveryBase.Lat.P50), fmtDur(r.deliveryBase.Lat.P99), trouble(r.deliveryBase))
	add([]string{"idle"},
		"delivery latency p99, notify sent → subscriber received: "+population,
		"< 10 ms and ≤ 2 × peer p99",
		func() (string, string, bool, bool) {
			d := r.delivery.Lat
			res := fmtDur(d.P99)
			ok := d.P99 < 10*time.Millisecond && r.delivery.Errors == 0 && r.delivery.Missing == 0
			if peerOK {
				res += fmt.Sprintf(" = %.1f × peer p99", float64(d.P99)/float64(max(pr.delivery.Lat.P99, 1)))
				ok = ok && d.P99 <= 2*pr.delivery.Lat.P99
			}
			res += fmt.Sprintf(" (p50 %s, max %s; the notify's own response p99 %s, max %s)%s%s%s", fmtDur(d.P50), fmtDur(d.Max),
				fmtDur(r.delivery.Resp.P99), fmtDur(r.delivery.Resp.Max), trouble(r.delivery), s.noteText("idle"), s.busy("delivery"))
			return res, peerDelivery() + "; for scale, " + memBase, ok, peerOK || !ok
		})
	add([]string{"idle"},
		"delivery latency p50, the same deliveries",
		"≤ peer p50 + 1 ms",
		func() (string, string, bool, bool) {
			d := r.delivery.Lat
			res := fmt.Sprintf("%s%s; the notify's own response p50 %s", fmtDur(d.P50), trouble(r.delivery), fmtDur(r.delivery.Resp.P50))
			if !peerOK {
				return res, peerDelivery(), false, false
			}
			return fmt.Sprintf("%s (peer + %s)%s; the notify's own response p50 %s", fmtDur(d.P50), fmtDur(d.P50-pr.delivery.Lat.P50), trouble(r.delivery), fmtDur(r.delivery.Resp.P50)),
				peerDelivery() + fmt.Sprintf("; its publish's own response p50 %s", fmtDur(pr.delivery.Resp.P50)),
				d.P50 <= pr.delivery.Lat.P50+time.Millisecond && r.delivery.Errors == 0 && r.delivery.Missing == 0, true
		})
	add([]string{"idle"},
		"GC during the delivery window (runtime/metrics of the server process: longest stop-the-world pause, /sched/pauses/total/gc; mark-assist and all GC CPU as a share of the process's CPU, /cpu/classes, over the GC cycles that ended in the window)",
		"— (reported)",
		func() (string, string, bool, bool) {
			base := peerMissing()
			if peerOK {
				base = "peer: " + pr.gc.String()
			}
			return "ours: " + r.deliveryGC.String(), base, false, false
		})
	add([]string{"idle"},
		"server CPU per delivery (the server process's CPU over the delivery window ÷ notifies; the idle populations' keep-alives included)",
		"— (reported)",
		func() (string, string, bool, bool) {
			perDelivery := func(u cpuUse, n reply) string {
				return fmt.Sprintf("%s per delivery (%.2f cores)", fmtDur(time.Duration(u.server*float64(u.wall)/float64(max(n.OK+n.Missing, 1)))), u.server)
			}
			var ours cpuUse
			for _, u := range r.cpu {
				if u.name == "delivery" {
					ours = u
				}
			}
			base := peerMissing()
			if peerOK {
				base = "peer: " + perDelivery(pr.cpu, pr.delivery)
			}
			return perDelivery(ours, r.delivery), base, false, false
		})
	add([]string{"idle"},
		fmt.Sprintf("memory per idle waitForEvent subscription, %s subscriptions, one websocket each", fmtInt(z.Idle)),
		"≤ peer per connection and ≤ 30 KB",
		func() (string, string, bool, bool) {
			d := r.idle
			per := perSub(d.before.rss, d.after.rss, d.n)
			res := fmt.Sprintf("%.1f KB each (RSS %s → %s; of which Go heap %.1f KB and goroutine stacks %.1f KB each, %.2f goroutines each)%s",
				per/1000, fmtBytes(d.before.rss), fmtBytes(d.after.rss), perSub(d.before.heap, d.after.heap, d.n)/1000, perSub(d.before.stacks, d.after.stacks, d.n)/1000,
				float64(d.after.goroutines-d.before.goroutines)/float64(d.n), s.noteText("idle"))
			if !peerOK {
				return res, peerMissing(), per <= 30000, per > 30000
			}
			p := pr.idle
			pper := perSub(p.before.rss, p.after.rss, p.n)
			return res, fmt.Sprintf("peer (%s, %s connections with one channel subscription each, the same RSS method in its process): %.1f KB per connection (RSS %s → %s; Go heap %.1f KB, goroutine stacks %.1f KB, %.2f goroutines each)",
					peerVersion, fmtInt(p.n), pper/1000, fmtBytes(p.before.rss), fmtBytes(p.after.rss), perSub(p.before.heap, p.after.heap, p.n)/1000, perSub(p.before.stacks, p.after.stacks, p.n)/1000,
					float64(p.after.goroutines-p.before.goroutines)/float64(p.n)),
				per <= 30000 && per <= pper, true
		})
	if !s.ran("idle") && peerOK {
		add([]string{"peer"}, fmt.Sprintf("the peer alone (%s): delivery p50/p99 (%s), memory per idle connection, GC in the delivery window", peerVersion, population), "— (reported)",
			func() (string, string, bool, bool) {
				p := pr.idle
				return fmt.Sprintf("%s / %s (max %s)%s%s; %.1f KB per connection; %s", fmtDur(pr.delivery.Lat.P50), fmtDur(pr.delivery.Lat.P99), fmtDur(pr.delivery.Lat.Max),
					trouble(pr.delivery), s.busy(peerWindow), perSub(p.before.rss, p.after.rss, p.n)/1000, pr.gc), "— (phase idle left out)", false, false
			})
	}
	memRow := func(phase string, d memDelta, figure string, limitKB float64) {
		add([]string{phase}, figure, fmt.Sprintf("≤ %.0f KB each", limitKB),
			func() (string, string, bool, bool) {
				per := perSub(d.before.rss, d.after.rss, d.n)
				heap := perSub(d.before.heap, d.after.heap, d.n)
				stacks := perSub(d.before.stacks, d.after.stacks, d.n)
				gr := float64(d.after.goroutines-d.before.goroutines) / float64(d.n)
				return fmt.Sprintf("%.1f KB each (RSS %s → %s; of which Go heap %.1f KB and goroutine stacks %.1f KB each, %.2f goroutines each)%s",
						per/1000, fmtBytes(d.before.rss), fmtBytes(d.after.rss), heap/1000, stacks/1000, gr, s.noteText(phase)),
					fmt.Sprintf("server RSS before they connect: %s", fmtBytes(d.before.rss)),
					per <= limitKB*1000, true
			})
	}
	memRow("mux", r.mux, fmt.Sprintf("memory per idle waitForEvent subscription, %s subscriptions, %d per websocket", fmtInt(z.Mux), z.MuxPerConn), 12)
	for i, per := range z.FanOutPerConn {
		layout := fmt.Sprintf("%d per websocket", per)
		if per == 1 {
			layout = "one websocket each"
		}
		window := fmt.Sprintf("fan-out, %d per websocket", per)
		add([]string{"fanout"},
			fmt.Sprintf("broadcast fan-out to %s waiters on one event id (%s): notify sent → last subscriber received", fmtInt(z.FanOut), layout),
			"< 500 ms",
			func() (string, string, bool, bool) {
				if i >= len(r.fan) {
					return "not measured: an earlier fan-out failed", "—", false, true
				}
				f := r.fan[i]
				return fmt.Sprintf("%s (first %s, p50 %s; the notify's own response took %s)%s%s%s", fmtDur(f.got.Last), fmtDur(f.got.First), fmtDur(f.got.Lat.P50), fmtDur(f.got.NotifyTook), trouble(f.got), s.noteText("fanout"), s.busy(window, window+", baseline")),
					fmt.Sprintf("in-memory websocket server, same clients: %s (first %s, p50 %s)%s", fmtDur(f.base.Last), fmtDur(f.base.First), fmtDur(f.base.Lat.P50), trouble(f.base)),
					f.got.Last < 500*time.Millisecond && f.got.Missing == 0 && f.got.Errors == 0, true
			})
	}
	add([]string{"latency", "growth"},
		fmt.Sprintf("cost growth: notify latency p50/p99 (as above) with %s ended waiters and %s lookback events (and %s ended runs) in the tables",
			fmtInt(z.SeedWaiters), fmtInt(z.SeedLookback), fmtInt(max(z.SeedWaiters/10, 1))),
		"p50 ≤ 1.25 × baseline",
		func() (string, string, bool, bool) {
			ratio := float64(r.latFull.Lat.P50) / float64(r.latEmpty.Lat.P50)
			return fmt.Sprintf("%s / %s = %.2f × baseline (p99 %.2f ×); seeded in %s%s%s", fmtDur(r.latFull.Lat.P50), fmtDur(r.latFull.Lat.P99), ratio,
					float64(r.latFull.Lat.P99)/float64(r.latEmpty.Lat.P99), r.seedTook.Round(time.Second), trouble(r.latFull), s.busy("notify latency", "notify latency, full tables")),
				fmt.Sprintf("empty tables: %s / %s", fmtDur(r.latEmpty.Lat.P50), fmtDur(r.latEmpty.Lat.P99)),
				ratio <= 1.25 && r.latFull.Errors == 0, true
		})
	add([]string{"purge"},
		fmt.Sprintf("notify latency p50/p99 (as above) while the retention purge deletes %s ended rows (runs, their waiters, steps, lookback events, notifications, and waiters without a run)", fmtInt(z.PurgeRows)),
		"p50 ≤ 1.25 × baseline",
		func() (string, string, bool, bool) {
			ratio := float64(r.latPurge.Lat.P50) / float64(r.latNoPurge.Lat.P50)
			covered := fmt.Sprintf("%d rounds alternating no purge / purge running, medians of the rounds; the purge ran through every purge round", purgeRounds)
			if r.purgeEndedFirst {
				covered = "⚠ the purge ran out of rows before a round was over"
			}
			return fmt.Sprintf("%s / %s = %.2f × baseline (p99 %.2f ×); purged %s rows in %s (%.0f rows/s); %s%s%s", fmtDur(r.latPurge.Lat.P50), fmtDur(r.latPurge.Lat.P99), ratio,
					float64(r.latPurge.Lat.P99)/float64(r.latNoPurge.Lat.P99), fmtInt(int(r.purge.res.Rows())), r.purge.took.Round(time.Second),
					float64(r.purge.res.Rows())/r.purge.took.Seconds(), covered, trouble(r.latPurge), s.busy("notify latency, backlog in place", "notify latency, during the purge")),
				fmt.Sprintf("the same notifies with the %s rows in place and no purge running: %s / %s (seeded in %s)", fmtInt(z.PurgeRows), fmtDur(r.latNoPurge.Lat.P50), fmtDur(r.latNoPurge.Lat.P99), r.purgeSeedTook.Round(time.Second)),
				ratio <= 1.25 && !r.purgeEndedFirst && r.latPurge.Errors == 0, true
		})
	add([]string{"throughput"},
		"server CPU time per notify (getrusage of the server process over the throughput phase ÷ notifies)",
		"— (reported)",
		func() (string, string, bool, bool) {
			per := r.tpCPU / time.Duration(max(r.tp.OK+r.tp.Errors, 1))
			base := r.memTPCPU / time.Duration(max(r.memTP.OK+r.memTP.Errors, 1))
			return fmt.Sprintf("%s per notify (%s CPU for %s notifies in %s, %.0f%% of a core)", fmtDur(per), r.tpCPU.Round(time.Millisecond), fmtInt(r.tp.OK), r.tp.Elapsed.Round(time.Millisecond), 100*r.tpCPU.Seconds()/r.tp.Elapsed.Seconds()),
				fmt.Sprintf("in-memory HTTP handler answering the same requests from the same clients: %s per request", fmtDur(base)),
				false, false
		})
	if s.dbPID != 0 {
		add([]string{"baseline", "throughput"},
			"database server CPU time per notify (/proc/<mariadbd>/stat over the throughput phase ÷ notifies; statements from the server's Questions counter)",
			"— (reported)",
			func() (string, string, bool, bool) {
				per := r.tpDBCPU / time.Duration(max(r.tp.OK, 1))
				base := r.insertDBCPU / time.Duration(max(r.insertN, 1))
				return fmt.Sprintf("%s per notify (%.1f × baseline); %.1f statements per notify", fmtDur(per), float64(per)/float64(base), r.tpStmts),
					fmt.Sprintf("%s per bare INSERT+COMMIT; %.1f statements per insert", fmtDur(base), r.insertStmts), false, false
			})
	}
	return rows
}

// busy warns when processes other than the bench's own used more than a
// quarter of a core during the named windows: the figure is then suspect.
func (s *suite) busy(windows ...string) string {
	var worst cpuUse
	for _, u := range s.res.cpu {
		for _, w := range windows {
			if u.name == w && u.others > worst.others {
				worst = u
			}
		}
	}
	if worst.others < 0.25 {
		return ""
	}
	return fmt.Sprintf("; ⚠ other processes kept %.2f of %d cores busy during %q", worst.others, runtime.NumCPU(), worst.name)
}

// cpuLines describes who used the CPU during each timed window.
func cpuLines(w io.Writer, suites []*suite) {
	fmt.Fprintf(w, "\nCPU during the timed windows, in cores of %d (server = the server process: the service, or the bench's own database/sql client in the bare INSERT windows; client = the client process; dbms = the local database server, which other clients may share; others = the rest of the machine):\n\n", runtime.NumCPU())
	for _, s := range suites {
		for _, u := range s.res.cpu {
			fmt.Fprintf(w, "- %s, %s (%s): server %.2f, client %.2f, dbms %.2f, others %.2f\n", s.label, u.name, fmtDur(u.wall), u.server, u.client, u.dbms, u.others)
		}
	}
}

func (s *suite) noteText(phase string) string {
	if len(s.notes[phase]) == 0 {
		return ""
	}
	return "; ⚠ " + strings.Join(s.notes[phase], "; ")
}

func printTable(w io.Writer, rows []row, withDB bool) {
	cell := func(s string) string {
		return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
	}
	if len(rows) == 0 {
		fmt.Fprintln(w, "(no figures: every phase was left out)")
		return
	}
	if withDB {
		fmt.Fprintln(w, "| database | figure | result | baseline (same run) | target | met |")
		fmt.Fprintln(w, "|---|---|---|---|---|---|")
	} else {
		fmt.Fprintf(w, "Database: %s\n\n", rows[0].db)
		fmt.Fprintln(w, "| figure | result | baseline (same run) | target | met |")
		fmt.Fprintln(w, "|---|---|---|---|---|")
	}
	for _, r := range rows {
		if withDB {
			fmt.Fprintf(w, "| %s ", cell(r.db))
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", cell(r.figure), cell(r.result), cell(r.baseline), cell(r.target), cell(r.met))
	}
}

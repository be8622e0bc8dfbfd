package main

import (
	"context"
	"fmt"
	"log"
	"time"
)

// peerRun is the peer's figures: measured once per bench run (they do not
// depend on our database) and shown beside ours in every suite's table.
type peerRun struct {
	done     bool
	err      error
	idle     memDelta // the peer process, Idle connections of one subscription each
	delivery reply    // the same deliveries as ours, the same populations idle
	gc       gcWindow // the peer process over its delivery window
	cpu      cpuUse
}

// phasePeer measures the peer with our idle phase's populations and
// deliveries: Idle connections with one subscription each (memory per
// connection, by the same RSS method as ours), DeliveryMux subscriptions
// MuxPerConn per connection, then the same number of publishes at the same
// rate from the same load generator, through the peer's server API, to
// subscriptions 100 per connection, with the peer process's GC figures.
func (s *suite) phasePeer(ctx context.Context) error {
	pr := s.peer
	if pr.done {
		return pr.err
	}
	pr.done = true
	pr.err = s.measurePeer(ctx, pr)
	return pr.err
}

func (s *suite) measurePeer(ctx context.Context, pr *peerRun) error {
	peer, err := startPeer()
	if err != nil {
		return err
	}
	defer peer.stop()
	// A client process of its own: the peer's clients are of another
	// library, and each client process stays under the open-file limit.
	cl, err := startClient()
	if err != nil {
		return err
	}
	defer cl.stop()
	log.Printf("[peer] %s in process %d on %s", peerVersion, peer.pid, peer.addr)

	subscribe := func(set, prefix string, n, per int) error {
		r, err := cl.do(ctx, command{Op: "psubscribe", Set: set, Endpoint: peer.wsURL(), API: peer.apiURL(), N: n, PerConn: per, Prefix: prefix})
		if err != nil {
			return err
		}
		log.Printf("[peer]   %d subscriptions on %d connections, confirmed in %s", n, (n+per-1)/per, r.Elapsed.Round(time.Millisecond))
		return nil
	}
	want := 0
	registered := func(set string) error {
		return waitCount(ctx, want, time.Minute, func() (int, error) { return peer.subs(ctx) }, func() string {
			r, err := cl.do(ctx, command{Op: "status", Set: set})
			if err != nil {
				return "; " + err.Error()
			}
			return fmt.Sprintf("; the client saw %d messages, %d errors (first: %s)", r.OK, r.Errors, r.FirstError)
		})
	}

	pr.idle.n = s.sz.Idle
	if pr.idle.before, err = peer.mem(ctx); err != nil {
		return err
	}
	if err := subscribe("idle", "idle-", s.sz.Idle, 1); err != nil {
		return err
	}
	want += s.sz.Idle
	if err := registered("idle"); err != nil {
		return err
	}
	if pr.idle.after, err = peer.mem(ctx); err != nil {
		return err
	}
	s.detail("[peer]   RSS %s → %s: %.1f KB per connection", fmtBytes(pr.idle.before.rss), fmtBytes(pr.idle.after.rss), perSub(pr.idle.before.rss, pr.idle.after.rss, pr.idle.n)/1000)

	if err := subscribe("idlemux", "idlemux-", s.sz.DeliveryMux, s.sz.MuxPerConn); err != nil {
		return err
	}
	want += s.sz.DeliveryMux
	n := s.deliveries()
	if err := subscribe("dlv", "dlv-", n, 100); err != nil {
		return err
	}
	want += n
	if err := registered("dlv"); err != nil {
		return err
	}

	g0, err := peer.gc(ctx)
	if err != nil {
		return err
	}
	m := s.markPeer(ctx, peer, cl)
	pr.delivery, err = cl.do(ctx, command{Op: "deliver", Set: "dlv", Rate: s.sz.DeliveryRate})
	pr.cpu = s.sincePeer(ctx, peer, cl, m)
	if err != nil {
		return err
	}
	g1, err := peer.gc(ctx)
	if err != nil {
		return err
	}
	pr.gc = gcBetween(g0, g1)
	s.detail("[peer]   delivery: p50 %s p99 %s, %d missing, %d errors; GC: %s", fmtDur(pr.delivery.Lat.P50), fmtDur(pr.delivery.Lat.P99), pr.delivery.Missing, pr.delivery.Errors, pr.gc)
	s.noteIdleTrouble(ctx, "peer", cl, "idle", "idlemux")
	return nil
}

// peerWindow names the peer's delivery window in the CPU lines.
const peerWindow = "peer delivery (server = the peer process, client = its client process)"

// markPeer and sincePeer are mark and since for the peer's window: server
// is the peer process, client the peer's client process; our own
// processes (this one and our client process) count as others.
func (s *suite) markPeer(ctx context.Context, peer *peerHandle, cl *clientHandle) cpuMark {
	m := cpuMark{at: time.Now(), machine: machineBusy(), self: pidCPU(peer.pid), dbms: pidCPU(s.dbPID)}
	if r, err := cl.do(ctx, command{Op: "cpu"}); err == nil {
		m.client = r.CPU
	}
	return m
}

func (s *suite) sincePeer(ctx context.Context, peer *peerHandle, cl *clientHandle, m cpuMark) cpuUse {
	return s.window(peerWindow, m, s.markPeer(ctx, peer, cl))
}

package main

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// crossResult is one delivery-latency run over several replicas: from
// sending a notify to its subscriber's message, split by whether the notify
// went through the subscriber's own replica.
type crossResult struct {
	same, cross latency
	call        latency // the notify's own response time
	// afterSame, afterCross: from the notify's answer to the message
	// (0 when the message came first): the part of a delivery that is not
	// the notify's own commit.
	afterSame, afterCross latency
	n, missing            int
	errors                int
	firstErr              string
}

// delivery subscribes Rate × DeliveryFor waiters (one each, 100 per
// websocket), waiter k on replica k mod len(eps), waits until all are
// registered, then sends one broadcast notify per waiter at Rate per second
// (open loop), each through a replica picked at random, and waits up to
// patience for the last message. db is where the waiters are counted.
func (g *galeraBench) delivery(ctx context.Context, tag string, eps []string, db *sql.DB, patience time.Duration) (crossResult, error) {
	z := g.o.Sizes
	n := int(z.DeliveryRate * z.DeliveryFor.Seconds())
	prefix := tag + strconv.FormatInt(time.Now().UnixNano(), 36) + "-"
	sets := make([]*subSet, len(eps))
	for r, ep := range eps {
		name := prefix + strconv.Itoa(r)
		count := n / len(eps)
		if r < n%len(eps) {
			count++
		}
		if _, err := g.p.subscribe(ctx, command{Set: name, Endpoint: ep, N: count, PerConn: 100, Prefix: name + "-"}); err != nil {
			return crossResult{}, err
		}
		sets[r] = g.p.sets[name]
		defer g.p.closeSet(name)
	}
	if err := waitCount(ctx, n, time.Minute, func() (int, error) {
		var c int
		err := db.QueryRowContext(ctx, "SELECT COUNT(*) FROM waiters WHERE state = 'WAITING' AND event_id LIKE ?", prefix+"%").Scan(&c)
		return c, err
	}, func() string { return "" }); err != nil {
		return crossResult{}, fmt.Errorf("waiters registered: %w", err)
	}
	for _, ep := range eps {
		g.p.warm(ctx, ep)
	}
	type one struct {
		at, i, from int
		answered    atomic.Int64 // unix nanoseconds the notify's answer came
	}
	plan := make([]*one, n)
	for k := range plan {
		plan[k] = &one{at: k % len(eps), i: k / len(eps), from: g.rng.IntN(len(eps))}
	}
	var (
		wg       sync.WaitGroup
		errs     atomic.Int64
		firstErr atomic.Pointer[string]
		mu       sync.Mutex
		calls    = make([]time.Duration, 0, n)
	)
	interval := time.Duration(float64(time.Second) / z.DeliveryRate)
	t0 := time.Now().Add(20 * time.Millisecond)
	for k, o := range plan {
		time.Sleep(time.Until(t0.Add(time.Duration(k) * interval)))
		s := sets[o.at]
		body := mustJSON(gqlRequest{Query: qNotifyBroadcast, Variables: map[string]any{"e": s.event(o.i), "d": eventData}})
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent := time.Now()
			s.sent[o.i].Store(sent.UnixNano())
			data, err := post(ctx, g.p.hc, eps[o.from], body)
			took := time.Since(sent)
			o.answered.Store(sent.Add(took).UnixNano())
			if err == nil {
				err = checkResolved(data, 1)
			}
			if err != nil {
				errs.Add(1)
				msg := err.Error()
				firstErr.CompareAndSwap(nil, &msg)
				return
			}
			mu.Lock()
			calls = append(calls, took)
			mu.Unlock()
		}()
	}
	wg.Wait()
	for _, s := range sets {
		waitReceived(s, patience)
	}
	var same, cross, afterSame, afterCross []time.Duration
	res := crossResult{n: n}
	for _, o := range plan {
		s := sets[o.at]
		rc := s.recv[o.i].Load()
		if rc == 0 {
			res.missing++
			continue
		}
		d := time.Duration(rc - s.sent[o.i].Load())
		var after time.Duration
		if a := o.answered.Load(); a != 0 {
			after = max(time.Duration(rc-a), 0)
		}
		if o.from == o.at {
			same, afterSame = append(same, d), append(afterSame, after)
		} else {
			cross, afterCross = append(cross, d), append(afterCross, after)
		}
		if os.Getenv("BENCH_DEBUG") != "" && d > 20*time.Millisecond {
			fmt.Fprintf(os.Stderr, "slow delivery (%s, replica %d → %d): sent at +%s, took %s\n", tag, o.from+1, o.at+1,
				time.Duration(s.sent[o.i].Load()-t0.UnixNano()).Round(time.Millisecond), d.Round(time.Millisecond))
		}
	}
	res.same, res.cross, res.call = summarize(same), summarize(cross), summarize(calls)
	res.afterSame, res.afterCross = summarize(afterSame), summarize(afterCross)
	res.errors = int(errs.Load())
	if e := firstErr.Load(); e != nil {
		res.firstErr = "notify: " + *e
	}
	for _, s := range sets {
		res.errors += int(s.errors.Load())
		if e := s.firstErr.Load(); e != nil && !strings.Contains(res.firstErr, "subscriber") {
			res.firstErr += "; first subscriber error: " + *e
		}
	}
	return res, nil
}

// tpResult is one throughput run.
type tpResult struct {
	ok, errors int
	elapsed    time.Duration
	lat        []latency // per replica's clients
	firstErr   string
}

func (t tpResult) rate() float64 { return float64(t.ok) / max(t.elapsed.Seconds(), 1e-9) }

// throughput runs ThroughputClients closed-loop clients for ThroughputFor,
// client c on replica c mod len(eps), each sending targeted notifies (stored
// as lookback events) to runs of its own, as the single-server throughput
// figure does (the clients of one replica are one load command).
func (g *galeraBench) throughput(ctx context.Context, prefix string, eps []string) (tpResult, error) {
	z := g.o.Sizes
	per := make([]int, len(eps))
	for c := range z.ThroughputClients {
		per[c%len(eps)]++
	}
	loads := make([]command, len(eps))
	for r, ep := range eps {
		p := prefix + strconv.Itoa(r) + "-"
		if _, err := g.p.trigger(ctx, command{Endpoint: ep, Prefix: p, Clients: per[r], Runs: tpRuns}); err != nil {
			return tpResult{}, err
		}
		loads[r] = command{Endpoint: ep, Prefix: p, Clients: per[r], Runs: tpRuns, EventID: tpEvent}
	}
	run := func(count int, d time.Duration) (tpResult, error) {
		replies := make([]reply, len(eps))
		errs := make([]error, len(eps))
		var wg sync.WaitGroup
		for r := range eps {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := loads[r]
				c.Count, c.Duration = count, d
				replies[r], errs[r] = g.p.load(ctx, c)
			}()
		}
		wg.Wait()
		var t tpResult
		for r, rp := range replies {
			if errs[r] != nil {
				return t, errs[r]
			}
			t.ok += rp.OK
			t.errors += rp.Errors
			t.elapsed = max(t.elapsed, rp.Elapsed)
			t.lat = append(t.lat, rp.Lat)
			if t.firstErr == "" {
				t.firstErr = rp.FirstError
			}
		}
		return t, nil
	}
	if _, err := run(10, 0); err != nil { // warm-up
		return tpResult{}, err
	}
	return run(0, z.ThroughputFor)
}

package engine

import (
	"context"
	"fmt"
	"sync"
	"time"

	"rendezvous/hub"
	"rendezvous/models"
	"rendezvous/storage"
)

const (
	sweepBatch   = 500
	purgeBatch   = 1000
	maxBatchRuns = 20 // per tick, so one tick cannot run for ever
)

func (e *Engine) runLoops(ctx context.Context) {
	// The retention purge runs in its own goroutine: a pass over a large
	// backlog takes minutes, and must not hold up lease renewal or sweeps.
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { e.retentionLoop(ctx) })
	// The lease too: a sweep, catch-up or gauge tick may each take up to
	// loopTimeout on a busy database, and a renewal that waited behind
	// them could let the lease (renewed every quarter TTL) lapse while
	// this replica is alive, and another replica reap its waiters.
	wg.Go(func() { e.leaseLoop(ctx) })

	sweep := time.NewTicker(e.cfg.SweepInterval)
	defer sweep.Stop()
	catchUp := time.NewTicker(e.cfg.CatchUpInterval)
	defer catchUp.Stop()
	gauges := time.NewTicker(e.cfg.GaugeInterval)
	defer gauges.Stop()
	bounded(ctx, e.sweep)
	bounded(ctx, e.sampleBacklog)
	for {
		select {
		case <-ctx.Done():
			return
		case <-sweep.C:
			bounded(ctx, e.sweep)
		case <-gauges.C:
			bounded(ctx, e.sampleBacklog)
		case <-catchUp.C:
			bounded(ctx, e.catchUp)
		}
	}
}

// leaseLoop renews this replica's lease every quarter TTL (every second
// after a failure) and reaps the waiters of replicas whose lease ran out.
func (e *Engine) leaseLoop(ctx context.Context) {
	lease := time.NewTimer(0)
	defer lease.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-lease.C:
			next := e.cfg.LeaseTTL / 4
			if !e.renewAndReap(ctx) {
				next = min(next, time.Second) // back soon after an outage
			}
			lease.Reset(next)
		}
	}
}

// loopTimeout bounds one tick of a background loop: a connection the
// network black-holed (no reset, no answer) must not stop the loop, whose
// lease renewals and catch-up polls other things rely on. When the
// context ends the driver drops the connection; the next tick gets a new
// one.
const loopTimeout = 5 * time.Second

func bounded(ctx context.Context, f func(context.Context)) {
	ctx, cancel := context.WithTimeout(ctx, loopTimeout)
	defer cancel()
	f(ctx)
}

// renewAndReap keeps this replica's lease alive and deletes the waiters
// without a step of replicas whose lease ran out (they died without
// cleaning up). After a database outage every lease has lapsed, live
// replicas' too, so it reaps only once renewals have succeeded for half a
// TTL: by then every live replica has renewed (they do every quarter TTL).
func (e *Engine) renewAndReap(ctx context.Context) bool {
	// Bounded, so that a connection the network black-holed (no reset, no
	// answer) cannot hold the loop past the lease: the driver drops the
	// connection when the context ends, and the next tick uses a new one.
	ctx, cancel := context.WithTimeout(ctx, max(e.cfg.LeaseTTL/4, time.Second))
	defer cancel()
	if err := e.SyncClock(ctx); err != nil {
		if ctx.Err() == nil {
			e.log.Warn("read the database clock", "err", err)
		}
		e.healthySince = time.Time{}
		return false
	}
	if err := e.holdLease(ctx, true); err != nil {
		if ctx.Err() == nil {
			e.log.Warn("renew replica lease", "err", err)
		}
		e.healthySince = time.Time{}
		return false
	}
	now := e.now()
	if e.healthySince.IsZero() {
		e.healthySince = now
	}
	if now.Sub(e.healthySince) < e.cfg.LeaseTTL/2 {
		return true
	}
	n, err := e.store.WaiterReapOrphans(ctx, now)
	if err != nil {
		if ctx.Err() == nil {
			e.log.Warn("reap waiters of dead replicas", "err", err)
		}
		return true
	}
	if n > 0 {
		e.record(tally{removed: int(n)})
		e.log.Info("removed waiters of a replica that stopped without cleaning up", "waiters", n)
	}
	return true
}

// sweep ends TIMED_OUT the waiters whose deadline passed (subscribers have
// their own timers; this covers durable waiters nobody watches and waiters
// of subscribers on a replica that died) and purges expired lookback events.
func (e *Engine) sweep(ctx context.Context) {
	e.releaseRetries(ctx)
	for range maxBatchRuns {
		n, err := e.expireDue(ctx)
		if err != nil {
			if ctx.Err() == nil {
				e.log.Warn("time out expired waiters", "err", err)
			}
			break
		}
		if n < sweepBatch {
			break
		}
	}
	for range maxBatchRuns {
		n, unconsumed, err := e.store.LookbackEventPurge(ctx, e.now(), purgeBatch)
		e.record(tally{expired: int(unconsumed)})
		if err != nil {
			if ctx.Err() == nil {
				e.log.Warn("purge expired lookback events", "err", err)
			}
			break
		}
		if n < purgeBatch {
			break
		}
	}
}

func (e *Engine) expireDue(ctx context.Context) (int, error) {
	var (
		found int
		wakes map[string]hub.Wake
	)
	err := e.store.InTx(ctx, func(tx storage.Executor) error {
		wakes = map[string]hub.Wake{}
		now := e.now()
		due, err := tx.WaiterListExpired(ctx, now, sweepBatch)
		if err != nil {
			return err
		}
		found = len(due)
		if found == 0 {
			return nil
		}
		ids := make([]string, len(due))
		byID := make(map[string]*models.Waiter, len(due))
		for i, w := range due {
			ids[i] = w.ID
			byID[w.ID] = w
		}
		ended, err := tx.WaiterEnd(ctx, &storage.WaiterEndParams{WaiterIDs: ids, State: models.WaiterTimedOut, EndedAt: now, NoCallbacks: noCallbacks(due)})
		if err != nil {
			return err
		}
		for _, id := range ended {
			wakes[id] = wakeEnded(byID[id], models.WaiterTimedOut, now)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	e.record(tally{timedOut: len(wakes)})
	e.wake(ctx, wakes)
	return found, nil
}

// sampleBacklog counts, for the recorder's gauges, the waiters waiting and
// the lookback events pending, from the database: every replica sees the
// same totals, whoever registered them.
func (e *Engine) sampleBacklog(ctx context.Context) {
	if _, nop := e.rec.(NopRecorder); nop {
		return
	}
	now := e.now()
	waiting, err := e.store.WaiterCountWaiting(ctx, now)
	if err == nil {
		var pending int64
		if pending, err = e.store.LookbackEventCountPending(ctx, now); err == nil {
			e.rec.Backlog(waiting, pending)
			return
		}
	}
	if ctx.Err() == nil {
		e.log.Warn("count waiters and lookback events for metrics", "err", err)
	}
}

// catchUp asks the database which waiters with live subscriptions here are
// no longer waiting, ended or gone, and wakes those subscriptions to read
// them: the safety net under lost wake-ups, and the only way a subscription
// hears that its waiter was reaped (nobody publishes a reaping).
func (e *Engine) catchUp(ctx context.Context) {
	ids := e.hub.WaiterIDs()
	if len(ids) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, readTimeout)
	defer cancel()
	// A waiter listened for before its registration commits is not found
	// yet: its wait reads it only after Watch (after the commit), so the
	// wake costs a read and decides nothing.
	settled, err := e.store.WaiterListNotWaiting(ctx, ids)
	if err != nil {
		if ctx.Err() == nil {
			e.log.Warn("catch up on waiter ends", "err", err)
		}
		return
	}
	for _, id := range settled {
		e.hub.Publish(id, hub.Wake{})
	}
}

// purgeBatchRows bounds the rows one purge transaction deletes: small enough
// that its locks are held for milliseconds.
const purgeBatchRows = 500

// purgeRest: after each batch the purge rests this many times as long as
// the batch took. The database does more for a delete than the batch's
// own time shows (InnoDB removes the delete-marked rows and their index
// entries later, in its own purge threads, and every commit is a log
// flush), so resting twice as long keeps the purge's share of the database
// near a half at most, whatever the database's speed.
const purgeRest = 2

// retentionLoop purges what has passed its retention, once at start and
// then every PurgeInterval, until ctx ends.
func (e *Engine) retentionLoop(ctx context.Context) {
	next := time.NewTimer(0)
	defer next.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-next.C:
		}
		if _, err := e.Purge(ctx); err != nil && ctx.Err() == nil {
			e.log.Warn("retention purge", "err", err)
		}
		next.Reset(e.cfg.PurgeInterval)
	}
}

// Purge runs one retention pass now: ended runs whose end is older than
// RunRetention, with their waiters, steps, lookback events and the
// notifications nothing else refers to; then waiters without a run ended
// longer than RunlessWaiterRetention ago. Nothing live goes: a started
// run, a WAITING waiter, a lookback event not consumed and not expired.
//
// It works in transactions of at most purgeBatchRows rows, each found by an
// index and deleted by primary key, and after each one rests (purgeRest),
// so that other transactions (notifies) get the locks and the database in
// between. Several replicas may purge at once: they delete the same rows
// or wait for each other, nothing worse.
func (e *Engine) Purge(ctx context.Context) (storage.PurgeResult, error) {
	var total storage.PurgeResult
	now := e.now()
	passes := []struct {
		what  string
		p     storage.PurgeParams
		purge func(storage.Executor, context.Context, *storage.PurgeParams) (storage.PurgeResult, error)
	}{
		{"ended runs", storage.PurgeParams{EndedBefore: now.Add(-e.cfg.RunRetention), Now: now, Limit: purgeBatchRows}, storage.Executor.RunPurge},
		{"ended waiters without a run", storage.PurgeParams{EndedBefore: now.Add(-e.cfg.RunlessWaiterRetention), Now: now, Limit: purgeBatchRows}, storage.Executor.WaiterPurgeRunless},
	}
	defer func() {
		if total.Rows() > 0 {
			e.log.Info("retention purge", "runs", total.Runs, "waiters", total.Waiters, "steps", total.Steps,
				"lookback_events", total.LookbackEvents, "notifications", total.Notifications)
		}
	}()
	for _, pass := range passes {
		for {
			started := time.Now()
			var res storage.PurgeResult
			err := e.store.InTx(ctx, func(tx storage.Executor) error {
				var err error
				res, err = pass.purge(tx, ctx, &pass.p)
				return err
			})
			if err != nil {
				return total, fmt.Errorf("purge %s: %w", pass.what, err)
			}
			total = total.Add(res)
			// A call that deleted nothing may still have more to do: it
			// moved pass.p.After past runs that are kept for now.
			if !res.More {
				break
			}
			rest := time.NewTimer(purgeRest * time.Since(started))
			select {
			case <-ctx.Done():
				rest.Stop()
				return total, ctx.Err()
			case <-rest.C:
			}
		}
	}
	total.More = false
	return total, nil
}

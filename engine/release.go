package engine

import (
	"context"
	"sync"
	"time"
)

// When a subscription ends, its waiter without a step must be removed
// before it can swallow a targeted notify. One DELETE per subscription is
// fine one at a time, but a client that drops 50,000 multiplexed
// subscriptions at once would queue 50,000 statements on a pool of a few
// dozen connections, most of them timing out. So removals go through one
// queue, drained by a goroutine that lives while there is work and deletes
// up to releaseBatch waiters per statement: alone, a removal costs one
// statement as before; in a crowd, a thousandth of one.

const (
	releaseBatch   = 1000
	releaseTimeout = 5 * time.Second
)

type releaseQueue struct {
	mu      sync.Mutex
	pending []pendingRelease
	running bool
}

type pendingRelease struct {
	waiterID string
	done     func() // called once the waiter is removed or queued for retry
}

// releaseWaiter removes the waiter if it is still WAITING, then calls done.
func (e *Engine) releaseWaiter(waiterID string, done func()) {
	q := &e.releases
	q.mu.Lock()
	q.pending = append(q.pending, pendingRelease{waiterID, done})
	start := !q.running
	q.running = true
	q.mu.Unlock()
	if start {
		go e.drainReleases()
	}
}

func (e *Engine) drainReleases() {
	q := &e.releases
	for {
		q.mu.Lock()
		n := min(len(q.pending), releaseBatch)
		if n == 0 {
			q.running = false
			q.pending = nil // let a burst's backing array go
			q.mu.Unlock()
			return
		}
		batch := make([]pendingRelease, n)
		copy(batch, q.pending)
		q.pending = q.pending[n:]
		q.mu.Unlock()

		ids := make([]string, n)
		for i, r := range batch {
			ids[i] = r.waiterID
		}
		ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
		removed, err := e.store.WaiterDeleteWaiting(ctx, ids)
		cancel()
		if err != nil {
			// Left WAITING they would count for notifies (their owner, this
			// replica, is alive): the sweep loop tries again until gone.
			e.log.Warn("remove waiters of closed subscriptions, will retry", "waiters", n, "err", err)
			for _, id := range ids {
				e.retryRelease(id)
			}
		}
		if removed > 0 {
			e.record(tally{removed: int(removed)})
		}
		for _, r := range batch {
			r.done()
		}
	}
}

// retryRelease queues a waiter whose removal failed.
func (e *Engine) retryRelease(id string) {
	e.unreleasedMu.Lock()
	defer e.unreleasedMu.Unlock()
	if e.unreleased == nil {
		e.unreleased = map[string]struct{}{}
	}
	e.unreleased[id] = struct{}{}
}

// releaseRetries removes queued waiters, a bounded number per call.
func (e *Engine) releaseRetries(ctx context.Context) {
	const perRound = 5 * releaseBatch
	e.unreleasedMu.Lock()
	ids := make([]string, 0, min(len(e.unreleased), perRound))
	for id := range e.unreleased {
		if len(ids) == perRound {
			break
		}
		ids = append(ids, id)
	}
	e.unreleasedMu.Unlock()
	if len(ids) == 0 {
		return
	}
	removed, err := e.store.WaiterDeleteWaiting(ctx, ids)
	if err != nil {
		return // the database is still struggling; next round
	}
	if removed > 0 {
		e.record(tally{removed: int(removed)})
	}
	e.unreleasedMu.Lock()
	for _, id := range ids {
		delete(e.unreleased, id)
	}
	e.unreleasedMu.Unlock()
}

package engine

import (
	"context"
	"time"

	"rendezvous/models"
	"rendezvous/storage"
)

// Reads of waiters by waits that were told "look in the database" (a
// wake-up from another replica, the catch-up poll, a retry) are batched: a
// broadcast that ended 10,000 waiters on another replica wakes 10,000 waits
// here at once, and one WHERE seq IN (…) read per thousand of them costs
// the database far less than 10,000 point reads.
//
// No timer gathers them: a read runs as soon as one is asked for, and what
// is asked meanwhile waits for it to return and goes in the next, so a lone
// read costs no added latency and a burst costs one read per chunk.

// readTimeout bounds one batched read, so that a connection the network
// black-holed cannot hold every waiting wait for ever; they retry.
const readTimeout = 5 * time.Second

type waiterReads struct {
	pending map[string][]chan<- waiterRead // guarded by Engine.readsMu
	running bool
}

type waiterRead struct {
	w   *models.Waiter
	err error // storage.ErrNotFound: the waiter is gone
}

// readWaiter reads the waiter with whatever other waits want read at the
// same time. storage.ErrNotFound: it is gone.
func (e *Engine) readWaiter(ctx context.Context, id string) (*models.Waiter, error) {
	ch := make(chan waiterRead, 1)
	e.readsMu.Lock()
	if e.reads.pending == nil {
		e.reads.pending = make(map[string][]chan<- waiterRead)
	}
	e.reads.pending[id] = append(e.reads.pending[id], ch)
	start := !e.reads.running
	e.reads.running = true
	e.readsMu.Unlock()
	if start {
		go e.readBatches()
	}
	select {
	case r := <-ch:
		return r.w, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// readBatches reads what is pending, in one WaiterGetMany, until nothing is.
func (e *Engine) readBatches() {
	for {
		e.readsMu.Lock()
		batch := e.reads.pending
		e.reads.pending = nil
		if len(batch) == 0 {
			e.reads.running = false
			e.readsMu.Unlock()
			return
		}
		e.readsMu.Unlock()
		ids := make([]string, 0, len(batch))
		for id := range batch {
			ids = append(ids, id)
		}
		ctx, cancel := context.WithTimeout(context.Background(), readTimeout)
		got, err := e.store.WaiterGetMany(ctx, ids)
		cancel()
		for id, chs := range batch {
			r := waiterRead{err: err}
			if err == nil {
				if r.w = got[id]; r.w == nil {
					r.err = storage.ErrNotFound
				}
			}
			for _, ch := range chs {
				ch <- r // buffered: never blocks
			}
		}
	}
}

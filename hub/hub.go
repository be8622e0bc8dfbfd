// Package hub knows which live subscriptions in this process listen for which
// waiter, and wakes them when a waiter ends. It carries wake-ups only: a lost
// wake-up costs latency, never a notification, because a woken (or polling)
// subscriber reads the waiter's end from the database, the only truth.
//
// The hub is sharded by waiter id so deliveries to different waiters do not
// contend on one lock. Listeners are functions that must not block, so a
// slow subscriber never holds up a publisher.
package hub

import (
	"hash/maphash"
	"sync"
	"time"

	"rendezvous/models"
)

const shardCount = 64

// Wake is what a listener receives: the waiter's final result when the
// publisher had it at hand (same process), or nil meaning "look in the
// database" (a wake-up from another replica or from the catch-up poll).
type Wake struct {
	Result *models.WaitResult
	Err    error
	// EndedAt is when the waiter ended, with Result or Err (for the
	// delivery latency).
	EndedAt time.Time
}

// Listener is one registration for the wakes of one waiter.
type Listener struct {
	fn       func(Wake)
	waiterID string
}

// Hub maps waiter ids to listeners.
type Hub struct {
	seed   maphash.Seed
	shards [shardCount]shard
}

type shard struct {
	mu        sync.RWMutex
	listeners map[string][]*Listener
}

// New returns an empty hub.
func New() *Hub {
	h := &Hub{seed: maphash.MakeSeed()}
	for i := range h.shards {
		h.shards[i].listeners = make(map[string][]*Listener)
	}
	return h
}

func (h *Hub) shard(waiterID string) *shard {
	return &h.shards[maphash.String(h.seed, waiterID)%shardCount]
}

// Listen registers fn to be called with each wake of the waiter, on the
// publisher's goroutine: fn must not block (a subscription without a
// goroutine of its own hands real work to one). A second wake may come
// before the first was acted on; either sends the listener to the same
// final state. Call Unlisten when done.
func (h *Hub) Listen(waiterID string, fn func(Wake)) *Listener {
	l := &Listener{fn: fn, waiterID: waiterID}
	s := h.shard(waiterID)
	s.mu.Lock()
	s.listeners[waiterID] = append(s.listeners[waiterID], l)
	s.mu.Unlock()
	return l
}

// Unlisten removes the listener; calling it twice is harmless.
func (h *Hub) Unlisten(l *Listener) {
	s := h.shard(l.waiterID)
	s.mu.Lock()
	defer s.mu.Unlock()
	ls := s.listeners[l.waiterID]
	for i, x := range ls {
		if x == l {
			ls = append(ls[:i], ls[i+1:]...)
			break
		}
	}
	if len(ls) == 0 {
		delete(s.listeners, l.waiterID)
	} else {
		s.listeners[l.waiterID] = ls
	}
}

// Publish wakes every listener of the waiter. The listeners are called
// outside the shard's lock, so one may Unlisten (or Listen) from its
// function.
func (h *Hub) Publish(waiterID string, w Wake) {
	s := h.shard(waiterID)
	var buf [4]*Listener
	s.mu.RLock()
	ls := append(buf[:0], s.listeners[waiterID]...)
	s.mu.RUnlock()
	for _, l := range ls {
		l.fn(w)
	}
}

// WaiterIDs returns the ids that have at least one listener, for the
// catch-up poll.
func (h *Hub) WaiterIDs() []string {
	var ids []string
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.RLock()
		for id := range s.listeners {
			ids = append(ids, id)
		}
		s.mu.RUnlock()
	}
	return ids
}

// Len is the number of waiters with listeners.
func (h *Hub) Len() int {
	n := 0
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.RLock()
		n += len(s.listeners)
		s.mu.RUnlock()
	}
	return n
}

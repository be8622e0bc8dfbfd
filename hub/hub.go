// Package hub knows which live subscriptions in this process listen for which
// waiter, and wakes them when a waiter ends. It carries wake-ups only: a lost
// wake-up costs latency, never a notification, because a woken (or polling)
// subscriber reads the waiter's end from the database, the only truth.
//
// The hub is sharded by waiter id so deliveries to different waiters do not
// contend on one lock; it never blocks a publisher on a slow subscriber.
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

// Listener hears the wakes of one waiter. One made by Listen receives at
// most one pending Wake at a time on C; a second wake before the first is
// read is dropped, which is harmless because either one sends the reader to
// the same final state. One made by ListenFunc has C nil: its function is
// called instead.
type Listener struct {
	C        chan Wake
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

// Listen registers a listener for the waiter. Call Unlisten when done.
func (h *Hub) Listen(waiterID string) *Listener {
	c := make(chan Wake, 1)
	l := &Listener{C: c, fn: func(w Wake) {
		select {
		case c <- w:
		default:
		}
	}, waiterID: waiterID}
	h.add(l)
	return l
}

// ListenFunc registers fn to be called with each wake of the waiter, on the
// publisher's goroutine: fn must not block (a subscription without a
// goroutine of its own hands real work to one). Call Unlisten when done.
func (h *Hub) ListenFunc(waiterID string, fn func(Wake)) *Listener {
	l := &Listener{fn: fn, waiterID: waiterID}
	h.add(l)
	return l
}

func (h *Hub) add(l *Listener) {
	waiterID := l.waiterID
	s := h.shard(waiterID)
	s.mu.Lock()
	s.listeners[waiterID] = append(s.listeners[waiterID], l)
	s.mu.Unlock()
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

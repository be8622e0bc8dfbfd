// Package engine owns Rendezvous' rules: trigger, notify (broadcast,
// targeted with lookback, as a durable step), waitForEvent, cancel, finishRun
// and timeouts. It draws every transaction boundary, decides every state
// change, and wakes live subscribers only after the change has committed.
//
// It must never hold a transaction open while talking to a client, never
// speak GraphQL, and never write SQL: storage does that.
package engine

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"rendezvous/hub"
	"rendezvous/models"
	"rendezvous/storage"
)

// Bus carries "these waiters ended" to the other replicas, whose hubs then
// wake their own listeners. Optional: without one, other replicas learn of
// ends from their catch-up poll.
type Bus interface {
	Publish(ctx context.Context, waiterIDs []string) error
}

// Engine applies the rules. Create it with New, then Start its background
// loops; Stop ends them.
type Engine struct {
	cfg   Config
	store storage.Store
	hub   *hub.Hub
	bus   Bus
	log   *slog.Logger
	rec   Recorder

	mu      sync.Mutex
	cancel  context.CancelFunc
	stopped chan struct{}

	// Waits in flight, from before registration until cleanup, so that
	// shutdown lets them remove their ephemeral waiters before the database
	// closes; once draining, new waits are refused.
	waitsMu  sync.Mutex
	waits    int
	draining bool
	drained  chan struct{} // closed when draining and waits reaches 0

	// replicaID owns this process's waiters without a step, under a lease
	// renewed while the process lives (see Config.LeaseTTL).
	replicaID  string
	leaseMu    sync.Mutex
	leaseUntil time.Time

	// releases removes the waiters without a step of ended subscriptions,
	// in batches (see release.go).
	releases releaseQueue
	// unreleased: waiters without a step whose subscription ended but
	// whose removal failed; the sweep loop retries them.
	unreleasedMu sync.Mutex
	unreleased   map[string]struct{}
	// groups commits concurrent targeted notifies together (notifygroup.go).
	groups notifyGroups
	// reads batches the reads of woken waits (see reads.go).
	readsMu sync.Mutex
	reads   waiterReads
	// clockOffset is the database's clock minus this machine's (with
	// ClockSkew), in nanoseconds; see clock.go.
	clockOffset atomic.Int64
	clockSynced atomic.Bool
	// healthySince is when lease renewals last started succeeding after a
	// failure; only the loop goroutine touches it.
	healthySince time.Time
}

// New returns an engine over the store. bus may be nil.
func New(store storage.Store, h *hub.Hub, bus Bus, cfg Config) *Engine {
	cfg = cfg.withDefaults()
	if w := cfg.Outbound.Written; w != nil {
		// A commit that ended a callback waiter made its callback due.
		store.OnOutboxDue(w)
	}
	return &Engine{cfg: cfg, store: store, hub: h, bus: bus, log: cfg.Logger, rec: cfg.Recorder, replicaID: newID("rep_")}
}

// Config returns the engine's effective configuration.
func (e *Engine) Config() Config { return e.cfg }

// Start runs the timeout sweeper, the lookback purge and the catch-up poll
// until Stop. Starting a started engine does nothing.
func (e *Engine) Start(ctx context.Context) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cancel != nil {
		return
	}
	ctx, e.cancel = context.WithCancel(context.WithoutCancel(ctx))
	e.stopped = make(chan struct{})
	go func() {
		defer close(e.stopped)
		e.runLoops(ctx)
	}()
}

// Stop ends the background loops, waits for them and gives up this
// replica's lease. A second Stop is harmless.
func (e *Engine) Stop() {
	e.mu.Lock()
	cancel, stopped := e.cancel, e.stopped
	e.cancel = nil
	e.mu.Unlock()
	if cancel != nil {
		cancel()
		<-stopped
	}
	e.leaseMu.Lock()
	held := !e.leaseUntil.IsZero()
	e.leaseUntil = time.Time{}
	e.leaseMu.Unlock()
	if held {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.store.ReplicaRelease(ctx, e.replicaID); err != nil {
			e.log.Warn("release replica lease", "err", err)
		}
	}
}

// holdLease makes sure this replica's lease has at least half its TTL left,
// before a waiter without a step is registered under it.
func (e *Engine) holdLease(ctx context.Context, force bool) error {
	e.leaseMu.Lock()
	defer e.leaseMu.Unlock()
	now := e.now()
	if !force && e.leaseUntil.Sub(now) > e.cfg.LeaseTTL/2 {
		return nil
	}
	until := now.Add(e.cfg.LeaseTTL)
	// Bounded: this holds leaseMu, which every registration of a waiter
	// without a step and the lease loop need; a connection the network
	// black-holed must not hold them all for good.
	bctx, cancel := context.WithTimeout(ctx, max(e.cfg.LeaseTTL/4, time.Second))
	defer cancel()
	if err := e.store.ReplicaRenew(bctx, e.replicaID, until); err != nil {
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			// Our bound, not the caller's: the database did not answer.
			err = fmt.Errorf("%w: %v", storage.ErrUnavailable, err)
		}
		return storageErr("renew replica lease", err)
	}
	e.leaseUntil = until
	return nil
}

// DrainWaits refuses new waits from now on and waits until every wait in
// flight has cleaned up after its context ended, or until ctx ends.
func (e *Engine) DrainWaits(ctx context.Context) error {
	e.waitsMu.Lock()
	if !e.draining {
		e.draining = true
		e.drained = make(chan struct{})
		if e.waits == 0 {
			close(e.drained)
		}
	}
	drained := e.drained
	e.waitsMu.Unlock()
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// beginWait counts a wait in; false once draining.
func (e *Engine) beginWait() bool {
	e.waitsMu.Lock()
	defer e.waitsMu.Unlock()
	if e.draining {
		return false
	}
	e.waits++
	return true
}

func (e *Engine) endWait() {
	e.waitsMu.Lock()
	defer e.waitsMu.Unlock()
	e.waits--
	if e.waits == 0 && e.draining {
		close(e.drained)
	}
}

// Ready reports whether the database answers.
func (e *Engine) Ready(ctx context.Context) error {
	return storageErr("ping database", e.store.Ping(ctx))
}

var idEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// newID returns prefix + 26 random base32 characters (128 bits).
func newID(prefix string) string {
	var b [16]byte
	rand.Read(b[:])
	return prefix + strings.ToLower(idEncoding.EncodeToString(b[:]))
}

// wake tells local listeners (with the result in hand) and other replicas
// (by id) that waiters ended. It runs after commit; a failure here costs
// latency only.
func (e *Engine) wake(ctx context.Context, wakes map[string]hub.Wake) {
	if len(wakes) == 0 {
		return
	}
	ids := make([]string, 0, len(wakes))
	for id, w := range wakes {
		e.hub.Publish(id, w)
		ids = append(ids, id)
	}
	if e.bus != nil {
		if err := e.bus.Publish(context.WithoutCancel(ctx), ids); err != nil {
			e.log.WarnContext(ctx, "publish waiter ends to other replicas", "waiters", len(ids), "err", err)
		}
	}
}

// effective applies the deadline: a waiter still WAITING at or past its
// deadline has timed out, whether or not the sweeper has written it yet.
// Every notify path refuses such a waiter, so this view never disagrees
// with what the database will say.
func effective(w *models.Waiter, now time.Time) *models.Waiter {
	if w.State == models.WaiterWaiting && !w.Deadline.After(now) {
		c := *w
		c.State = models.WaiterTimedOut
		d := w.Deadline
		c.EndedAt = &d
		return &c
	}
	return w
}

// wakeEnded is the wake-up for the listeners of a waiter this engine has
// just ended in state, at endedAt.
func wakeEnded(w *models.Waiter, state models.WaiterState, endedAt time.Time) hub.Wake {
	c := *w
	c.State = state
	res, err := resultOf(&c)
	return hub.Wake{Result: res, Err: err, EndedAt: endedAt}
}

// resultOf is what a subscriber of an ended waiter receives.
func resultOf(w *models.Waiter) (*models.WaitResult, error) {
	res := &models.WaitResult{
		EventID:       w.EventID,
		WaiterID:      w.ID,
		WorkflowRunID: w.WorkflowRunID,
		StepName:      w.StepName,
	}
	switch w.State {
	case models.WaiterNotified:
		res.EventData = w.EventData
		res.MessageID = w.MessageID
		res.NotifiedAt = w.EndedAt
		return res, nil
	case models.WaiterTimedOut:
		res.Timeout = true
		return res, nil
	case models.WaiterCanceled:
		run := ""
		if w.WorkflowRunID != nil {
			run = *w.WorkflowRunID
		}
		return nil, errorf(CodeRunNotActive, "workflow run %s ended before event %q arrived", run, w.EventID)
	}
	return nil, nil
}

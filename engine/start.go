// Starting runs on workers: runsToStart hands each run triggered without
// dispatch to one subscriber of its label at a time (competing consumers),
// under a lease, until a worker acks it (ackRun) or it ends. Who gets a run
// is decided in the database (storage's RunClaim, a compare and set with
// SKIP LOCKED where there is one), so two replicas never hand one run to
// two workers at once; wake-ups (local, and across replicas through the
// bus) only make workers look sooner, and a jittered poll finds what a lost
// wake-up or a lapsed lease left.

package engine

import (
	"context"
	"errors"
	"hash/fnv"
	"math/rand/v2"
	"strconv"
	"time"

	"rendezvous/hub"
	"rendezvous/models"
	"rendezvous/storage"
)

// Defaults and bounds of runsToStart.
const (
	DefaultStartLease = 60 * time.Second
	MaxStartLease     = time.Hour
	MinStartLease     = time.Second
	DefaultMaxUnacked = 1
	MaxMaxUnacked     = 100
	// startPoll is the longest a worker goes without looking (jittered):
	// for leases that lapsed and wake-ups that were lost.
	startPoll = time.Second
)

// CodeRunNotClaimed: ackRun on a run that is not held under a live
// hand-over (never handed over, lease passed, given back, or acked).
const CodeRunNotClaimed Code = "RUN_NOT_CLAIMED"

// StartParams are the arguments of runsToStart.
type StartParams struct {
	Label      *string
	Lease      *time.Duration
	MaxUnacked *int
}

// startWakeID is the hub id workers of a label listen on; it never looks
// like a waiter id (wtr_<n>) and has no spaces (the bus splits on them).
func startWakeID(label *string) string {
	h := fnv.New64a()
	if label == nil {
		h.Write([]byte{0})
	} else {
		h.Write([]byte{1})
		h.Write([]byte(*label))
	}
	return "rts_" + strconv.FormatUint(h.Sum64(), 36)
}

// wakeWorkers tells the label's workers, here and on other replicas, to
// look for runs. After commit only.
func (e *Engine) wakeWorkers(ctx context.Context, label *string) {
	e.wake(ctx, map[string]hub.Wake{startWakeID(label): {}})
}

// RunsToStart streams runs handed to this subscriber until ctx ends; then
// it gives back the runs it holds unacked, so the next worker gets them at
// once. Errors in the arguments come back before anything is streamed.
func (e *Engine) RunsToStart(ctx context.Context, p StartParams) (<-chan *models.WorkflowRun, error) {
	if p.Label != nil {
		if err := e.checkText("label", *p.Label, false); err != nil {
			return nil, err
		}
	}
	lease := DefaultStartLease
	if p.Lease != nil {
		if *p.Lease < MinStartLease || *p.Lease > MaxStartLease {
			return nil, errorf(CodeBadUserInput, "lease must be between %s and %s, got %s", MinStartLease, MaxStartLease, *p.Lease)
		}
		lease = *p.Lease
	}
	maxUnacked := DefaultMaxUnacked
	if p.MaxUnacked != nil {
		if *p.MaxUnacked < 1 || *p.MaxUnacked > MaxMaxUnacked {
			return nil, errorf(CodeBadUserInput, "maxUnacked must be between 1 and %d, got %d", MaxMaxUnacked, *p.MaxUnacked)
		}
		maxUnacked = *p.MaxUnacked
	}
	if !e.beginWait() {
		return nil, errorf(CodeUnavailable, "this replica is shutting down; subscribe again on another")
	}
	w := &worker{e: e, id: newID("wkr_"), label: p.Label, lease: lease, max: maxUnacked,
		out: make(chan *models.WorkflowRun), kick: make(chan struct{}, 1)}
	l := e.hub.Listen(startWakeID(p.Label), func(hub.Wake) { w.poke() })
	go func() {
		defer e.endWait()
		defer e.hub.Unlisten(l)
		defer close(w.out)
		w.run(ctx)
	}()
	return w.out, nil
}

type worker struct {
	e     *Engine
	id    string
	label *string
	lease time.Duration
	max   int
	out   chan *models.WorkflowRun
	kick  chan struct{}
}

func (w *worker) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *worker) run(ctx context.Context) {
	defer w.release()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
		case <-timer.C:
		}
		runs, err := w.claim(ctx)
		if err != nil {
			// Nothing was handed over: the claim did not (or may not
			// have) committed; its lease runs out if it did.
			if ctx.Err() == nil {
				w.e.log.Warn("hand runs to a worker", "worker", w.id, "err", err)
			}
			runs = nil
		}
		for _, r := range runs {
			w.e.log.Debug("run handed to a worker", "worker", w.id, "run", r.WorkflowRunID, "attempt", r.Attempts)
		}
		for _, r := range runs {
			select {
			case w.out <- r:
			case <-ctx.Done():
				return
			}
		}
		next := time.Duration(float64(startPoll) * (0.5 + rand.Float64()/2))
		if len(runs) > 0 {
			next = 0 // there may be more, if it has room
		}
		timer.Reset(next)
	}
}

// claim hands the worker as many of the oldest waiting runs as it has room
// for: maxUnacked less the runs it holds under a live, unacked claim.
func (w *worker) claim(ctx context.Context) ([]*models.WorkflowRun, error) {
	var runs []*models.WorkflowRun
	err := w.e.store.InTx(ctx, func(tx storage.Executor) error {
		now := w.e.now()
		held, err := tx.RunCountClaimed(ctx, w.id, now)
		if err != nil {
			return err
		}
		runs = nil
		if room := w.max - int(held); room > 0 {
			runs, err = tx.RunClaim(ctx, &storage.RunClaimParams{Label: w.label, Worker: w.id, Now: now, LeaseUntil: now.Add(w.lease), Limit: room})
		}
		return err
	})
	return runs, storageErr("hand runs to worker "+w.id, err)
}

// release gives back the runs the worker holds unacked, after its
// subscription ended. If this fails (the database is away), their leases
// run out instead.
func (w *worker) release() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var n int64
	err := w.e.store.InTx(ctx, func(tx storage.Executor) error {
		var err error
		n, err = tx.RunReleaseClaims(ctx, w.id)
		return err
	})
	if err != nil {
		w.e.log.Warn("give back a gone worker's runs (their leases will run out instead)", "worker", w.id, "err", err)
		return
	}
	if n > 0 {
		w.e.log.Debug("runs given back by a worker whose subscription ended", "worker", w.id, "runs", n)
		w.e.wakeWorkers(ctx, w.label)
	}
}

// AckRun ends a run's hand-over: the worker holding it under a live lease
// owns it, and it is never handed to anyone else. With attempt, only the
// hand-over runsToStart numbered so: the ack of a worker whose lease passed
// cannot take the run from the worker it went to next.
func (e *Engine) AckRun(ctx context.Context, rawID string, attempt *int) (*models.WorkflowRun, error) {
	id, err := e.normalizeRunID(rawID)
	if err != nil {
		return nil, err
	}
	if attempt != nil && *attempt < 1 {
		return nil, errorf(CodeBadUserInput, "attempt must be at least 1, got %d", *attempt)
	}
	// In a transaction of InTx, for its retry: the ack's UPDATE and a
	// concurrent claim (which locks the runs index first, then the rows)
	// can deadlock on MySQL.
	var ok bool
	err = e.store.InTx(ctx, func(tx storage.Executor) error {
		var err error
		ok, err = tx.RunAck(ctx, id, e.now(), attempt)
		return err
	})
	if err != nil {
		return nil, storageErr("ack run "+id, err)
	}
	run, err := e.store.RunGet(ctx, id, false)
	if err != nil {
		if errors.Is(err, storage.ErrNotFound) {
			return nil, errorf(CodeNotFound, "workflow run %s not found", id)
		}
		return nil, storageErr("ack run "+id, err)
	}
	if !ok {
		switch {
		case run.State != models.RunStarted:
			return nil, errorf(CodeRunNotActive, "workflow run %s is %s", id, run.State)
		case run.AckedAt != nil:
			return nil, errorf(CodeRunNotClaimed, "workflow run %s was already acked", id)
		case attempt != nil && *attempt != run.Attempts:
			return nil, errorf(CodeRunNotClaimed, "workflow run %s: hand-over %d is over (its lease passed or it was given back); the run went to another worker (hand-over %d)", id, *attempt, run.Attempts)
		default:
			return nil, errorf(CodeRunNotClaimed, "workflow run %s is not held under a live hand-over: its lease passed or it was given back, and it goes (or went) to another worker", id)
		}
	}
	// The acking worker has room again.
	e.wakeWorkers(ctx, run.Label)
	return run, nil
}

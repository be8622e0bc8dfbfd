package engine

import "time"

// Recorder hears what the engine did, for metrics. It is called after the
// change committed (never for a transaction attempt that was rolled back),
// from any goroutine; its methods must be cheap and must not block.
type Recorder interface {
	// RunTriggered: a trigger returned a run, new (created) or existing.
	RunTriggered(created bool)
	// NotifyDone: one notify call ended, after d.
	NotifyDone(kind NotifyKind, result NotifyOutcome, d time.Duration)
	// WaitersEnded: n waiters left WAITING this way.
	WaitersEnded(outcome WaiterOutcome, n int)
	// LookbackEvents: n lookback events went through this step of their life.
	LookbackEvents(event LookbackStep, n int)
	// Backlog is sampled from the database every Config.GaugeInterval:
	// waiters WAITING (deadline not passed) and lookback events pending.
	Backlog(waiting, pendingLookbackEvents int64)
}

// NotifyKind is what a notify addressed.
type NotifyKind string

const (
	NotifyBroadcast NotifyKind = "broadcast" // no workflowRunId
	NotifyTargeted  NotifyKind = "targeted"  // workflowRunId
	NotifyStep      NotifyKind = "step"      // with a step, targeted or not
	// NotifyCompletionURL: a POST to a waiter's completion URL (outcome
	// "none" when the waiter had already ended).
	NotifyCompletionURL NotifyKind = "completion_url"
)

// NotifyOutcome is what a notify call did.
type NotifyOutcome string

const (
	NotifyResolved     NotifyOutcome = "resolved"     // it notified one waiter or more
	NotifyLookback     NotifyOutcome = "lookback"     // it stored a lookback event
	NotifyNone         NotifyOutcome = "none"         // a broadcast nobody was waiting for
	NotifyDeduplicated NotifyOutcome = "deduplicated" // a repeated step: nothing done
	NotifyError        NotifyOutcome = "error"        // it failed (the error's code is counted by the GraphQL layer)
)

// WaiterOutcome is how a waiter left WAITING.
type WaiterOutcome string

const (
	WaiterNotified WaiterOutcome = "notified"
	WaiterTimedOut WaiterOutcome = "timed_out"
	WaiterCanceled WaiterOutcome = "canceled"
	// WaiterRemoved: a waiter without a step deleted while WAITING, because
	// its subscriber left or its replica died.
	WaiterRemoved WaiterOutcome = "removed"
)

// LookbackStep is a step in the life of a lookback event.
type LookbackStep string

const (
	LookbackStored   LookbackStep = "stored"   // a targeted notify found no waiter
	LookbackConsumed LookbackStep = "consumed" // a waitForEvent received it
	LookbackExpired  LookbackStep = "expired"  // purged after the retention, never consumed
	LookbackDropped  LookbackStep = "dropped"  // its run ended first
)

// NopRecorder records nothing.
type NopRecorder struct{}

var _ Recorder = NopRecorder{}

func (NopRecorder) RunTriggered(bool)                                   {}
func (NopRecorder) NotifyDone(NotifyKind, NotifyOutcome, time.Duration) {}
func (NopRecorder) WaitersEnded(WaiterOutcome, int)                     {}
func (NopRecorder) LookbackEvents(LookbackStep, int)                    {}
func (NopRecorder) Backlog(int64, int64)                                {}

// tally counts, within one transaction attempt, what the attempt changed;
// it is handed to the recorder once the attempt committed.
type tally struct {
	notified, timedOut, canceled, removed int
	stored, consumed, dropped, expired    int
}

func (e *Engine) record(t tally) {
	r := e.rec
	for _, c := range []struct {
		o WaiterOutcome
		n int
	}{{WaiterNotified, t.notified}, {WaiterTimedOut, t.timedOut}, {WaiterCanceled, t.canceled}, {WaiterRemoved, t.removed}} {
		if c.n > 0 {
			r.WaitersEnded(c.o, c.n)
		}
	}
	for _, c := range []struct {
		s LookbackStep
		n int
	}{{LookbackStored, t.stored}, {LookbackConsumed, t.consumed}, {LookbackDropped, t.dropped}, {LookbackExpired, t.expired}} {
		if c.n > 0 {
			r.LookbackEvents(c.s, c.n)
		}
	}
}

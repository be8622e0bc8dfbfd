// Package models holds the data shapes Rendezvous talks about: runs, waiters,
// lookback events, steps and the results of its operations. The GraphQL layer
// binds to these types and the engine returns them; they carry no behaviour
// beyond naming their enum values, and nothing here touches a database.
package models

import (
	"encoding/json"
	"time"
)

// WorkflowRun is one execution of a workflow, created by trigger.
type WorkflowRun struct {
	WorkflowRunID string
	State         RunState
	Body          json.RawMessage // nil: no body
	Label         *string
	Result        json.RawMessage // nil: no result
	CreatedAt     time.Time
	UpdatedAt     time.Time

	// Hand-over to runsToStart workers: when a worker was last handed the
	// run, when one acked it, and how many hand-overs there were.
	ClaimedAt *time.Time
	AckedAt   *time.Time
	Attempts  int
	// StartPending: the run waits to be acked by a runsToStart worker (it
	// was triggered without dispatch, is started and nobody acked it yet).
	StartPending bool
}

// Waiter is one pending or ended waitForEvent.
type Waiter struct {
	ID            string
	EventID       string
	WorkflowRunID *string
	StepName      *string
	State         WaiterState
	Deadline      time.Time
	CreatedAt     time.Time

	// Owner is the replica whose live subscription a waiter without a step
	// belongs to; "" for durable waiters. Only live owners' waiters count.
	Owner string

	// How it ended; zero while WAITING.
	EndedAt   *time.Time
	MessageID *string         // the notification that resolved it (NOTIFIED only)
	EventData json.RawMessage // the data it was resolved with (NOTIFIED only)
}

// LookbackEvent is a targeted notification stored because its run had no
// waiter on the event id; the run's next waitForEvent on it consumes it.
type LookbackEvent struct {
	ID            string
	WorkflowRunID string
	EventID       string
	EventData     json.RawMessage
	MessageID     string
	CreatedAt     time.Time
	ExpiresAt     time.Time
}

// Step is a named, durable action of a run.
type Step struct {
	StepName    string
	Type        StepType
	EventID     string
	CreatedAt   time.Time
	CompletedAt *time.Time
}

// TriggerResult is what trigger returns.
type TriggerResult struct {
	WorkflowRunID string
	Created       bool
	Run           *WorkflowRun
}

// RunToken is a signed token that allows waitForEvent and workflowRun on one run.
type RunToken struct {
	Token     string
	ExpiresAt time.Time
}

// NotifyResult is what notify returns.
type NotifyResult struct {
	EventID        string
	EventData      json.RawMessage
	NotifyResponse []*NotifyResponse
	Lookback       *LookbackEvent
	// Deduplicated: this call repeated a notify step and notified nobody;
	// the result is the first call's.
	Deduplicated bool
}

// NotifyResponse describes one waiter resolved by a notify.
type NotifyResponse struct {
	Waiter        *Waiter
	MessageID     string
	WorkflowRunID *string
	Deduplicated  bool
	Error         *string
}

// WaitResult is the single message a waitForEvent subscriber receives.
type WaitResult struct {
	EventID       string
	EventData     json.RawMessage
	Timeout       bool
	WaiterID      string
	WorkflowRunID *string
	StepName      *string
	MessageID     *string
	NotifiedAt    *time.Time
}

// WorkflowRunConnection is one page of runs.
type WorkflowRunConnection struct {
	Nodes    []*WorkflowRun
	PageInfo *PageInfo
}

// PageInfo tells whether more pages follow and where the next one starts.
type PageInfo struct {
	HasNextPage bool
	EndCursor   *string
}

// StepRef names a step of the notifying run.
type StepRef struct {
	WorkflowRunID string
	StepName      string
}

// Stats is the operator's view of the database: runs and waiters by state,
// lookback events waiting to be consumed, and the nearest deadline.
type Stats struct {
	Runs                  *RunStats
	Waiters               *WaiterStats
	PendingLookbackEvents int
	Outbox                *OutboxStats
	// OldestWaitingDeadline is the earliest deadline of a waiter still
	// WAITING; nil when none is.
	OldestWaitingDeadline *time.Time
}

// RunStats counts runs by state.
type RunStats struct {
	Started, Success, Failed, Canceled int
}

// WaiterStats counts waiters by state; a waiter WAITING past its deadline
// counts as timed out.
type WaiterStats struct {
	Waiting, Notified, TimedOut, Canceled int
}

// DispatchInput asks trigger to POST the run to a URL.
type DispatchInput struct {
	URL     string
	Headers json.RawMessage // a JSON object of strings; nil: none
	Retries *int
	Delay   *time.Duration
}

// CallbackInput asks waitForEventCallback to POST the waiter's result to a
// URL when it ends.
type CallbackInput struct {
	URL     string
	Headers json.RawMessage // a JSON object of strings; nil: none
	Retries *int
}

// Dispatch is where a run's HTTP delivery stands.
type Dispatch struct {
	State         DispatchState
	URL           string
	Attempts      int
	LastStatus    *int
	LastError     *string
	NextAttemptAt *time.Time
	DeliveredAt   *time.Time
}

// OutboxStats counts HTTP deliveries by state.
type OutboxStats struct {
	Pending, Delivered, Failed, Canceled int
}

package models

import (
	"fmt"
	"io"
	"strconv"

	"github.com/vektah/gqlparser/v2/gqlerror"
)

// RunState is the lifecycle state of a run. Only RUN_STARTED is active.
type RunState string

const (
	RunStarted  RunState = "RUN_STARTED"
	RunSuccess  RunState = "RUN_SUCCESS"
	RunFailed   RunState = "RUN_FAILED"
	RunCanceled RunState = "RUN_CANCELED"
)

func (s RunState) IsValid() bool {
	switch s {
	case RunStarted, RunSuccess, RunFailed, RunCanceled:
		return true
	}
	return false
}

// WaiterState is WAITING until the waiter ends, exactly once, in one of the
// other three states.
type WaiterState string

const (
	WaiterWaiting  WaiterState = "WAITING"
	WaiterNotified WaiterState = "NOTIFIED"
	WaiterTimedOut WaiterState = "TIMED_OUT"
	WaiterCanceled WaiterState = "CANCELED"
)

func (s WaiterState) IsValid() bool {
	switch s {
	case WaiterWaiting, WaiterNotified, WaiterTimedOut, WaiterCanceled:
		return true
	}
	return false
}

// StepType says what a durable step does.
type StepType string

const (
	StepWaitForEvent StepType = "WAIT_FOR_EVENT"
	StepNotify       StepType = "NOTIFY"
)

func (s StepType) IsValid() bool { return s == StepWaitForEvent || s == StepNotify }

// The GraphQL enum (un)marshalers below are the only GraphQL-facing methods
// here: gqlgen requires them on types it binds enums to.

func (s *RunState) UnmarshalGQL(v any) error {
	return unmarshalEnum(v, "RunState", (*string)(s), func() bool { return s.IsValid() })
}
func (s RunState) MarshalGQL(w io.Writer) { io.WriteString(w, strconv.Quote(string(s))) }

func (s *WaiterState) UnmarshalGQL(v any) error {
	return unmarshalEnum(v, "WaiterState", (*string)(s), func() bool { return s.IsValid() })
}
func (s WaiterState) MarshalGQL(w io.Writer) { io.WriteString(w, strconv.Quote(string(s))) }

func (s *StepType) UnmarshalGQL(v any) error {
	return unmarshalEnum(v, "StepType", (*string)(s), func() bool { return s.IsValid() })
}
func (s StepType) MarshalGQL(w io.Writer) { io.WriteString(w, strconv.Quote(string(s))) }

// unmarshalEnum rejects values that are not exactly one of the enum's names
// (gqlparser lets variables through case-insensitively) as bad user input.
func unmarshalEnum(v any, name string, dst *string, valid func() bool) error {
	str, ok := v.(string)
	if ok {
		*dst = str
	}
	if !ok || !valid() {
		return &gqlerror.Error{
			Message:    fmt.Sprintf("%v is not a valid %s", v, name),
			Extensions: map[string]any{"code": "BAD_USER_INPUT"},
		}
	}
	return nil
}

// DispatchState is where an HTTP delivery stands: PENDING until it is
// DELIVERED (a 2xx), FAILED (retries used up, or refused) or CANCELED (its
// run ended first).
type DispatchState string

const (
	DispatchPending   DispatchState = "PENDING"
	DispatchDelivered DispatchState = "DELIVERED"
	DispatchFailed    DispatchState = "FAILED"
	DispatchCanceled  DispatchState = "CANCELED"
)

func (s DispatchState) IsValid() bool {
	switch s {
	case DispatchPending, DispatchDelivered, DispatchFailed, DispatchCanceled:
		return true
	}
	return false
}

func (s *DispatchState) UnmarshalGQL(v any) error {
	return unmarshalEnum(v, "DispatchState", (*string)(s), func() bool { return s.IsValid() })
}
func (s DispatchState) MarshalGQL(w io.Writer) { io.WriteString(w, strconv.Quote(string(s))) }

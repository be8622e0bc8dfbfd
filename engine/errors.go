package engine

import (
	"errors"
	"fmt"

	"rendezvous/storage"
)

// Code classifies an error for the caller; the GraphQL layer puts it in
// extensions.code.
type Code string

const (
	CodeBadUserInput    Code = "BAD_USER_INPUT"
	CodeNotFound        Code = "NOT_FOUND"
	CodeRunNotActive    Code = "RUN_NOT_ACTIVE"
	CodePayloadTooLarge Code = "PAYLOAD_TOO_LARGE"
	// CodeUnavailable: the database could not be reached or stayed
	// contended; nothing was done, try again.
	CodeUnavailable Code = "SERVICE_UNAVAILABLE"
	// CodeOutcomeUnknown: the connection failed while committing, so the
	// change may or may not have been made. A notify with a step can be
	// repeated safely; read the run to find out otherwise.
	CodeOutcomeUnknown Code = "OUTCOME_UNKNOWN"
	// CodeWaiterLost: a subscription's waiter was removed because its
	// server's lease ran out (cut off from the database, or too busy to
	// renew it; see errWaiterLost); it received nothing. Subscribe again.
	CodeWaiterLost Code = "WAITER_LOST"
)

// Error is an error the engine made on purpose: its message is meant for the
// caller. Anything else that comes out of the engine is internal.
type Error struct {
	Code    Code
	Message string
	cause   error // for the log only, never shown to the caller
}

func (e *Error) Error() string { return e.Message }

// Unwrap exposes the cause to errors.Is and to the log.
func (e *Error) Unwrap() error { return e.cause }

func errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// ErrorCode returns the code of an engine error in err's chain, or "".
func ErrorCode(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// storageErr keeps an engine error as it is, turns an unreachable or
// contended database into a retryable CodeUnavailable (keeping the cause for
// the log), and wraps anything else with context as internal.
func storageErr(op string, err error) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	if errors.Is(err, storage.ErrCommitUnknown) {
		return &Error{Code: CodeOutcomeUnknown, Message: "the database connection failed while committing: the change may or may not have been made", cause: fmt.Errorf("%s: %w", op, err)}
	}
	if errors.Is(err, storage.ErrUnavailable) {
		return &Error{Code: CodeUnavailable, Message: "the database is unavailable; try again", cause: fmt.Errorf("%s: %w", op, err)}
	}
	return fmt.Errorf("%s: %w", op, err)
}

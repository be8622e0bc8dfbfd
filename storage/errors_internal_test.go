package storage

import (
	"errors"
	"testing"

	mysqldriver "github.com/go-sql-driver/mysql"
)

// A Galera node that is not ready (cut off from the primary component, or
// rejoining) answers 1047 to every statement: the database is unavailable,
// not an internal error.
func TestClassifyGaleraNotReady(t *testing.T) {
	err := classify(&mysqldriver.MySQLError{Number: 1047, SQLState: [5]byte{'0', '8', 'S', '0', '1'}, Message: "WSREP has not yet prepared node for application use"})
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("1047: %v, want ErrUnavailable", err)
	}
	// At COMMIT it may have been certified before the node dropped out:
	// the outcome is unknown, never a definite failure.
	if err := (&gormStore{gormExecutor: gormExecutor{obs: nopObserver{}}}).commitErr(&mysqldriver.MySQLError{Number: 1047}); !errors.Is(err, ErrCommitUnknown) {
		t.Fatalf("1047 at COMMIT: %v, want ErrCommitUnknown", err)
	}
	// A certification failure at COMMIT is 1213: rolled back, run again.
	if err := (&gormStore{gormExecutor: gormExecutor{obs: nopObserver{}}}).commitErr(&mysqldriver.MySQLError{Number: 1213}); !errors.Is(err, errRetryable) {
		t.Fatalf("1213 at COMMIT: %v, want a retryable conflict", err)
	}
}

package storage

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"syscall"
	"time"

	sqlite "github.com/glebarez/go-sqlite"
	mysqldriver "github.com/go-sql-driver/mysql"
)

// MySQL error numbers we act on.
const (
	mysqlDuplicateEntry  = 1062
	mysqlLockWaitTimeout = 1205 // only the statement was rolled back
	mysqlDeadlock        = 1213 // the whole transaction was rolled back
	// Galera's "WSREP has not yet prepared node for application use"
	// (ER_UNKNOWN_COM_ERROR): the node is not in the primary component or
	// not yet synced (a node cut off from the cluster, or rejoining). The
	// statement did not run; the node will answer again by itself.
	mysqlWsrepNotReady = 1047
)

// errRetryable marks an error after which the whole transaction may run again.
var errRetryable = errors.New("retryable conflict")

// Causes of the database trouble an Observer hears about.
const (
	// CauseDeadlock: MySQL rolled the transaction back (1213); it runs again.
	CauseDeadlock = "deadlock"
	// CauseLockWait: a statement gave up waiting for a row lock (1205); the
	// transaction is rolled back and runs again.
	CauseLockWait = "lock_wait"
	// CauseBusy: SQLite's database was busy or locked; the transaction runs again.
	CauseBusy = "busy"
	// CauseConnection: a statement failed because the database could not
	// be reached; the caller (or its client) tries again.
	CauseConnection = "connection"
)

// conflict is a retryable error that remembers its cause.
type conflict struct{ cause string }

func (c conflict) Error() string { return errRetryable.Error() }

// Is makes every conflict an errRetryable.
func (c conflict) Is(target error) bool { return target == errRetryable }

// conflictCause returns the cause of a retryable error, or "".
func conflictCause(err error) string {
	var c conflict
	if errors.As(err, &c) {
		return c.cause
	}
	return ""
}

// classify translates driver errors into this package's sentinels at the
// edge, so callers compare with errors.Is and never see driver types.
func classify(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var me *mysqldriver.MySQLError
	if errors.As(err, &me) {
		switch me.Number {
		case mysqlDuplicateEntry:
			return fmt.Errorf("%w: %v", ErrDuplicate, err)
		case mysqlDeadlock:
			return fmt.Errorf("%w: %v", conflict{CauseDeadlock}, err)
		case mysqlLockWaitTimeout:
			return fmt.Errorf("%w: %v", conflict{CauseLockWait}, err)
		case mysqlWsrepNotReady:
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		return err
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff { // the primary result code
		case sqliteBusy, sqliteLocked:
			return fmt.Errorf("%w: %v", conflict{CauseBusy}, err)
		case sqliteConstraint:
			if se.Code() == sqliteConstraintUnique || se.Code() == sqliteConstraintPrimaryKey {
				return fmt.Errorf("%w: %v", ErrDuplicate, err)
			}
		}
		return err
	}
	var netErr net.Error
	if errors.Is(err, driver.ErrBadConn) || errors.Is(err, mysqldriver.ErrInvalidConn) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &netErr) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, sql.ErrConnDone) || err.Error() == "sql: database is closed" {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return err
}

// SQLite result codes (sqlite3.h).
const (
	sqliteBusy                 = 5
	sqliteLocked               = 6
	sqliteConstraint           = 19
	sqliteConstraintPrimaryKey = 1555
	sqliteConstraintUnique     = 2067
)

// backoff waits before attempt n+1 (n from 1): exponential from 5ms, capped
// at 250ms, with full jitter so that two transactions that deadlocked each
// other do not collide again in lock step.
func backoff(ctx context.Context, n int) error {
	ceiling := 5 * time.Millisecond << min(n, 6)
	if ceiling > 250*time.Millisecond {
		ceiling = 250 * time.Millisecond
	}
	t := time.NewTimer(time.Duration(rand.Int64N(int64(ceiling)) + int64(time.Millisecond)))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

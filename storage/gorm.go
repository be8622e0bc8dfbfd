package storage

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"
)

// chunkSize bounds the ids in one IN (…) list.
const chunkSize = 1000

// txTimeout bounds one attempt of a transaction of InTx.
const txTimeout = 30 * time.Second

type gormStore struct {
	gormExecutor
	sqlDB *sql.DB
	// lease is the database through a pool of its own, one connection,
	// for the statements that keep this replica's lease: reading the
	// database's clock and renewing the lease (DBNow, ReplicaRenew). On
	// the shared pool they waited for a connection behind every queued
	// request: seconds while tens of thousands of subscriptions
	// registered at once, and when a renewal waits past its bound for
	// the whole lease, other replicas take this live one for dead and
	// remove its waiters. nil on SQLite (one connection in all, one
	// replica per file).
	lease       *gormExecutor
	maxAttempts int
	log         *slog.Logger
	// outboxDue is OnOutboxDue's hook.
	outboxDue atomic.Pointer[func()]
}

// txNotes is what one attempt of a transaction noted for after its commit.
type txNotes struct {
	outboxDue bool // an outbox row was made due
}

func (s *gormStore) OnOutboxDue(f func()) { s.outboxDue.Store(&f) }

// WaiterEnd on the store (outside a transaction) runs in one of its own
// unless the caller vouched that no waiter has a callback: a callback is
// made due in the same transaction as its waiter's end, whoever calls.
func (s *gormStore) WaiterEnd(ctx context.Context, p *WaiterEndParams) ([]string, error) {
	if p.NoCallbacks {
		return s.gormExecutor.WaiterEnd(ctx, p)
	}
	var ended []string
	err := s.InTx(ctx, func(tx Executor) error {
		var err error
		ended, err = tx.WaiterEnd(ctx, p)
		return err
	})
	return ended, err
}

var _ Store = (*gormStore)(nil)

// gormExecutor runs the queries on a pool or inside a transaction; the same
// code serves both.
type gormExecutor struct {
	db      *gorm.DB
	dialect string
	obs     Observer
	// returning: the server knows INSERT … RETURNING (MariaDB ≥ 10.5).
	returning bool
	// txCtx is the context of the transaction attempt this executor
	// runs in; nil on the pool.
	txCtx context.Context
	// pool and maxIdle, to drop idle connections (see classify).
	pool    *sql.DB
	maxIdle int
	// galera: the server is a Galera node (wsrep_on). A COMMIT is then
	// never sent along with an INSERT (see LookbackEventInsertCommit).
	galera bool
	// notes: inside a transaction, what to do after its commit; nil on the pool.
	notes *txNotes
}

// classify classifies a driver error (see the package function) and tells
// the observer when the database could not be reached.
//
// A statement that failed for want of the database, or ran out of time,
// may have been on a connection that the network black-holed: no reset,
// no answer. The pool's idle connections most likely went the same way,
// and the pool cannot tell (each looks open), so each would cost the next
// caller a whole timeout. They are dropped; new ones are dialed on demand.
func (e *gormExecutor) classify(err error) error {
	c := classify(err)
	if c == nil {
		return nil
	}
	if errors.Is(c, ErrUnavailable) {
		e.obs.DBRetry(CauseConnection)
	}
	if e.pool != nil && e.dialect == DialectMySQL && (errors.Is(c, ErrUnavailable) || errors.Is(c, context.DeadlineExceeded)) {
		e.pool.SetMaxIdleConns(0)
		e.pool.SetMaxIdleConns(e.maxIdle)
	}
	return c
}

func (s *gormStore) Dialect() string { return s.dialect }

func (s *gormStore) Ping(ctx context.Context) error { return s.classify(s.sqlDB.PingContext(ctx)) }

func (s *gormStore) DBNow(ctx context.Context) (time.Time, error) {
	if s.dialect != DialectMySQL {
		// SQLite runs inside this process: its clock is this machine's,
		// which time.Now reads with more precision than SQLite's
		// milliseconds. (Processes sharing a SQLite file share a machine.)
		return time.Now().UTC(), nil
	}
	ex := &s.gormExecutor
	if s.lease != nil {
		ex = s.lease
	}
	var now time.Time
	if err := ex.pool.QueryRowContext(ctx, "SELECT UTC_TIMESTAMP(6)").Scan(&now); err != nil {
		return time.Time{}, ex.classify(err)
	}
	return now.UTC(), nil
}

// ReplicaRenew renews the lease through the lease's own pool (see lease).
func (s *gormStore) ReplicaRenew(ctx context.Context, replicaID string, leaseUntil time.Time) error {
	if s.lease != nil {
		return s.lease.ReplicaRenew(ctx, replicaID, leaseUntil)
	}
	return s.gormExecutor.ReplicaRenew(ctx, replicaID, leaseUntil)
}

func (s *gormStore) Close() error {
	err := s.sqlDB.Close()
	if s.lease != nil {
		err = errors.Join(err, s.lease.pool.Close())
	}
	return err
}

func (s *gormStore) InTx(ctx context.Context, fn func(tx Executor) error) error {
	for attempt := 1; ; attempt++ {
		err := s.runTx(ctx, fn)
		if err == nil || !errors.Is(err, errRetryable) {
			return err
		}
		if attempt >= s.maxAttempts {
			return fmt.Errorf("%w: transaction gave up after %d attempts: %v", ErrUnavailable, attempt, err)
		}
		s.obs.DBRetry(conflictCause(err))
		s.log.DebugContext(ctx, "transaction conflict, retrying", "attempt", attempt, "err", err)
		if err := backoff(ctx, attempt); err != nil {
			return err
		}
	}
}

// runTx runs fn once in a transaction. fn's error is returned as it is: the
// executor classified driver errors at the edge, and anything else (an
// engine error naming caller-chosen ids) must not be mistaken for one. A
// failed COMMIT is ErrCommitUnknown: the write may have landed.
func (s *gormStore) runTx(ctx context.Context, fn func(tx Executor) error) (err error) {
	tx, err := s.begin(ctx)
	if err != nil {
		return s.classify(err)
	}
	var stmtCtx context.Context
	if s.dialect == DialectMySQL {
		// The statements are bounded whatever the caller's context says
		// (waiting for a connection of the pool, above, is not): one on a
		// connection the network black-holed would wait for good (see
		// classify), holding a request or a subscription's registration.
		// (SQLite runs in this process: no network to lose.)
		var cancel context.CancelFunc
		stmtCtx, cancel = context.WithTimeout(ctx, txTimeout)
		defer cancel()
		defer func() {
			if err != nil && errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				err = fmt.Errorf("%w: the transaction took longer than %s: %v", ErrUnavailable, txTimeout, err)
			}
		}()
	}
	defer func() {
		if p := recover(); p != nil {
			tx.Rollback()
			panic(p)
		}
	}()
	notes := &txNotes{}
	if err := fn(&gormExecutor{db: tx, dialect: s.dialect, obs: s.obs, returning: s.returning, pool: s.pool, maxIdle: s.maxIdle, txCtx: stmtCtx, galera: s.galera, notes: notes}); err != nil {
		tx.Rollback()
		var cf commitFailed
		if errors.As(err, &cf) {
			return s.commitErr(cf.err) // LookbackEventInsertCommit's COMMIT
		}
		if pool, ok := tx.Statement.ConnPool.(*lazyTx); ok && pool.committed {
			return fmt.Errorf("%w: bug: the transaction committed with LookbackEventInsertCommit, then failed: %v", ErrCommitUnknown, err)
		}
		return err
	}
	if err := tx.Commit().Error; err != nil {
		return s.commitErr(err)
	}
	if f := s.outboxDue.Load(); notes.outboxDue && f != nil && *f != nil {
		(*f)()
	}
	return nil
}

// commitErr is what a failed COMMIT means: a deadlock reported at commit
// rolled the transaction back and it may run again; anything else leaves
// its outcome unknown.
func (s *gormStore) commitErr(err error) error {
	c := classify(err)
	if errors.Is(c, errRetryable) {
		return c
	}
	if errors.Is(c, ErrUnavailable) {
		s.obs.DBRetry(CauseConnection)
	}
	return fmt.Errorf("%w: %v", ErrCommitUnknown, err)
}

// begin starts a transaction. On MySQL nothing is sent yet: START
// TRANSACTION goes with the first statement (lazyTx). SQLite's BEGIN costs
// no round trip.
func (s *gormStore) begin(ctx context.Context) (*gorm.DB, error) {
	if s.dialect != DialectMySQL {
		tx := s.db.WithContext(ctx).Begin()
		return tx, tx.Error
	}
	pool, err := beginLazy(ctx, s.sqlDB)
	if err != nil {
		return nil, err
	}
	// What Begin does, with lazyTx in place of a *sql.Tx.
	tx := s.db.Session(&gorm.Session{Context: ctx, NewDB: true})
	tx.Statement.ConnPool = pool
	return tx, nil
}

// q starts a statement. Inside a transaction it runs on the transaction's
// context: the one InTx was given, bounded per attempt by txTimeout.
func (e *gormExecutor) q(ctx context.Context) *gorm.DB {
	if e.txCtx != nil {
		if err := ctx.Err(); err == nil {
			ctx = e.txCtx
		}
	}
	return e.db.WithContext(ctx)
}

// lock adds FOR UPDATE on MySQL. SQLite has no row locks: its single
// connection already makes transactions serial.
func (e *gormExecutor) lock(q *gorm.DB, forUpdate bool) *gorm.DB {
	if forUpdate && e.dialect == DialectMySQL {
		return q.Clauses(clause.Locking{Strength: "UPDATE"})
	}
	return q
}

func (e *gormExecutor) notFound(err error) error {
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return ErrNotFound
	}
	return e.classify(err)
}

// chunks yields s in pieces of at most chunkSize.
func chunks[T any](s []T) func(yield func([]T) bool) {
	return func(yield func([]T) bool) {
		for len(s) > 0 {
			n := min(len(s), chunkSize)
			if !yield(s[:n]) {
				return
			}
			s = s[n:]
		}
	}
}

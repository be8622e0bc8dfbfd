// Package storage is the only place that knows how Rendezvous keeps its
// state: the tables, their indexes, the SQL dialects (MySQL/MariaDB and the
// embedded SQLite), row locking, and how driver errors are classified and
// retried. The engine calls the Executor methods inside a transaction opened
// with Store.InTx; it never sees SQL.
//
// This package must never decide a business rule (who may be notified, when a
// waiter ends): it stores and compare-and-sets what the engine tells it.
package storage

import (
	"context"
	"errors"
	"time"

	"rendezvous/models"
)

// ErrNotFound is returned when a row looked up by its key does not exist.
var ErrNotFound = errors.New("not found")

// ErrDuplicate is returned when an insert hits a unique key.
var ErrDuplicate = errors.New("duplicate key")

// ErrUnavailable wraps errors that mean the database could not be reached or
// gave up under contention; nothing was written, the caller may try again.
var ErrUnavailable = errors.New("database unavailable")

// ErrCommitUnknown: the connection failed during COMMIT, so the transaction
// may or may not have landed.
var ErrCommitUnknown = errors.New("commit outcome unknown")

// ErrNotStarted: RunEnd found the run no longer started (the caller should
// hold the run's lock, so this means a bug, not a race).
var ErrNotStarted = errors.New("run is not started")

// Observer hears about the database trouble the store deals with itself, for
// metrics: every rerun of a transaction after a conflict (CauseDeadlock,
// CauseLockWait, CauseBusy) and every statement that failed because the
// database could not be reached (CauseConnection). It must not block.
type Observer interface {
	DBRetry(cause string)
}

type nopObserver struct{}

func (nopObserver) DBRetry(string) {}

// Store is a database holding Rendezvous' tables.
type Store interface {
	Executor
	// InTx runs fn in one transaction and commits if fn returns nil. A
	// deadlock or lock-wait timeout restarts the whole transaction (fn runs
	// again, so it must not keep state across attempts) a bounded number of
	// times with jittered backoff.
	InTx(ctx context.Context, fn func(tx Executor) error) error
	Ping(ctx context.Context) error
	// DBNow reads the database's clock (UTC): the one clock that every
	// replica's leases, deadlines and expiries are compared on.
	DBNow(ctx context.Context) (time.Time, error)
	Dialect() string
	Close() error
	// OnOutboxDue sets f, called after each commit of InTx that made an
	// outbox row due by ending its waiter (a callback; see WaiterEnd), to
	// wake the delivery loop. f must not block.
	OnOutboxDue(f func())
}

// Executor is every query, run either on the pool or inside a transaction.
// Methods are named noun-then-verb and take their inputs as parameters or a
// Params struct.
type Executor interface {
	// RunGet returns the run; forUpdate takes its row lock (the per-run
	// serialisation point of targeted notify, wait registration, cancel).
	RunGet(ctx context.Context, runID string, forUpdate bool) (*models.WorkflowRun, error)
	// RunLockListWaiting takes the run's row lock, as RunGet with forUpdate,
	// and in the same statement lists the run's waiters that
	// WaiterListWaiting with the run's id would list, oldest first: one
	// round trip for a targeted notify instead of two. It returns the run's
	// state; ErrNotFound if the run does not exist. The waiters are read
	// after the lock is granted, so they include every waiter committed by
	// a transaction that held the lock before (a waitForEvent registering
	// on the run). On MySQL the waiters' rows are locked too. Waiters owned
	// by other replicas cost a second, non-locking read of their leases.
	RunLockListWaiting(ctx context.Context, p *RunLockListWaitingParams) (models.RunState, []*models.Waiter, error)
	// RunLockListWaitingMany is RunLockListWaiting for several runs in one
	// statement, for a group of targeted notifies committed together: the
	// runs are locked in index order, each before its waiters are read.
	// Each run may appear once; Self and Now must be the same in all. Result
	// i is ps[i]'s, with State "" when the run does not exist; the waiters
	// left out for a lapsed lease go to ps[i].Lapsed.
	RunLockListWaitingMany(ctx context.Context, ps []RunLockListWaitingParams) ([]RunLockListed, error)
	// RunInsert inserts a run; ErrDuplicate if the id exists.
	RunInsert(ctx context.Context, run *models.WorkflowRun) error
	// RunEnd moves a started run to its final state (compare and set).
	RunEnd(ctx context.Context, p *RunEndParams) error
	RunList(ctx context.Context, p *RunListParams) ([]*models.WorkflowRun, error)
	// RunSelect lists runs matching several filters, newest first (runselect.go).
	RunSelect(ctx context.Context, p *RunSelectParams) ([]*models.WorkflowRun, error)
	// RunCountByState counts the runs in each state; states without runs
	// are absent.
	RunCountByState(ctx context.Context) (map[models.RunState]int64, error)

	// WaiterInsert inserts the waiter and sets its ID.
	WaiterInsert(ctx context.Context, w *models.Waiter) error
	// WaiterGet returns the waiter with the event data it ended with.
	WaiterGet(ctx context.Context, waiterID string) (*models.Waiter, error)
	// WaiterListWaiting lists waiters in state WAITING whose deadline is
	// after Now and whose owner (if any) holds a live lease, oldest first;
	// forUpdate locks them.
	WaiterListWaiting(ctx context.Context, p *WaiterListWaitingParams) ([]*models.Waiter, error)
	WaiterListByRun(ctx context.Context, runID string) ([]*models.Waiter, error)
	// WaiterListWaitingByRun lists the run's waiters in state WAITING,
	// deadline passed or not, oldest first.
	WaiterListWaitingByRun(ctx context.Context, runID string) ([]*models.Waiter, error)
	// WaiterEnd moves the given waiters from WAITING to p.State (compare and
	// set) and returns the IDs it moved; the others had already ended.
	// It is the one statement that ends a waiter that was WAITING, so it
	// also makes the callbacks of the waiters it moved due (their HELD
	// outbox rows PENDING at p.EndedAt), in the same transaction (called
	// on the Store, it opens one of its own unless p.NoCallbacks).
	// With more than one id it must run inside InTx.
	WaiterEnd(ctx context.Context, p *WaiterEndParams) ([]string, error)
	// WaiterDeleteWaiting deletes those of the waiters that are still
	// WAITING (an ended one keeps its result) and returns how many it
	// deleted. Unknown ids are ignored.
	WaiterDeleteWaiting(ctx context.Context, waiterIDs []string) (int64, error)
	// WaiterGetMany is WaiterGet for many waiters in a few statements (the
	// rows by chunks of ids, then the data of the notifications that
	// resolved them): the waiters found, by id; ids of no waiter are absent.
	WaiterGetMany(ctx context.Context, waiterIDs []string) (map[string]*models.Waiter, error)
	// WaiterListNotWaiting returns which of the given waiters are not
	// WAITING: ended, or gone (a waiter without a step deleted, for
	// instance reaped after its replica lost its lease). A subscription
	// must hear of both.
	WaiterListNotWaiting(ctx context.Context, waiterIDs []string) ([]string, error)
	// WaiterListExpired lists WAITING waiters whose deadline is at or before now.
	WaiterListExpired(ctx context.Context, now time.Time, limit int) ([]*models.Waiter, error)
	// WaiterCountWaiting counts the waiters WAITING whose deadline is after now.
	WaiterCountWaiting(ctx context.Context, now time.Time) (int64, error)
	// WaiterCountByState counts the waiters in each state, with deadlines
	// applied: a WAITING waiter whose deadline is at or before now counts
	// as TIMED_OUT. States without waiters are absent.
	WaiterCountByState(ctx context.Context, now time.Time) (map[models.WaiterState]int64, error)
	// WaiterOldestDeadline is the earliest deadline after now of a WAITING
	// waiter; nil when none is waiting.
	WaiterOldestDeadline(ctx context.Context, now time.Time) (*time.Time, error)

	// ReplicaRenew creates or extends a replica's lease. Waiters whose
	// Owner has no live lease are treated as gone: notifies skip them and
	// WaiterReapOrphans deletes them.
	ReplicaRenew(ctx context.Context, replicaID string, leaseUntil time.Time) error
	// ReplicaRelease drops a replica's lease (graceful shutdown).
	ReplicaRelease(ctx context.Context, replicaID string) error
	// WaiterReapOrphans deletes WAITING waiters whose owner's lease ended
	// before now, and those replicas' rows; it returns the waiters deleted.
	WaiterReapOrphans(ctx context.Context, now time.Time) (int64, error)

	LookbackEventInsert(ctx context.Context, e *models.LookbackEvent) error
	// LookbackEventInsertCommit is LookbackEventInsert as the last statement
	// of a transaction of InTx: on MySQL the INSERT and COMMIT go in one
	// round trip. fn must return right after it: nil when it returned nil
	// (the transaction has committed; any later statement fails), and its
	// error unchanged otherwise, which InTx then reports as it reports a
	// failed COMMIT when COMMIT was sent (ErrCommitUnknown, or a rerun after
	// a deadlock) and as a failed statement when it was not. Elsewhere it
	// is LookbackEventInsert, and InTx commits as usual.
	LookbackEventInsertCommit(ctx context.Context, e *models.LookbackEvent) error
	// LookbackEventInsertManyCommit is LookbackEventInsertCommit for
	// several events (distinct message ids), in one INSERT where the server
	// can say which id each row got (INSERT … RETURNING), with the same
	// contract: fn returns right after it.
	LookbackEventInsertManyCommit(ctx context.Context, evs []*models.LookbackEvent) error
	// LookbackEventConsume marks the oldest unconsumed, unexpired lookback
	// event of (run, event id) consumed by the waiter and returns it, or
	// returns nil if there is none. Call it holding the run's lock.
	LookbackEventConsume(ctx context.Context, runID, eventID string, now time.Time) (*models.LookbackEvent, error)
	LookbackEventListByRun(ctx context.Context, runID string, now time.Time) ([]*models.LookbackEvent, error)
	LookbackEventDeleteByRun(ctx context.Context, runID string) (int64, error)
	// LookbackEventPurge deletes up to limit expired lookback events and
	// returns how many it deleted and, of those, how many had never been
	// consumed (they expired unheard).
	LookbackEventPurge(ctx context.Context, now time.Time, limit int) (purged, unconsumed int64, err error)
	// LookbackEventCountPending counts the lookback events not consumed
	// and not expired at now.
	LookbackEventCountPending(ctx context.Context, now time.Time) (int64, error)

	// RunPurge deletes, in one bounded batch, runs ended at or before
	// p.EndedBefore with their waiters, steps and lookback events, and the
	// notifications left without a waiter; never a started run, a WAITING
	// waiter or a pending lookback event (see purge.go). Run it in InTx.
	RunPurge(ctx context.Context, p *PurgeParams) (PurgeResult, error)
	// WaiterPurgeRunless deletes, in one bounded batch, waiters without a
	// run that ended at or before p.EndedBefore, and the notifications left
	// without a waiter. Run it in InTx.
	WaiterPurgeRunless(ctx context.Context, p *PurgeParams) (PurgeResult, error)

	StepGet(ctx context.Context, runID, stepName string) (*StepRecord, error)
	// StepInsert inserts a step; ErrDuplicate if (run, step name) exists.
	StepInsert(ctx context.Context, s *StepRecord) error
	// StepListByRun lists the run's steps in the order they were first
	// run, each wait step with its waiter's state (StepRecord.Waiter), read
	// in the same statement.
	StepListByRun(ctx context.Context, runID string) ([]*StepRecord, error)

	// ServiceKeyGetOrCreate returns the secret stored under name, storing
	// candidate first when there is none: every replica gets the same one,
	// whoever stored it.
	ServiceKeyGetOrCreate(ctx context.Context, name, candidate string, now time.Time) (string, error)

	OutboxExecutor
	RunClaimExecutor
}

// OutboxExecutor is the outbox's queries (outbox.go).
type OutboxExecutor interface {
	OutboxInsert(ctx context.Context, r *OutboxRecord) error
	// OutboxGetByRun returns the run's delivery; ErrNotFound if none.
	OutboxGetByRun(ctx context.Context, runID string) (*OutboxRecord, error)
	// OutboxGetByWaiter returns the waiter's callback; ErrNotFound if none.
	OutboxGetByWaiter(ctx context.Context, waiterID string) (*OutboxRecord, error)
	OutboxGet(ctx context.Context, id string) (*OutboxRecord, error)
	// OutboxClaim claims due PENDING rows, oldest due first, and returns
	// them with their attempts counted; run it inside InTx. Rows another
	// claimer holds are skipped (SKIP LOCKED where the database has it; a
	// compare and set on the due time everywhere).
	OutboxClaim(ctx context.Context, p *OutboxClaimParams) ([]*OutboxRecord, error)
	// OutboxRecordAttempt stores an attempt's result if the claim is still
	// the row's; false when it is not (the lease passed and another
	// claimed it, or the run ended and canceled it).
	OutboxRecordAttempt(ctx context.Context, p *OutboxAttemptParams) (bool, error)
	// OutboxCancelByRun cancels the run's PENDING deliveries that are not
	// in flight (claimed); the claimer records those.
	OutboxCancelByRun(ctx context.Context, runID string, now time.Time) (int64, error)
	OutboxCountByState(ctx context.Context) (map[models.DispatchState]int64, error)
	// OutboxNextDue is the earliest due time of a PENDING row; nil if none.
	OutboxNextDue(ctx context.Context) (*time.Time, error)
}

// StepRecord is a step as stored: a waitForEvent step points at its waiter, a
// notify step keeps the result its first call returned.
type StepRecord struct {
	RunID       string
	StepName    string
	Type        models.StepType
	EventID     string
	WaiterID    string // WAIT_FOR_EVENT steps
	Result      []byte // NOTIFY steps: the first call's result, encoded by the engine
	CreatedAt   time.Time
	CompletedAt *time.Time // NOTIFY steps; a wait step completes when its waiter ends

	// Waiter is a WAIT_FOR_EVENT step's waiter as it is now, filled by
	// StepListByRun only (nil if the waiter is gone).
	Waiter *StepWaiter
}

// StepWaiter is what a step listing needs of a wait step's waiter to tell
// when the step completed.
type StepWaiter struct {
	State    models.WaiterState
	Deadline time.Time
	EndedAt  *time.Time
}

type RunEndParams struct {
	RunID     string
	State     models.RunState
	Result    []byte
	UpdatedAt time.Time
}

type RunListParams struct {
	State *models.RunState
	Label *string
	// AfterRunID continues a newest-first listing after this run.
	AfterRunID string
	Limit      int
}

type WaiterListWaitingParams struct {
	EventID string
	RunID   *string // nil: any run (broadcast) or no run
	// Self is the calling replica: its own waiters count whatever its lease
	// says (it knows they are alive; its lease may just have lapsed during
	// a database outage).
	Self      string
	Now       time.Time
	ForUpdate bool
	// Lapsed, when set, receives the ids of the waiters left out because
	// their owner's lease had run out.
	Lapsed *[]string
}

type RunLockListWaitingParams struct {
	RunID   string
	EventID string
	// Self, Now and Lapsed as in WaiterListWaitingParams.
	Self   string
	Now    time.Time
	Lapsed *[]string
}

type WaiterEndParams struct {
	WaiterIDs []string
	State     models.WaiterState
	EndedAt   time.Time
	// DeadlineAfter, when set, only ends waiters whose deadline is after it:
	// a waiter past its deadline has timed out and must not be notified.
	DeadlineAfter *time.Time
	// MessageID and EventData (NOTIFIED only) name the notification. Its
	// data is stored once per message, not once per waiter, so a broadcast
	// to many waiters writes a large payload one time. A message id is
	// unique to one notify: no waiter given may have ended with it before.
	MessageID *string
	EventID   string
	EventData []byte
	// NoCallbacks: the caller knows that none of the waiters has a
	// callback (none is a durable step, which every callback waiter is),
	// so WaiterEnd need not look for callbacks to make due. Unset, it
	// looks: the safe default for any caller.
	NoCallbacks bool
}

// OutboxClaimParams: claim up to Limit rows due at Now, under the token
// Claim, until LeaseUntil (when they are due again unless a result is
// recorded first).
type OutboxClaimParams struct {
	Now        time.Time
	LeaseUntil time.Time
	Claim      string
	Limit      int
}

// OutboxAttemptParams record an attempt's result: compare and set on the
// claim, so a claimer whose lease passed (and whose row another claimed
// since) records nothing.
type OutboxAttemptParams struct {
	ID            string
	Claim         string
	State         models.DispatchState // PENDING: to be retried at NextAttemptAt
	LastStatus    *int
	LastError     *string
	NextAttemptAt time.Time
	Now           time.Time
	// Uncount: the attempt was interrupted and does not count.
	Uncount bool
}

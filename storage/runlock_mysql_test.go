package storage_test

import (
	"context"
	"database/sql"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/storage"
)

// The lock behaviour of RunLockListWaiting on MySQL, the one statement that
// locks a run and lists its waiting waiters for a targeted notify.

// holdInTx runs fn in a transaction of s on its own goroutine and keeps the
// transaction open, after fn returned nil, until the returned release is
// called; the returned wait gives InTx's error. It returns once fn has run.
func holdInTx(t *testing.T, s storage.Store, fn func(tx storage.Executor) error) (release func(), wait func() error) {
	t.Helper()
	var (
		ran      = make(chan struct{})
		released = make(chan struct{})
		done     = make(chan error, 1)
		once     sync.Once
	)
	go func() {
		done <- s.InTx(t.Context(), func(tx storage.Executor) error {
			if err := fn(tx); err != nil {
				return err
			}
			once.Do(func() { close(ran) })
			<-released
			return nil
		})
	}()
	select {
	case <-ran:
	case err := <-done:
		t.Fatalf("holding transaction ended early: %v", err)
	}
	var releaseOnce sync.Once
	release = func() { releaseOnce.Do(func() { close(released) }) }
	t.Cleanup(release)
	return release, func() error { return <-done }
}

// awaitLockWait waits until a transaction on the server waits for a row lock
// in a statement that mentions marker. It polls no faster than every 150ms:
// InnoDB refreshes what innodb_trx shows only when it was last read more
// than 100ms before, so quicker polling would keep a stale picture forever.
func awaitLockWait(t *testing.T, db *sql.DB, marker string) {
	t.Helper()
	require.Eventually(t, func() bool {
		var n int
		err := db.QueryRowContext(t.Context(), `SELECT COUNT(*) FROM information_schema.innodb_trx
			WHERE trx_state = 'LOCK WAIT' AND trx_query LIKE CONCAT('%', ?, '%')`, marker).Scan(&n)
		require.NoError(t, err)
		return n > 0
	}, 10*time.Second, 150*time.Millisecond, "no statement waits for a lock on %s", marker)
}

type lockListResult struct {
	state   models.RunState
	waiters []*models.Waiter
	err     error
}

func lockListInTx(ctx context.Context, s storage.Store, p storage.RunLockListWaitingParams) lockListResult {
	var r lockListResult
	r.err = s.InTx(ctx, func(tx storage.Executor) error {
		var err error
		r.state, r.waiters, err = tx.RunLockListWaiting(ctx, &p)
		return err
	})
	return r
}

// A waitForEvent registration holds the run lock and inserts a waiter; a
// targeted notify's RunLockListWaiting waits for the lock meanwhile. Once
// the registration commits, the notify must list that waiter: the waiters
// are read after the lock was granted, with a locking read (a consistent
// read could use a snapshot from before the wait and miss it, and the
// notify would then store a lookback event beside a waiting waiter).
func TestRunLockListWaitingSeesWaiterCommittedWhileWaitingMySQL(t *testing.T) {
	t.Parallel()
	databaseURL := testdb.MySQL(t)
	store := openStore(t, databaseURL)
	ctx := t.Context()
	now := time.Now().UTC()
	runID := "wfr_" + mysqlDBName(t, databaseURL) // unique on the server, to find our lock wait
	require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: runID, State: models.RunStarted, CreatedAt: now, UpdatedAt: now}))

	var registered *models.Waiter
	release, registration := holdInTx(t, store, func(tx storage.Executor) error {
		if _, err := tx.RunGet(ctx, runID, true); err != nil {
			return err
		}
		registered = &models.Waiter{EventID: "ev", WorkflowRunID: &runID, State: models.WaiterWaiting, Deadline: now.Add(time.Hour), CreatedAt: now}
		return tx.WaiterInsert(ctx, registered)
	})

	notified := make(chan lockListResult, 1)
	go func() {
		notified <- lockListInTx(ctx, store, storage.RunLockListWaitingParams{RunID: runID, EventID: "ev", Now: now})
	}()
	awaitLockWait(t, rawDB(t, databaseURL), runID)
	select {
	case r := <-notified:
		t.Fatalf("the notify did not wait for the run lock: %+v", r)
	default:
	}

	release()
	require.NoError(t, registration())
	r := <-notified
	require.NoError(t, r.err)
	require.Equal(t, models.RunStarted, r.state)
	require.Len(t, r.waiters, 1, "the waiter committed while the notify waited for the lock")
	require.Equal(t, registered.ID, r.waiters[0].ID)
}

// While a notify's transaction holds its run (and that run's waiters of a
// live replica), the replica's lease can be renewed and a notify on another
// run whose waiters belong to the same replica goes through: the lease check
// reads the replicas row without locking it. The run itself is locked.
func TestRunLockListWaitingLocksOnlyTheRunMySQL(t *testing.T) {
	t.Parallel()
	// One-second lock waits and no retries: a lock that should not be taken
	// shows as an error instead of a stall.
	s, err := storage.Open(t.Context(), testdb.MySQL(t)+"?innodb_lock_wait_timeout=1", storage.Options{MaxTxAttempts: 1})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	store := s
	ctx := t.Context()
	now := time.Now().UTC()
	require.NoError(t, store.ReplicaRenew(ctx, "rep_live", now.Add(time.Hour)))
	for _, id := range []string{"wfr_A", "wfr_B"} {
		require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, CreatedAt: now, UpdatedAt: now}))
		require.NoError(t, store.WaiterInsert(ctx, &models.Waiter{EventID: "ev", WorkflowRunID: ptr(id), State: models.WaiterWaiting,
			Deadline: now.Add(time.Hour), CreatedAt: now, Owner: "rep_live"}))
	}
	params := func(runID string) storage.RunLockListWaitingParams {
		return storage.RunLockListWaitingParams{RunID: runID, EventID: "ev", Self: "rep_other", Now: now}
	}

	release, held := holdInTx(t, store, func(tx storage.Executor) error {
		p := params("wfr_A")
		_, ws, err := tx.RunLockListWaiting(ctx, &p)
		if err == nil && len(ws) != 1 {
			t.Errorf("run A: %d waiters, want 1", len(ws))
		}
		return err
	})

	// The lease is renewed at once…
	renewed := now.Add(2 * time.Hour)
	require.NoError(t, store.ReplicaRenew(ctx, "rep_live", renewed))
	// …and counts for a notify on another run at once.
	r := lockListInTx(ctx, store, params("wfr_B"))
	require.NoError(t, r.err)
	require.Len(t, r.waiters, 1)
	// But run A is taken.
	r = lockListInTx(ctx, store, params("wfr_A"))
	require.ErrorIs(t, r.err, storage.ErrUnavailable, "run A's lock is held")
	_, err = store.RunGet(ctx, "wfr_A", false)
	require.NoError(t, err, "a plain read does not wait")

	release()
	require.NoError(t, held())
	r = lockListInTx(ctx, store, params("wfr_A"))
	require.NoError(t, r.err)
	require.Len(t, r.waiters, 1)
}

// The same for a group of notifies: the statement locks its runs one by one
// and reads each run's waiters once that run's lock is granted, so a waiter
// committed on the second run while the statement waited for it is listed.
func TestRunLockListWaitingManySeesWaiterCommittedWhileWaitingMySQL(t *testing.T) {
	t.Parallel()
	databaseURL := testdb.MySQL(t)
	store := openStore(t, databaseURL)
	ctx := t.Context()
	now := time.Now().UTC()
	name := mysqlDBName(t, databaseURL) // unique on the server, to find our lock wait
	runA, runB := "wfr_a_"+name, "wfr_b_"+name
	for _, id := range []string{runA, runB} {
		require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, CreatedAt: now, UpdatedAt: now}))
	}

	var registered *models.Waiter
	release, registration := holdInTx(t, store, func(tx storage.Executor) error {
		if _, err := tx.RunGet(ctx, runB, true); err != nil {
			return err
		}
		registered = &models.Waiter{EventID: "ev", WorkflowRunID: &runB, State: models.WaiterWaiting, Deadline: now.Add(time.Hour), CreatedAt: now}
		return tx.WaiterInsert(ctx, registered)
	})

	type result struct {
		listed []storage.RunLockListed
		err    error
	}
	notified := make(chan result, 1)
	go func() {
		var r result
		r.err = store.InTx(ctx, func(tx storage.Executor) error {
			var err error
			r.listed, err = tx.RunLockListWaitingMany(ctx, []storage.RunLockListWaitingParams{
				{RunID: runB, EventID: "ev", Now: now}, {RunID: runA, EventID: "ev", Now: now},
			})
			return err
		})
		notified <- r
	}()
	awaitLockWait(t, rawDB(t, databaseURL), runB)
	select {
	case r := <-notified:
		t.Fatalf("the group did not wait for run B's lock: %+v", r)
	default:
	}

	release()
	require.NoError(t, registration())
	r := <-notified
	require.NoError(t, r.err)
	require.Len(t, r.listed, 2)
	require.Len(t, r.listed[0].Waiting, 1, "the waiter committed on run B while the group waited for its lock")
	require.Equal(t, registered.ID, r.listed[0].Waiting[0].ID)
	require.Empty(t, r.listed[1].Waiting)
}

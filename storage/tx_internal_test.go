package storage

import (
	"bytes"
	"context"
	"database/sql"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mysqldriver "github.com/go-sql-driver/mysql"
	"github.com/stretchr/testify/require"
	"gorm.io/driver/mysql"
	"gorm.io/gorm"

	"rendezvous/internal/testdb"
	"rendezvous/models"
)

// lazyTx on MySQL: START TRANSACTION travels with the first statement.

// oneConnDB opens the store's DSN with a single connection, so that what a
// transaction left on its connection shows in the next use of the pool.
func oneConnDB(t *testing.T) *sql.DB {
	t.Helper()
	databaseURL := testdb.MySQL(t)
	s, err := Open(t.Context(), databaseURL, Options{}) // migrates
	require.NoError(t, err)
	require.NoError(t, s.Close())
	dsn, _, err := mysqlDSN(t.Context(), databaseURL)
	require.NoError(t, err)
	db, err := sql.Open("mysql", dsn)
	require.NoError(t, err)
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { db.Close() })
	return db
}

func connectionID(t *testing.T, db *sql.DB) int64 {
	t.Helper()
	var id int64
	require.NoError(t, db.QueryRowContext(t.Context(), `SELECT CONNECTION_ID()`).Scan(&id))
	return id
}

func inTransaction(t *testing.T, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}) int {
	t.Helper()
	var n int
	require.NoError(t, q.QueryRowContext(t.Context(), `SELECT @@in_transaction`).Scan(&n))
	return n
}

func TestLazyTxFirstStatementMySQL(t *testing.T) {
	t.Parallel()
	db := oneConnDB(t)
	ctx := t.Context()
	conn := connectionID(t, db)
	now := newDBTime(time.Now())

	t.Run("QueryRowFirst", func(t *testing.T) {
		tx, err := beginLazy(ctx, db)
		require.NoError(t, err)
		require.Equal(t, 1, inTransaction(t, tx), "the first statement runs inside the transaction")
		require.NoError(t, tx.Commit())
		require.Equal(t, 0, inTransaction(t, db))
	})

	t.Run("ExecFirstReportsItsOwnResult", func(t *testing.T) {
		tx, err := beginLazy(ctx, db)
		require.NoError(t, err)
		res, err := tx.ExecContext(ctx, `INSERT INTO notifications (message_id, event_id, created_at) VALUES (?, ?, ?), (?, ?, ?)`,
			"m1", "ev", now, "m2", "ev", now)
		require.NoError(t, err)
		n, err := res.RowsAffected()
		require.NoError(t, err)
		require.EqualValues(t, 2, n, "the INSERT's row count, not START TRANSACTION's")
		id, err := res.LastInsertId()
		require.NoError(t, err)
		var first int64
		require.NoError(t, tx.QueryRowContext(ctx, `SELECT seq FROM notifications WHERE message_id = 'm1'`).Scan(&first))
		require.Equal(t, first, id, "the INSERT's first auto-increment id")
		require.Equal(t, 1, inTransaction(t, tx))
		require.NoError(t, tx.Rollback())
		var left int
		require.NoError(t, db.QueryRowContext(ctx, `SELECT COUNT(*) FROM notifications`).Scan(&left))
		require.Zero(t, left, "rolled back")
	})

	t.Run("QueryFirstReadsItsRows", func(t *testing.T) {
		tx, err := beginLazy(ctx, db)
		require.NoError(t, err)
		rows, err := tx.QueryContext(ctx, `SELECT ? UNION ALL SELECT ?`, "a", "b")
		require.NoError(t, err)
		var got []string
		for rows.Next() {
			var v string
			require.NoError(t, rows.Scan(&v))
			got = append(got, v)
		}
		require.NoError(t, rows.Err())
		require.False(t, rows.NextResultSet())
		require.NoError(t, rows.Close())
		require.Equal(t, []string{"a", "b"}, got)
		require.Equal(t, 1, inTransaction(t, tx))
		require.NoError(t, tx.Commit())
	})

	t.Run("FirstStatementFailsAfterBegin", func(t *testing.T) {
		_, err := db.ExecContext(ctx, `INSERT INTO replicas (id, lease_until) VALUES ('rep_x', ?)`, now)
		require.NoError(t, err)
		tx, err := beginLazy(ctx, db)
		require.NoError(t, err)
		_, err = tx.ExecContext(ctx, `INSERT INTO replicas (id, lease_until) VALUES ('rep_x', ?)`, now)
		var me *mysqldriver.MySQLError
		require.ErrorAs(t, err, &me)
		require.EqualValues(t, mysqlDuplicateEntry, me.Number)
		require.Equal(t, 1, inTransaction(t, tx), "START TRANSACTION ran before the INSERT failed")
		require.NoError(t, tx.Rollback())
		require.Equal(t, 0, inTransaction(t, db), "rolled back: the pooled connection has no transaction open")
	})

	t.Run("LargeFirstStatementBeginsAlone", func(t *testing.T) {
		big := bytes.Repeat([]byte(`"x\'`), prefixLimit/2) // escaping makes it larger still
		require.False(t, fitsPrefix("INSERT", []any{big}))
		tx, err := beginLazy(ctx, db)
		require.NoError(t, err)
		_, err = tx.ExecContext(ctx, `INSERT INTO notifications (message_id, event_id, event_data, created_at) VALUES (?, ?, ?, ?)`, "m3", "ev", big, now)
		require.NoError(t, err)
		require.Equal(t, 1, inTransaction(t, tx))
		require.NoError(t, tx.Commit())
		var got []byte
		require.NoError(t, db.QueryRowContext(ctx, `SELECT event_data FROM notifications WHERE message_id = 'm3'`).Scan(&got))
		require.Equal(t, big, got)
	})

	t.Run("NothingSentNothingToEnd", func(t *testing.T) {
		tx, err := beginLazy(ctx, db)
		require.NoError(t, err)
		require.NoError(t, tx.Commit())
		require.ErrorIs(t, tx.Commit(), sql.ErrTxDone)
		tx, err = beginLazy(ctx, db)
		require.NoError(t, err)
		require.NoError(t, tx.Rollback())
	})

	require.Equal(t, conn, connectionID(t, db), "every transaction ended cleanly: the one connection was kept")
}

// A transaction whose context ends between two statements is still rolled
// back on its connection, which then goes on serving.
func TestLazyTxRollbackAfterCancelMySQL(t *testing.T) {
	t.Parallel()
	db := oneConnDB(t)
	conn := connectionID(t, db)
	ctx, cancel := context.WithCancel(t.Context())
	tx, err := beginLazy(ctx, db)
	require.NoError(t, err)
	_, err = tx.ExecContext(ctx, `INSERT INTO replicas (id, lease_until) VALUES ('rep_c', ?)`, newDBTime(time.Now()))
	require.NoError(t, err)
	cancel()
	_, err = tx.ExecContext(ctx, `DELETE FROM replicas`)
	require.ErrorIs(t, err, context.Canceled)
	require.NoError(t, tx.Rollback())
	require.Equal(t, conn, connectionID(t, db))
	require.Equal(t, 0, inTransaction(t, db))
	var n int
	require.NoError(t, db.QueryRowContext(t.Context(), `SELECT COUNT(*) FROM replicas`).Scan(&n))
	require.Zero(t, n)
}

// Through the store: a GORM Create as a transaction's first statement gets
// its auto-increment id; a connection killed before COMMIT makes the outcome
// unknown, is not reused, and the store goes on.
func TestLazyTxInStoreMySQL(t *testing.T) {
	t.Parallel()
	databaseURL := testdb.MySQL(t)
	s, err := Open(t.Context(), databaseURL, Options{MaxOpenConns: 1})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	ctx := t.Context()
	now := time.Now().UTC()

	var ids []string
	for range 3 {
		require.NoError(t, s.InTx(ctx, func(tx Executor) error {
			w := &models.Waiter{EventID: "ev", State: models.WaiterWaiting, Deadline: now.Add(time.Hour), CreatedAt: now}
			if err := tx.WaiterInsert(ctx, w); err != nil {
				return err
			}
			ids = append(ids, w.ID)
			got, err := tx.WaiterGet(ctx, w.ID)
			if err != nil {
				return err
			}
			require.Equal(t, w.ID, got.ID)
			return nil
		}))
	}
	require.Equal(t, []string{"wtr_1", "wtr_2", "wtr_3"}, ids)

	dsn, _, err := mysqlDSN(ctx, databaseURL)
	require.NoError(t, err)
	admin, err := sql.Open("mysql", dsn)
	require.NoError(t, err)
	t.Cleanup(func() { admin.Close() })
	err = s.InTx(ctx, func(tx Executor) error {
		if err := tx.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: "wfr_lost", State: models.RunStarted, CreatedAt: now, UpdatedAt: now}); err != nil {
			return err
		}
		var id int64
		if err := tx.(*gormExecutor).db.WithContext(ctx).Raw(`SELECT CONNECTION_ID()`).Row().Scan(&id); err != nil {
			return err
		}
		_, err := admin.ExecContext(ctx, `KILL CONNECTION ?`, id)
		return err
	})
	require.ErrorIs(t, err, ErrCommitUnknown)
	_, err = s.RunGet(ctx, "wfr_lost", false)
	require.ErrorIs(t, err, ErrNotFound, "the killed connection's transaction was rolled back by the server")
	require.NoError(t, s.InTx(ctx, func(tx Executor) error {
		return tx.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: "wfr_after", State: models.RunStarted, CreatedAt: now, UpdatedAt: now})
	}), "the store goes on on a new connection")
	_, err = s.RunGet(ctx, "wfr_after", false)
	require.NoError(t, err)
}

// GORM's Create as a transaction's first statement gets the row's
// auto-increment id both ways it can ask: INSERT … RETURNING (MariaDB ≥ 10.5,
// a query) and LastInsertId (MySQL, an exec).
func TestLazyTxGormCreateMySQL(t *testing.T) {
	t.Parallel()
	db := oneConnDB(t)
	ctx := t.Context()
	for _, returning := range []bool{true, false} {
		g, err := gorm.Open(mysql.New(mysql.Config{Conn: db, DisableWithReturning: !returning}), &gorm.Config{SkipDefaultTransaction: true})
		require.NoError(t, err)
		for range 2 {
			var want int64
			require.NoError(t, db.QueryRowContext(ctx, `SELECT COALESCE(MAX(seq), 0) + 1 FROM lookback_events`).Scan(&want))
			pool, err := beginLazy(ctx, db)
			require.NoError(t, err)
			tx := g.Session(&gorm.Session{Context: ctx, NewDB: true})
			tx.Statement.ConnPool = pool
			row := lookbackRow{RunID: "wfr_g", EventID: "ev", MessageID: "m", CreatedAt: newDBTime(time.Now()), ExpiresAt: newDBTime(time.Now())}
			require.NoError(t, tx.Create(&row).Error)
			require.Equal(t, want, row.Seq, "returning=%v", returning)
			require.Equal(t, 1, inTransaction(t, pool))
			require.NoError(t, tx.Commit().Error)
		}
	}
}

// A context canceled while COMMIT is on its way must not make the outcome
// unknown: either COMMIT was not sent (the error says so and nothing
// landed) or it was, and it completes. Races the cancel with the COMMIT
// many times.
func TestLazyTxCommitOutcomeKnownUnderCancelMySQL(t *testing.T) {
	t.Parallel()
	db := oneConnDB(t)
	for i := range 200 {
		ctx, cancel := context.WithCancel(t.Context())
		tx, err := beginLazy(ctx, db)
		require.NoError(t, err)
		id := "rep_" + strconv.Itoa(i)
		_, err = tx.ExecContext(ctx, `INSERT INTO replicas (id, lease_until) VALUES (?, ?)`, id, newDBTime(time.Now()))
		require.NoError(t, err)
		go cancel()
		err = tx.Commit()
		var n int
		require.NoError(t, db.QueryRowContext(t.Context(), `SELECT COUNT(*) FROM replicas WHERE id = ?`, id).Scan(&n))
		if err != nil {
			require.ErrorIs(t, err, context.Canceled)
			require.Zero(t, n, "round %d: COMMIT failed, yet it landed", i)
		} else {
			require.Equal(t, 1, n, "round %d", i)
		}
		require.Equal(t, 0, inTransaction(t, db))
		cancel()
	}
}

// LookbackEventInsertCommit on MySQL: the INSERT and COMMIT in one round
// trip, and every way it can end.
func TestLookbackEventInsertCommitMySQL(t *testing.T) {
	t.Parallel()
	s, err := Open(t.Context(), testdb.MySQL(t), Options{MaxOpenConns: 1})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	ctx := t.Context()
	now := time.Now().UTC()
	store := s.(*gormStore)
	event := func(runID string, data []byte) *models.LookbackEvent {
		return &models.LookbackEvent{WorkflowRunID: runID, EventID: "ev", EventData: data, MessageID: "msg",
			CreatedAt: now, ExpiresAt: now.Add(time.Hour)}
	}
	count := func(runID string) int {
		t.Helper()
		ls, err := s.LookbackEventListByRun(ctx, runID, now)
		require.NoError(t, err)
		return len(ls)
	}
	noTransactionLeft := func() {
		t.Helper()
		require.Equal(t, 0, inTransaction(t, store.sqlDB), "the one pooled connection has no transaction open")
	}

	t.Run("Commits", func(t *testing.T) {
		require.True(t, store.returning, "MariaDB ≥ 10.5 here")
		for _, returning := range []bool{true, false} { // the id from RETURNING, or from LAST_INSERT_ID()
			runID := "wfr_ok" + strconv.FormatBool(returning)
			ev := event(runID, []byte(`"x"`))
			require.NoError(t, s.InTx(ctx, func(tx Executor) error {
				if err := tx.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: runID, State: models.RunStarted, CreatedAt: now, UpdatedAt: now}); err != nil {
					return err
				}
				ex := *tx.(*gormExecutor)
				ex.returning = returning
				if err := ex.LookbackEventInsertCommit(ctx, ev); err != nil {
					return err
				}
				require.True(t, ex.db.Statement.ConnPool.(*lazyTx).committed, "committed with the INSERT")
				return nil
			}))
			ls, err := s.LookbackEventListByRun(ctx, runID, now)
			require.NoError(t, err)
			require.Len(t, ls, 1)
			require.Equal(t, ev.ID, ls[0].ID)
			_, err = s.RunGet(ctx, runID, false)
			require.NoError(t, err)
			noTransactionLeft()
		}
	})

	t.Run("FailedInsertRollsBack", func(t *testing.T) {
		tooLong := "wfr_" + strings.Repeat("x", 400) // run_id holds 300 bytes
		for _, returning := range []bool{true, false} {
			err := s.InTx(ctx, func(tx Executor) error {
				if err := tx.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: "wfr_gone", State: models.RunStarted, CreatedAt: now, UpdatedAt: now}); err != nil {
					return err
				}
				ex := *tx.(*gormExecutor)
				ex.returning = returning
				return ex.LookbackEventInsertCommit(ctx, event(tooLong, nil))
			})
			var me *mysqldriver.MySQLError
			require.ErrorAs(t, err, &me, "returning=%v", returning)
			require.NotErrorIs(t, err, ErrCommitUnknown, "COMMIT did not run: a plain statement error")
			_, err = s.RunGet(ctx, "wfr_gone", false)
			require.ErrorIs(t, err, ErrNotFound, "rolled back")
			noTransactionLeft()
		}
	})

	t.Run("NothingRunsAfterIt", func(t *testing.T) {
		var after error
		err := s.InTx(ctx, func(tx Executor) error {
			if err := tx.LookbackEventInsertCommit(ctx, event("wfr_after", nil)); err != nil {
				return err
			}
			_, after = tx.RunGet(ctx, "wfr_ok", false)
			return after
		})
		require.ErrorIs(t, after, errTxCommitted)
		require.ErrorIs(t, err, ErrCommitUnknown, "a caller that goes on after it is told the transaction committed")
		require.Equal(t, 1, count("wfr_after"))
		noTransactionLeft()
	})

	t.Run("LargeEventCommitsAsUsual", func(t *testing.T) {
		big := []byte(`"` + strings.Repeat("y", prefixLimit/2) + `"`)
		require.NoError(t, s.InTx(ctx, func(tx Executor) error {
			if err := tx.LookbackEventInsertCommit(ctx, event("wfr_big", big)); err != nil {
				return err
			}
			require.False(t, tx.(*gormExecutor).db.Statement.ConnPool.(*lazyTx).committed, "too large to go with COMMIT")
			return nil
		}))
		ls, err := s.LookbackEventListByRun(ctx, "wfr_big", now)
		require.NoError(t, err)
		require.Len(t, ls, 1)
		require.Equal(t, big, []byte(ls[0].EventData))
		noTransactionLeft()
	})
}

// A connection cut after the INSERT and COMMIT reached the server, before
// the answer came back: the store cannot know whether COMMIT landed, and
// must say so (ErrCommitUnknown), never that the notify failed.
func TestLookbackEventInsertCommitCutMySQL(t *testing.T) {
	t.Parallel()
	databaseURL := testdb.MySQL(t)
	u, err := url.Parse(databaseURL)
	require.NoError(t, err)
	proxy := newCuttingProxy(t, u.Host, []byte("; COMMIT"))
	u.Host = proxy
	s, err := Open(t.Context(), u.String(), Options{MaxOpenConns: 1})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	ctx := t.Context()
	now := time.Now().UTC()
	for i, returning := range []bool{true, false, true} {
		swallow := i == 2 // a caller that drops the error still hears it from InTx
		runID := "wfr_cut" + strconv.Itoa(i)
		require.NoError(t, s.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: runID, State: models.RunStarted, CreatedAt: now, UpdatedAt: now}))
		err = s.InTx(ctx, func(tx Executor) error {
			if _, err := tx.RunGet(ctx, runID, true); err != nil {
				return err
			}
			ex := *tx.(*gormExecutor)
			ex.returning = returning
			err := ex.LookbackEventInsertCommit(ctx, &models.LookbackEvent{WorkflowRunID: runID, EventID: "ev", MessageID: "msg",
				CreatedAt: now, ExpiresAt: now.Add(time.Hour)})
			if swallow {
				require.Error(t, err)
				return nil
			}
			return err
		})
		require.ErrorIs(t, err, ErrCommitUnknown, "the answer was cut off: it may have landed")
		ls, err := s.LookbackEventListByRun(ctx, runID, now)
		require.NoError(t, err, "the store goes on on a new connection")
		t.Logf("returning=%v, error dropped=%v: the cut COMMIT landed: %v", returning, swallow, len(ls) == 1)
	}
}

// newCuttingProxy forwards TCP connections to target and, once a client
// sends bytes containing trigger, passes them on to the server, waits for
// the server's first answer to them and closes both connections instead of
// forwarding it. It returns its address.
func newCuttingProxy(t *testing.T, target string, trigger []byte) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			client, err := l.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				client.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, client, server)
			mu.Unlock()
			var armed atomic.Bool
			go func() { // client → server
				buf := make([]byte, 64<<10)
				for {
					n, err := client.Read(buf)
					if n > 0 {
						if bytes.Contains(buf[:n], trigger) {
							armed.Store(true)
						}
						if _, err := server.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						server.Close()
						return
					}
				}
			}()
			go func() { // server → client
				buf := make([]byte, 64<<10)
				for {
					n, err := server.Read(buf)
					if n > 0 {
						if armed.Load() {
							client.Close()
							server.Close()
							return
						}
						if _, err := client.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						client.Close()
						return
					}
				}
			}()
		}
	}()
	return l.Addr().String()
}

func TestMariaDBAtLeast(t *testing.T) {
	for v, want := range map[string]bool{
		"10.11.19-MariaDB-0+deb12u1": true,
		"10.5.0-MariaDB":             true,
		"10.4.32-MariaDB-log":        false,
		"11.0.2-MariaDB":             true,
		"9.9.0-MariaDB":              false,
		"8.0.36":                     false, // MySQL: no INSERT … RETURNING
		"":                           false,
	} {
		require.Equal(t, want, mariaDBAtLeast(v, 10, 5), v)
	}
}

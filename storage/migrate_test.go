package storage_test

import (
	"context"
	"database/sql"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/storage"
)

// appliedMigrations returns version → number of rows recording it.
func appliedMigrations(t *testing.T, db *sql.DB) map[int]int {
	t.Helper()
	rows, err := db.QueryContext(t.Context(), `SELECT version, COUNT(*) FROM schema_migrations GROUP BY version`)
	require.NoError(t, err)
	defer rows.Close()
	got := map[int]int{}
	for rows.Next() {
		var version, n int
		require.NoError(t, rows.Scan(&version, &n))
		got[version] = n
	}
	require.NoError(t, rows.Err())
	return got
}

// wantMigrations is every version from 1 to SchemaVersion, each recorded once.
func wantMigrations() map[int]int {
	want := map[int]int{}
	for v := 1; v <= storage.SchemaVersion(); v++ {
		want[v] = 1
	}
	return want
}

func maxMigration(t *testing.T, db *sql.DB) int {
	t.Helper()
	var v int
	require.NoError(t, db.QueryRowContext(t.Context(), `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v))
	return v
}

func TestMigrateAppliesAllVersions(t *testing.T) {
	t.Parallel()
	testdb.Dialects(t, func(t *testing.T, databaseURL string) {
		store := openStore(t, databaseURL)
		require.Equal(t, testdb.Dialect(databaseURL), store.Dialect())

		db := rawDB(t, databaseURL)
		require.Equal(t, storage.SchemaVersion(), maxMigration(t, db))
		require.Equal(t, wantMigrations(), appliedMigrations(t, db))
		for _, table := range []string{"runs", "waiters", "lookback_events", "steps", "notifications"} {
			var n int
			require.NoError(t, db.QueryRowContext(t.Context(), `SELECT COUNT(*) FROM `+table).Scan(&n), "table %s", table)
		}
	})
}

func TestMigrateIsIdempotent(t *testing.T) {
	t.Parallel()
	testdb.Dialects(t, func(t *testing.T, databaseURL string) {
		ctx := t.Context()
		first, err := storage.Open(ctx, databaseURL, storage.Options{})
		require.NoError(t, err)
		now := time.Now().UTC()
		require.NoError(t, first.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: "wfr_kept", State: models.RunStarted, CreatedAt: now, UpdatedAt: now}))
		require.NoError(t, first.Close())

		db := rawDB(t, databaseURL)
		var appliedAt string
		require.NoError(t, db.QueryRowContext(ctx, `SELECT applied_at FROM schema_migrations WHERE version = 1`).Scan(&appliedAt))

		// A second and third start change nothing: same rows, data kept.
		for range 2 {
			again, err := storage.Open(ctx, databaseURL, storage.Options{})
			require.NoError(t, err)
			_, err = again.RunGet(ctx, "wfr_kept", false)
			require.NoError(t, err)
			require.NoError(t, again.Close())
		}
		require.Equal(t, wantMigrations(), appliedMigrations(t, db))
		var appliedAgain string
		require.NoError(t, db.QueryRowContext(ctx, `SELECT applied_at FROM schema_migrations WHERE version = 1`).Scan(&appliedAgain))
		require.Equal(t, appliedAt, appliedAgain)
	})
}

func TestMigrateConcurrentOpensMySQL(t *testing.T) {
	t.Parallel()
	databaseURL := testdb.MySQL(t)
	ctx := t.Context()

	const replicas = 4
	var (
		wg     sync.WaitGroup
		start  = make(chan struct{})
		stores = make([]storage.Store, replicas)
		errs   = make([]error, replicas)
	)
	for i := range replicas {
		wg.Go(func() {
			<-start
			stores[i], errs[i] = storage.Open(ctx, databaseURL, storage.Options{})
		})
	}
	close(start)
	wg.Wait()
	for i := range replicas {
		require.NoError(t, errs[i], "replica %d", i)
		t.Cleanup(func() { stores[i].Close() })
	}

	db := rawDB(t, databaseURL)
	require.Equal(t, wantMigrations(), appliedMigrations(t, db))

	// Every replica works on the same schema.
	now := time.Now().UTC()
	for i, s := range stores {
		id := "wfr_replica-" + strconv.Itoa(i)
		require.NoError(t, s.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, CreatedAt: now, UpdatedAt: now}))
		_, err := stores[(i+1)%replicas].RunGet(ctx, id, false)
		require.NoError(t, err)
	}
}

func TestMigrateRefusesNewerSchema(t *testing.T) {
	t.Parallel()
	newer := storage.SchemaVersion() + 1

	t.Run("after an older binary migrated", func(t *testing.T) {
		t.Parallel()
		testdb.Dialects(t, func(t *testing.T, databaseURL string) {
			ctx := t.Context()
			s, err := storage.Open(ctx, databaseURL, storage.Options{})
			require.NoError(t, err)
			require.NoError(t, s.Close())

			db := rawDB(t, databaseURL)
			_, err = db.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
				newer, "from the future", time.Now().UTC().Format(time.RFC3339Nano))
			require.NoError(t, err)

			s, err = storage.Open(ctx, databaseURL, storage.Options{})
			if s != nil {
				s.Close()
			}
			require.Error(t, err)
			require.Nil(t, s)
			require.ErrorContains(t, err, "newer than this binary")
			require.ErrorContains(t, err, strconv.Itoa(newer))
			require.ErrorContains(t, err, strconv.Itoa(storage.SchemaVersion()))
			require.Equal(t, newer, maxMigration(t, db), "the refused start must not touch schema_migrations")
		})
	})

	t.Run("fresh database stamped by a newer binary", func(t *testing.T) {
		t.Parallel()
		testdb.Dialects(t, func(t *testing.T, databaseURL string) {
			ctx := t.Context()
			db := rawDB(t, databaseURL)
			_, err := db.ExecContext(ctx, `CREATE TABLE schema_migrations (version INTEGER NOT NULL PRIMARY KEY, name VARCHAR(200) NOT NULL, applied_at VARCHAR(40) NOT NULL)`)
			require.NoError(t, err)
			_, err = db.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'future', 'now')`, newer)
			require.NoError(t, err)

			s, err := storage.Open(ctx, databaseURL, storage.Options{})
			if s != nil {
				s.Close()
			}
			require.ErrorContains(t, err, "newer than this binary")
			// Nothing was created on the newer database.
			require.False(t, tableExists(t, db, testdb.Dialect(databaseURL), "runs"))
		})
	})
}

func tableExists(t *testing.T, db *sql.DB, dialect, table string) bool {
	t.Helper()
	var n int
	q := `SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?`
	if dialect == storage.DialectSQLite {
		q = `SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?`
	}
	require.NoError(t, db.QueryRowContext(t.Context(), q, table).Scan(&n))
	return n == 1
}

// index is one secondary index as the database reports it.
type index struct {
	Table   string
	Unique  bool
	Columns string // comma-separated, in index order
}

// wantIndexes is the list in the comment above migrations in migrate.go:
// every hot-path query has its index.
var wantIndexes = map[string]index{
	"runs_id":                     {"runs", true, "id"},
	"runs_state_seq":              {"runs", false, "state,seq"},
	"runs_label_seq":              {"runs", false, "label,seq"},
	"waiters_event_state":         {"waiters", false, "event_id,state,deadline"},
	"waiters_run_event_state":     {"waiters", false, "run_id,event_id,state"},
	"waiters_state_deadline":      {"waiters", false, "state,deadline"},
	"lookback_run_event_consumed": {"lookback_events", false, "run_id,event_id,consumed,seq"},
	"lookback_expires":            {"lookback_events", false, "expires_at"},
	"steps_run_step":              {"steps", true, "run_id,step_name"},
	"notifications_message":       {"notifications", true, "message_id"},
	"runs_ended":                  {"runs", false, "ended_at,state"},
	"waiters_run_state_ended":     {"waiters", false, "run_id,state,ended_at"},
	"waiters_message":             {"waiters", false, "message_id"},
}

func TestMigrateIndexes(t *testing.T) {
	t.Parallel()
	testdb.Dialects(t, func(t *testing.T, databaseURL string) {
		openStore(t, databaseURL)
		db := rawDB(t, databaseURL)
		var got map[string]index
		if testdb.Dialect(databaseURL) == storage.DialectMySQL {
			got = mysqlIndexes(t, db)
		} else {
			got = sqliteIndexes(t, db)
		}
		for name, want := range wantIndexes {
			require.Contains(t, got, name, "index %s missing", name)
			require.Equal(t, want, got[name], "index %s", name)
		}
	})
}

func mysqlIndexes(t *testing.T, db *sql.DB) map[string]index {
	t.Helper()
	rows, err := db.QueryContext(t.Context(), `
		SELECT TABLE_NAME, INDEX_NAME, NON_UNIQUE, COLUMN_NAME
		FROM information_schema.STATISTICS
		WHERE TABLE_SCHEMA = DATABASE() AND INDEX_NAME <> 'PRIMARY'
		ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX`)
	require.NoError(t, err)
	defer rows.Close()
	got := map[string]index{}
	for rows.Next() {
		var table, name, column string
		var nonUnique int
		require.NoError(t, rows.Scan(&table, &name, &nonUnique, &column))
		ix, seen := got[name]
		if seen {
			ix.Columns += "," + column
		} else {
			ix = index{Table: table, Unique: nonUnique == 0, Columns: column}
		}
		got[name] = ix
	}
	require.NoError(t, rows.Err())
	return got
}

func sqliteIndexes(t *testing.T, db *sql.DB) map[string]index {
	t.Helper()
	ctx := t.Context()
	rows, err := db.QueryContext(ctx, `SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL`)
	require.NoError(t, err)
	got := map[string]index{}
	for rows.Next() {
		var name, table, ddl string
		require.NoError(t, rows.Scan(&name, &table, &ddl))
		got[name] = index{Table: table, Unique: strings.HasPrefix(strings.ToUpper(ddl), "CREATE UNIQUE")}
	}
	require.NoError(t, rows.Err())
	rows.Close()
	for name, ix := range got {
		cols, err := db.QueryContext(ctx, `SELECT name FROM pragma_index_info(?) ORDER BY seqno`, name)
		require.NoError(t, err)
		var names []string
		for cols.Next() {
			var c string
			require.NoError(t, cols.Scan(&c))
			names = append(names, c)
		}
		require.NoError(t, cols.Err())
		cols.Close()
		ix.Columns = strings.Join(names, ",")
		got[name] = ix
	}
	return got
}

func TestMigrateIDsCompareByteForByte(t *testing.T) {
	t.Parallel()
	testdb.Dialects(t, func(t *testing.T, databaseURL string) {
		ctx := t.Context()
		if testdb.Dialect(databaseURL) == storage.DialectMySQL {
			// A production database usually has the server's default,
			// case-insensitive collation; the id columns must not inherit it.
			_, err := rawDB(t, databaseURL).ExecContext(ctx,
				`ALTER DATABASE `+mysqlDBName(t, databaseURL)+` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci`)
			require.NoError(t, err)
		}
		store := openStore(t, databaseURL)
		now := time.Now().UTC()
		runIDs := []string{"wfr_Order-1", "wfr_order-1", "wfr_ORDER-1", "wfr_órder-1", "wfr_ö", "wfr_o\u0308"}
		for _, id := range runIDs {
			require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, CreatedAt: now, UpdatedAt: now}), id)
		}
		for _, id := range runIDs {
			run, err := store.RunGet(ctx, id, false)
			require.NoError(t, err, id)
			require.Equal(t, id, run.WorkflowRunID)
		}
		_, err := store.RunGet(ctx, "wfr_oRDER-1", false)
		require.ErrorIs(t, err, storage.ErrNotFound)

		// Event ids and step names too.
		runID := "wfr_order-1"
		for _, ev := range []string{"Paid", "paid"} {
			require.NoError(t, store.StepInsert(ctx, &storage.StepRecord{RunID: runID, StepName: ev, Type: models.StepNotify, EventID: ev, CreatedAt: now}))
			require.NoError(t, store.LookbackEventInsert(ctx, &models.LookbackEvent{WorkflowRunID: runID, EventID: ev, EventData: []byte(`"` + ev + `"`), MessageID: "msg_" + ev, CreatedAt: now, ExpiresAt: now.Add(time.Hour)}))
		}
		got, err := store.LookbackEventConsume(ctx, runID, "paid", now)
		require.NoError(t, err)
		require.NotNil(t, got)
		require.Equal(t, "paid", got.EventID)
		require.JSONEq(t, `"paid"`, string(got.EventData))

		if testdb.Dialect(databaseURL) != storage.DialectMySQL {
			return
		}
		db := rawDB(t, databaseURL)
		for _, col := range []struct{ table, column string }{
			{"runs", "id"}, {"waiters", "event_id"}, {"waiters", "run_id"}, {"waiters", "step_name"},
			{"lookback_events", "run_id"}, {"lookback_events", "event_id"}, {"steps", "run_id"}, {"steps", "step_name"}, {"steps", "event_id"},
		} {
			// VARBINARY: no collation at all, every byte compared (a _bin
			// collation would still ignore trailing spaces).
			var dataType string
			require.NoError(t, db.QueryRowContext(ctx, `
				SELECT DATA_TYPE FROM information_schema.COLUMNS
				WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?`, col.table, col.column).Scan(&dataType))
			require.Equal(t, "varbinary", dataType, "%s.%s", col.table, col.column)
		}
	})
}

// Byte for byte includes trailing spaces: "order-1" and "order-1 " are two
// ids. MySQL's PAD SPACE collations (utf8mb4_bin among them) compare them as
// equal, in the unique key and in every WHERE.
func TestMigrateIDsTrailingSpaceDistinct(t *testing.T) {
	t.Parallel()
	testdb.Dialects(t, func(t *testing.T, databaseURL string) {
		ctx := t.Context()
		store := openStore(t, databaseURL)
		now := time.Now().UTC()
		for _, id := range []string{"wfr_order-1", "wfr_order-1 "} {
			if err := store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, CreatedAt: now, UpdatedAt: now}); err != nil {
				t.Errorf("insert run %q: %v", id, err)
			}
		}
		if run, err := store.RunGet(ctx, "wfr_order-1  ", false); err == nil {
			t.Errorf("RunGet(%q) found run %q", "wfr_order-1  ", run.WorkflowRunID)
		}

		w := &models.Waiter{EventID: "paid ", State: models.WaiterWaiting, Deadline: now.Add(time.Hour), CreatedAt: now}
		require.NoError(t, store.WaiterInsert(ctx, w))
		ws, err := store.WaiterListWaiting(ctx, &storage.WaiterListWaitingParams{EventID: "paid", Now: now})
		require.NoError(t, err)
		if len(ws) != 0 {
			t.Errorf("a notify on %q reaches a waiter on %q", "paid", ws[0].EventID)
		}
		require.NoError(t, store.StepInsert(ctx, &storage.StepRecord{RunID: "wfr_order-1", StepName: "pay", Type: models.StepNotify, EventID: "paid", CreatedAt: now}))
		if err := store.StepInsert(ctx, &storage.StepRecord{RunID: "wfr_order-1", StepName: "pay ", Type: models.StepNotify, EventID: "paid", CreatedAt: now}); err != nil {
			t.Errorf("insert step %q after %q: %v", "pay ", "pay", err)
		}
	})
}

func TestOpenRejectsBadURLs(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	for _, u := range []string{"", "rendezvous.db", "postgres://localhost/x", "mysql://root@127.0.0.1:3306/"} {
		s, err := storage.Open(ctx, u, storage.Options{})
		require.Error(t, err, u)
		require.Nil(t, s, u)
	}
}

package storage_test

import (
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/storage"
)

var errCrash = errors.New("simulated crash")

// TestMigrateRecoversAfterCrashAtEveryStep stops the migrations after each
// statement of each migration in turn, as a crash would (on MySQL every DDL
// statement has committed by itself; on SQLite the whole run is one
// transaction and rolls back), then starts again: the second start must
// succeed and leave the very schema a clean run leaves.
func TestMigrateRecoversAfterCrashAtEveryStep(t *testing.T) {
	t.Parallel()
	require.NoError(t, storage.ParseMigrationSteps())
	testdb.Dialects(t, func(t *testing.T, databaseURL string) {
		dialect := testdb.Dialect(databaseURL)
		clean := rawDB(t, databaseURL)
		require.NoError(t, storage.MigrateFailingAfter(t.Context(), clean, dialect, nil))
		want := schemaOf(t, clean, dialect)

		counts := storage.MigrationStepCounts(dialect)
		versions := make([]int, 0, len(counts))
		for v := range counts {
			versions = append(versions, v)
		}
		slices.Sort(versions)
		for _, v := range versions {
			for n := 1; n <= counts[v]; n++ {
				t.Run(fmt.Sprintf("v%d-step%d", v, n), func(t *testing.T) {
					t.Parallel()
					u := testdb.SQLite(t)
					if dialect == storage.DialectMySQL {
						u = testdb.MySQL(t)
					}
					db := rawDB(t, u)
					err := storage.MigrateFailingAfter(t.Context(), db, dialect, func(version, step int) error {
						if version == v && step == n {
							return errCrash
						}
						return nil
					})
					require.ErrorIs(t, err, errCrash)
					if dialect == storage.DialectMySQL && n < counts[v] {
						// The point of the test: MySQL kept part of the migration.
						require.NotEqual(t, want, schemaOf(t, db, dialect))
					}

					s, err := storage.Open(t.Context(), u, storage.Options{})
					require.NoError(t, err, "restart after a crash in migration %d after step %d", v, n)
					require.NoError(t, s.Close())
					require.Equal(t, want, schemaOf(t, db, dialect))
				})
			}
		}
	})
}

func TestMigrationStepsRefuseUnrepeatableStatements(t *testing.T) {
	t.Parallel()
	for _, stmt := range []string{
		`CREATE TABLE runs (id INT)`,
		`ALTER TABLE runs DROP COLUMN label`,
		`ALTER TABLE runs ADD ended_at TEXT`,
		`DROP INDEX runs_ended ON runs`,
		`INSERT INTO runs VALUES (1)`,
	} {
		require.Error(t, storage.ParseMigrationStep(stmt), stmt)
	}
	for _, stmt := range []string{
		"CREATE TABLE IF NOT EXISTS runs (\n id INT)",
		`CREATE UNIQUE INDEX runs_id ON runs (id)`,
		`ALTER TABLE runs ADD COLUMN ended_at TEXT NULL`,
		`UPDATE runs SET ended_at = updated_at WHERE ended_at IS NULL`,
	} {
		require.NoError(t, storage.ParseMigrationStep(stmt), stmt)
	}
}

// schemaOf describes every table's columns and indexes, and the recorded
// migration versions, as lines to compare.
func schemaOf(t *testing.T, db *sql.DB, dialect string) []string {
	t.Helper()
	var queries []string
	if dialect == storage.DialectMySQL {
		queries = []string{
			`SELECT CONCAT_WS('|', 'column', TABLE_NAME, ORDINAL_POSITION, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE,
				COALESCE(COLUMN_DEFAULT, 'no default'), COALESCE(COLLATION_NAME, '-'), EXTRA)
			FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()`,
			`SELECT CONCAT_WS('|', 'index', TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX, COLUMN_NAME, NON_UNIQUE)
			FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()`,
			`SELECT CONCAT_WS('|', 'table', TABLE_NAME, ENGINE, TABLE_COLLATION)
			FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()`,
		}
	} else {
		queries = []string{
			`SELECT type || '|' || name || '|' || tbl_name || '|' || COALESCE(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'`,
		}
	}
	queries = append(queries, `SELECT CONCAT('migration|', version, '|', name) FROM schema_migrations`)
	if dialect == storage.DialectSQLite {
		queries[len(queries)-1] = `SELECT 'migration|' || version || '|' || name FROM schema_migrations`
	}
	var out []string
	for _, q := range queries {
		rows, err := db.QueryContext(t.Context(), q)
		require.NoError(t, err)
		for rows.Next() {
			var line string
			require.NoError(t, rows.Scan(&line))
			out = append(out, strings.Join(strings.Fields(line), " "))
		}
		require.NoError(t, rows.Err())
		rows.Close()
	}
	slices.Sort(out)
	return out
}

package storage

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// migration is one versioned schema change, written out for each dialect.
// Migrations are append-only: never edit one that has shipped, add the next.
type migration struct {
	version int
	name    string
	mysql   []string
	sqlite  []string
}

// Indexes and the queries they serve (every hot path has one):
//
//	runs            UNIQUE(id)                         trigger, run lock (SELECT … FOR UPDATE), workflowRun
//	runs            (state, seq), (label, seq)         workflowRuns filtered by state / label, newest first
//	waiters         (event_id, state, deadline)        broadcast notify, waiters(eventId)
//	waiters         (run_id, event_id, state)          targeted notify; its prefix (run_id) serves run.waiters and cancel
//	waiters         (state, deadline)                  the timeout sweeper, the oldest waiting deadline, counting waiters by state
//	runs            (state, seq)                       also: counting runs by state (stats)
//	lookback_events (run_id, event_id, consumed, seq)  waitForEvent consuming the oldest lookback event; run.lookbackEvents
//	lookback_events (expires_at)                       the retention purge
//	lookback_events (consumed, expires_at)             counting pending lookback events (metrics, stats)
//	steps           UNIQUE(run_id, step_name)          durable steps: re-attach (run, step) and notify dedup; run.steps
//	notifications   UNIQUE(message_id)                 a notified waiter's event data (one row per notify, not per waiter)
//	waiters         (replica_id, state)                reaping waiters whose replica died
//	replicas        PRIMARY(id)                        the lease check in every notify
//	runs            (ended_at, state)                  the retention purge: ended runs, oldest end first (NULL while started);
//	                                                   runs ended by an older binary, without ended_at (NULL, ended state)
//	waiters         (run_id, state, ended_at)          the purge of waiters without a run (run_id NULL), per ended state,
//	                                                   oldest end first; a run's WAITING waiters when it ends
//	waiters         (message_id)                       the purge: is a notification still referred to by a waiter
//	outbox          (state, next_attempt_at)           the delivery loop claiming due rows; counting by state
//	outbox          (run_id)                           run.dispatch, ending a run (cancel its delivery)
//	outbox          UNIQUE(id)                         recording an attempt's result by delivery id
//	outbox          (waiter_seq)                       a waiter's callback: made due when the waiter ends; waiter.callback
//	runs            (start_pending, label, seq)        runsToStart: the oldest runs of a label not yet acked
//	runs            (claimed_by)                       giving back a worker's runs when its subscription ends
//	service_keys    PRIMARY(name)                      the completion URL key, read once at start
//
// runs.lock_version is written, never read: on Galera, which replicates
// writes and not row locks, the run lock bumps it (see bumpRunSQL), so
// that two transactions that lock the same run on different nodes conflict
// at certification.
//
// Ids, event ids, step names and labels are VARBINARY on MySQL: compared byte
// for byte, trailing spaces included (utf8mb4_bin pads spaces, so "a" and
// "a " would be the same id there). They hold at most 256 bytes of caller
// text (run ids 4 more, for the wfr_ prefix).
var migrations = []migration{
	{
		version: 1,
		name:    "runs, waiters, lookback events, steps, notifications",
		mysql: []string{
			`CREATE TABLE IF NOT EXISTS runs (
				seq BIGINT NOT NULL AUTO_INCREMENT,
				id VARBINARY(300) NOT NULL,
				state VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				body LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
				label VARBINARY(256) NULL,
				result LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
				created_at DATETIME(6) NOT NULL,
				updated_at DATETIME(6) NOT NULL,
				PRIMARY KEY (seq),
				UNIQUE KEY runs_id (id),
				KEY runs_state_seq (state, seq),
				KEY runs_label_seq (label, seq)
			) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
			`CREATE TABLE IF NOT EXISTS waiters (
				seq BIGINT NOT NULL AUTO_INCREMENT,
				event_id VARBINARY(256) NOT NULL,
				run_id VARBINARY(300) NULL,
				step_name VARBINARY(256) NULL,
				state VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				deadline DATETIME(6) NOT NULL,
				created_at DATETIME(6) NOT NULL,
				ended_at DATETIME(6) NULL,
				message_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
				event_data LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
				PRIMARY KEY (seq),
				KEY waiters_event_state (event_id, state, deadline),
				KEY waiters_run_event_state (run_id, event_id, state),
				KEY waiters_state_deadline (state, deadline)
			) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
			`CREATE TABLE IF NOT EXISTS lookback_events (
				seq BIGINT NOT NULL AUTO_INCREMENT,
				run_id VARBINARY(300) NOT NULL,
				event_id VARBINARY(256) NOT NULL,
				event_data LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
				message_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				consumed BOOLEAN NOT NULL DEFAULT FALSE,
				created_at DATETIME(6) NOT NULL,
				expires_at DATETIME(6) NOT NULL,
				consumed_at DATETIME(6) NULL,
				PRIMARY KEY (seq),
				KEY lookback_run_event_consumed (run_id, event_id, consumed, seq),
				KEY lookback_expires (expires_at)
			) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
			`CREATE TABLE IF NOT EXISTS steps (
				seq BIGINT NOT NULL AUTO_INCREMENT,
				run_id VARBINARY(300) NOT NULL,
				step_name VARBINARY(256) NOT NULL,
				type VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				event_id VARBINARY(256) NOT NULL,
				waiter_seq BIGINT NULL,
				result LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
				created_at DATETIME(6) NOT NULL,
				completed_at DATETIME(6) NULL,
				PRIMARY KEY (seq),
				UNIQUE KEY steps_run_step (run_id, step_name)
			) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
			`CREATE TABLE IF NOT EXISTS notifications (
				seq BIGINT NOT NULL AUTO_INCREMENT,
				message_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				event_id VARBINARY(256) NOT NULL,
				event_data LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
				created_at DATETIME(6) NOT NULL,
				PRIMARY KEY (seq),
				UNIQUE KEY notifications_message (message_id)
			) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
		},
		sqlite: []string{
			`CREATE TABLE IF NOT EXISTS runs (
				seq INTEGER PRIMARY KEY AUTOINCREMENT,
				id TEXT NOT NULL,
				state TEXT NOT NULL,
				body BLOB NULL,
				label TEXT NULL,
				result BLOB NULL,
				created_at TEXT NOT NULL,
				updated_at TEXT NOT NULL
			)`,
			`CREATE UNIQUE INDEX runs_id ON runs (id)`,
			`CREATE INDEX runs_state_seq ON runs (state, seq)`,
			`CREATE INDEX runs_label_seq ON runs (label, seq)`,
			`CREATE TABLE IF NOT EXISTS waiters (
				seq INTEGER PRIMARY KEY AUTOINCREMENT,
				event_id TEXT NOT NULL,
				run_id TEXT NULL,
				step_name TEXT NULL,
				state TEXT NOT NULL,
				deadline TEXT NOT NULL,
				created_at TEXT NOT NULL,
				ended_at TEXT NULL,
				message_id TEXT NULL,
				event_data BLOB NULL
			)`,
			`CREATE INDEX waiters_event_state ON waiters (event_id, state, deadline)`,
			`CREATE INDEX waiters_run_event_state ON waiters (run_id, event_id, state)`,
			`CREATE INDEX waiters_state_deadline ON waiters (state, deadline)`,
			`CREATE TABLE IF NOT EXISTS lookback_events (
				seq INTEGER PRIMARY KEY AUTOINCREMENT,
				run_id TEXT NOT NULL,
				event_id TEXT NOT NULL,
				event_data BLOB NULL,
				message_id TEXT NOT NULL,
				consumed INTEGER NOT NULL DEFAULT 0,
				created_at TEXT NOT NULL,
				expires_at TEXT NOT NULL,
				consumed_at TEXT NULL
			)`,
			`CREATE INDEX lookback_run_event_consumed ON lookback_events (run_id, event_id, consumed, seq)`,
			`CREATE INDEX lookback_expires ON lookback_events (expires_at)`,
			`CREATE TABLE IF NOT EXISTS steps (
				seq INTEGER PRIMARY KEY AUTOINCREMENT,
				run_id TEXT NOT NULL,
				step_name TEXT NOT NULL,
				type TEXT NOT NULL,
				event_id TEXT NOT NULL,
				waiter_seq INTEGER NULL,
				result BLOB NULL,
				created_at TEXT NOT NULL,
				completed_at TEXT NULL
			)`,
			`CREATE UNIQUE INDEX steps_run_step ON steps (run_id, step_name)`,
			`CREATE TABLE IF NOT EXISTS notifications (
				seq INTEGER PRIMARY KEY AUTOINCREMENT,
				message_id TEXT NOT NULL,
				event_id TEXT NOT NULL,
				event_data BLOB NULL,
				created_at TEXT NOT NULL
			)`,
			`CREATE UNIQUE INDEX notifications_message ON notifications (message_id)`,
		},
	},
	{
		version: 2,
		name:    "replica leases for waiters without a step",
		mysql: []string{
			`CREATE TABLE IF NOT EXISTS replicas (
				id VARBINARY(64) NOT NULL,
				lease_until DATETIME(6) NOT NULL,
				PRIMARY KEY (id)
			) ENGINE=InnoDB`,
			`ALTER TABLE waiters ADD COLUMN replica_id VARBINARY(64) NULL`,
			`CREATE INDEX waiters_replica_state ON waiters (replica_id, state)`,
		},
		sqlite: []string{
			`CREATE TABLE IF NOT EXISTS replicas (
				id TEXT NOT NULL PRIMARY KEY,
				lease_until TEXT NOT NULL
			)`,
			`ALTER TABLE waiters ADD COLUMN replica_id TEXT NULL`,
			`CREATE INDEX waiters_replica_state ON waiters (replica_id, state)`,
		},
	},
	{
		version: 3,
		name:    "index for counting pending lookback events",
		mysql: []string{
			`CREATE INDEX lookback_consumed_expires ON lookback_events (consumed, expires_at)`,
		},
		sqlite: []string{
			`CREATE INDEX lookback_consumed_expires ON lookback_events (consumed, expires_at)`,
		},
	},
	{
		version: 4,
		name:    "retention: when a run ended, and indexes for purging",
		mysql: []string{
			`ALTER TABLE runs ADD COLUMN ended_at DATETIME(6) NULL`,
			`UPDATE runs SET ended_at = updated_at WHERE state <> 'RUN_STARTED' AND ended_at IS NULL`,
			`CREATE INDEX runs_ended ON runs (ended_at, state)`,
			`CREATE INDEX waiters_run_state_ended ON waiters (run_id, state, ended_at)`,
			`CREATE INDEX waiters_message ON waiters (message_id)`,
		},
		sqlite: []string{
			`ALTER TABLE runs ADD COLUMN ended_at TEXT NULL`,
			`UPDATE runs SET ended_at = updated_at WHERE state <> 'RUN_STARTED' AND ended_at IS NULL`,
			`CREATE INDEX runs_ended ON runs (ended_at, state)`,
			`CREATE INDEX waiters_run_state_ended ON waiters (run_id, state, ended_at)`,
			`CREATE INDEX waiters_message ON waiters (message_id)`,
		},
	},
	{
		version: 5,
		name:    "galera: the run lock is a write",
		mysql: []string{
			`ALTER TABLE runs ADD COLUMN lock_version BIGINT NOT NULL DEFAULT 0`,
		},
		sqlite: []string{
			`ALTER TABLE runs ADD COLUMN lock_version INTEGER NOT NULL DEFAULT 0`,
		},
	},
	{
		version: 6,
		name:    "outbox (HTTP dispatch) and the hand-over of runs to workers",
		mysql: []string{
			`CREATE TABLE IF NOT EXISTS outbox (
				seq BIGINT NOT NULL AUTO_INCREMENT,
				id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				run_id VARBINARY(300) NULL,
				kind VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				url TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
				headers LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
				body LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
				state VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				attempts INT NOT NULL DEFAULT 0,
				max_attempts INT NOT NULL,
				next_attempt_at DATETIME(6) NOT NULL,
				claim VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL,
				last_status INT NULL,
				last_error VARCHAR(512) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
				created_at DATETIME(6) NOT NULL,
				ended_at DATETIME(6) NULL,
				PRIMARY KEY (seq),
				UNIQUE KEY outbox_id (id),
				KEY outbox_state_due (state, next_attempt_at),
				KEY outbox_run (run_id)
			) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
			`ALTER TABLE runs ADD COLUMN start_pending BOOLEAN NOT NULL DEFAULT FALSE`,
			`ALTER TABLE runs ADD COLUMN claimed_by VARBINARY(64) NULL`,
			`ALTER TABLE runs ADD COLUMN claim_until DATETIME(6) NULL`,
			`ALTER TABLE runs ADD COLUMN claimed_at DATETIME(6) NULL`,
			`ALTER TABLE runs ADD COLUMN acked_at DATETIME(6) NULL`,
			`ALTER TABLE runs ADD COLUMN attempts INT NOT NULL DEFAULT 0`,
			`CREATE INDEX runs_start_pending ON runs (start_pending, label, seq)`,
			`CREATE INDEX runs_claimed_by ON runs (claimed_by)`,
		},
		sqlite: []string{
			`CREATE TABLE IF NOT EXISTS outbox (
				seq INTEGER PRIMARY KEY AUTOINCREMENT,
				id TEXT NOT NULL,
				run_id TEXT NULL,
				kind TEXT NOT NULL,
				url TEXT NOT NULL,
				headers BLOB NULL,
				body BLOB NOT NULL,
				state TEXT NOT NULL,
				attempts INTEGER NOT NULL DEFAULT 0,
				max_attempts INTEGER NOT NULL,
				next_attempt_at TEXT NOT NULL,
				claim TEXT NULL,
				last_status INTEGER NULL,
				last_error TEXT NULL,
				created_at TEXT NOT NULL,
				ended_at TEXT NULL
			)`,
			`CREATE UNIQUE INDEX outbox_id ON outbox (id)`,
			`CREATE INDEX outbox_state_due ON outbox (state, next_attempt_at)`,
			`CREATE INDEX outbox_run ON outbox (run_id)`,
			`ALTER TABLE runs ADD COLUMN start_pending INTEGER NOT NULL DEFAULT 0`,
			`ALTER TABLE runs ADD COLUMN claimed_by TEXT NULL`,
			`ALTER TABLE runs ADD COLUMN claim_until TEXT NULL`,
			`ALTER TABLE runs ADD COLUMN claimed_at TEXT NULL`,
			`ALTER TABLE runs ADD COLUMN acked_at TEXT NULL`,
			`ALTER TABLE runs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0`,
			`CREATE INDEX runs_start_pending ON runs (start_pending, label, seq)`,
			`CREATE INDEX runs_claimed_by ON runs (claimed_by)`,
		},
	},
	{
		version: 7,
		name:    "outbox: callbacks of waiters (waitForEventCallback)",
		mysql: []string{
			`ALTER TABLE outbox ADD COLUMN waiter_seq BIGINT NULL`,
			`CREATE INDEX outbox_waiter ON outbox (waiter_seq)`,
		},
		sqlite: []string{
			`ALTER TABLE outbox ADD COLUMN waiter_seq INTEGER NULL`,
			`CREATE INDEX outbox_waiter ON outbox (waiter_seq)`,
		},
	},
	{
		version: 8,
		name:    "service keys (the completion URL key shared by replicas)",
		mysql: []string{
			`CREATE TABLE IF NOT EXISTS service_keys (
				name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				secret VARCHAR(256) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
				created_at DATETIME(6) NOT NULL,
				PRIMARY KEY (name)
			) ENGINE=InnoDB`,
		},
		sqlite: []string{
			`CREATE TABLE IF NOT EXISTS service_keys (
				name TEXT NOT NULL PRIMARY KEY,
				secret TEXT NOT NULL,
				created_at TEXT NOT NULL
			)`,
		},
	},
}

// SchemaVersion is the newest migration this binary knows.
func SchemaVersion() int { return migrations[len(migrations)-1].version }

const migrationsTable = `schema_migrations`

// afterStep, when set (tests only), runs after each statement of a
// migration has been applied; an error stops the migration there, as a
// crash would.
type afterStep func(version, step int) error

// migrate applies the missing migrations. On MySQL it holds a named lock
// (GET_LOCK) on one connection for the whole run, so replicas starting
// together apply each migration once; SQLite has a single writer anyway.
// A database newer than this binary is refused rather than silently used.
//
// A migration may have been left half applied: MySQL commits every DDL
// statement by itself, so a crash between two statements of one migration
// keeps the first and not the second, with the migration unrecorded. Each
// statement is therefore a step that is skipped when its effect is already
// there (see stepDone), and a restart finishes the job. Why not a migration
// library with a dirty flag (golang-migrate): a dirty database stops every
// replica from starting until an operator forces a version by hand, while
// here the next start repairs it by itself. SQLite runs the whole set in one
// transaction (its DDL is transactional), so there it is all or nothing.
func migrate(ctx context.Context, db *sql.DB, dialect string, after afterStep) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer conn.Close()

	if dialect == DialectMySQL {
		var got sql.NullInt64
		if err := conn.QueryRowContext(ctx, `SELECT GET_LOCK(CONCAT('rdv_migrate:', SHA1(DATABASE())), 120)`).Scan(&got); err != nil {
			return fmt.Errorf("migrate: take lock: %w", err)
		}
		if !got.Valid || got.Int64 != 1 {
			return fmt.Errorf("migrate: another process held the migration lock for 120s")
		}
		defer conn.ExecContext(context.WithoutCancel(ctx), `SELECT RELEASE_LOCK(CONCAT('rdv_migrate:', SHA1(DATABASE())))`)
		release, err := galeraMigrationLock(ctx, conn)
		if err != nil {
			return err
		}
		defer release()
	}

	create := `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER NOT NULL PRIMARY KEY, name VARCHAR(200) NOT NULL, applied_at VARCHAR(40) NOT NULL)`
	if _, err := conn.ExecContext(ctx, create); err != nil {
		return fmt.Errorf("migrate: create %s: %w", migrationsTable, err)
	}
	if dialect == DialectSQLite {
		// One write transaction for the whole run, taken before reading the
		// version, so two processes on one file cannot both apply it.
		if _, err := conn.ExecContext(ctx, `BEGIN IMMEDIATE`); err != nil {
			return fmt.Errorf("migrate: begin: %w", err)
		}
		if err := applyMigrations(ctx, conn, dialect, after); err != nil {
			conn.ExecContext(context.WithoutCancel(ctx), `ROLLBACK`)
			return err
		}
		if _, err := conn.ExecContext(ctx, `COMMIT`); err != nil {
			return fmt.Errorf("migrate: commit: %w", err)
		}
		return nil
	}
	// MySQL commits each DDL statement on its own; the named lock above
	// keeps other replicas out meanwhile.
	return applyMigrations(ctx, conn, dialect, after)
}

func applyMigrations(ctx context.Context, conn *sql.Conn, dialect string, after afterStep) error {
	var current int
	if err := conn.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&current); err != nil {
		return fmt.Errorf("migrate: read version: %w", err)
	}
	if current > SchemaVersion() {
		return fmt.Errorf("migrate: database schema is at version %d, newer than this binary's %d; upgrade the binary", current, SchemaVersion())
	}
	for _, m := range migrations {
		if m.version <= current {
			continue
		}
		for i, stmt := range m.statements(dialect) {
			st, err := parseStep(stmt)
			if err != nil {
				return fmt.Errorf("migrate %d (%s) step %d: %w", m.version, m.name, i+1, err)
			}
			done, err := st.done(ctx, conn, dialect)
			if err != nil {
				return fmt.Errorf("migrate %d (%s) step %d: look at the schema: %w", m.version, m.name, i+1, err)
			}
			if !done {
				if _, err := conn.ExecContext(ctx, stmt); err != nil {
					return fmt.Errorf("migrate %d (%s) step %d: %w", m.version, m.name, i+1, err)
				}
			}
			if after != nil {
				if err := after(m.version, i+1); err != nil {
					return fmt.Errorf("migrate %d (%s) step %d: %w", m.version, m.name, i+1, err)
				}
			}
		}
		if _, err := conn.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
			m.version, m.name, time.Now().UTC().Format(time.RFC3339Nano)); err != nil {
			return fmt.Errorf("migrate %d: record: %w", m.version, err)
		}
	}
	return nil
}

func (m migration) statements(dialect string) []string {
	if dialect == DialectSQLite {
		return m.sqlite
	}
	return m.mysql
}

// step is one migration statement and how to tell it has been applied.
// Only these forms are allowed, so that every step can be run again:
//
//	CREATE TABLE IF NOT EXISTS t …       idempotent by itself
//	CREATE [UNIQUE] INDEX i ON t …       skipped when t has an index named i
//	ALTER TABLE t ADD COLUMN c …         skipped when t has a column named c
//	UPDATE …                             must change nothing when run again (say so in its WHERE)
//
// Anything else is refused before it runs (TestMigrationStepsAreRecoverable
// checks every shipped statement), rather than risk a statement that fails
// or does twice what it did once when a restart repeats it.
type step struct {
	kind        string // "table", "index", "column", "data"
	table, name string
}

var (
	createTableRe = regexp.MustCompile(`^CREATE TABLE IF NOT EXISTS (\w+)\s`)
	createIndexRe = regexp.MustCompile(`^CREATE (?:UNIQUE )?INDEX (\w+) ON (\w+)\s`)
	addColumnRe   = regexp.MustCompile(`^ALTER TABLE (\w+) ADD COLUMN (\w+)\s`)
)

func parseStep(stmt string) (step, error) {
	s := strings.TrimSpace(stmt)
	if m := createTableRe.FindStringSubmatch(s); m != nil {
		return step{kind: "table", table: m[1]}, nil
	}
	if m := createIndexRe.FindStringSubmatch(s); m != nil {
		return step{kind: "index", table: m[2], name: m[1]}, nil
	}
	if m := addColumnRe.FindStringSubmatch(s); m != nil {
		return step{kind: "column", table: m[1], name: m[2]}, nil
	}
	if strings.HasPrefix(s, "UPDATE ") {
		return step{kind: "data"}, nil
	}
	return step{}, fmt.Errorf("statement %.60q is not one a restart can repeat safely (see step)", s)
}

// done says whether the step's effect is already in the schema. Tables
// (IF NOT EXISTS) and data steps are safe to repeat and report false.
func (st step) done(ctx context.Context, conn *sql.Conn, dialect string) (bool, error) {
	var q string
	args := []any{st.table, st.name}
	switch {
	case st.kind == "index" && dialect == DialectMySQL:
		q = `SELECT COUNT(*) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = ?`
	case st.kind == "index":
		q = `SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND name = ?`
	case st.kind == "column" && dialect == DialectMySQL:
		q = `SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?`
	case st.kind == "column":
		q = `SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = ?`
	default:
		return false, nil
	}
	var n int
	if err := conn.QueryRowContext(ctx, q, args...).Scan(&n); err != nil {
		return false, err
	}
	return n > 0, nil
}

// The migration lock on Galera. GET_LOCK is per node there: replicas
// starting at once on different nodes would all migrate, and all but one
// fail (they were seen to exit with "Duplicate column"). Galera does
// certify writes, so this lock is a row: whoever writes its name into it
// while it is free (or its lease ran out: a holder that died) holds it;
// two writes on different nodes conflict and one is refused. The lease is
// long enough for this project's migrations; a holder that dies makes the
// others wait until it runs out.
const (
	galeraLockLease = 2 * time.Minute
	galeraLockWait  = galeraLockLease + 30*time.Second
)

// galeraMigrationLock takes the lock when the server is a Galera node, and
// returns its release (a no-op elsewhere).
func galeraMigrationLock(ctx context.Context, conn *sql.Conn) (release func(), err error) {
	var wsrepOn int
	if conn.QueryRowContext(ctx, `SELECT @@wsrep_on`).Scan(&wsrepOn) != nil || wsrepOn != 1 {
		return func() {}, nil // MySQL has no wsrep_on; MariaDB without Galera says 0
	}
	if _, err := conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migration_lock (
		id INTEGER NOT NULL PRIMARY KEY, holder VARCHAR(64) NOT NULL, lease_until DATETIME(6) NOT NULL)`); err != nil {
		return nil, fmt.Errorf("migrate: create schema_migration_lock: %w", err)
	}
	var b [12]byte
	rand.Read(b[:])
	me := hex.EncodeToString(b[:])
	// Assignments run left to right: holder changes only when the lease
	// ran out, and the lease moves only for the holder.
	take := `INSERT INTO schema_migration_lock (id, holder, lease_until) VALUES (1, ?, UTC_TIMESTAMP(6) + INTERVAL ? SECOND)
		ON DUPLICATE KEY UPDATE holder = IF(lease_until < UTC_TIMESTAMP(6), VALUES(holder), holder),
			lease_until = IF(holder = VALUES(holder), VALUES(lease_until), lease_until)`
	deadline := time.Now().Add(galeraLockWait)
	for {
		var holder string
		_, err := conn.ExecContext(ctx, take, me, int(galeraLockLease/time.Second))
		if err == nil {
			err = conn.QueryRowContext(ctx, `SELECT holder FROM schema_migration_lock WHERE id = 1`).Scan(&holder)
			if errors.Is(err, sql.ErrNoRows) {
				// The holder released it (deleted the row) between our
				// write, which found it held, and this read: it is free,
				// so try again.
				err = nil
			}
		}
		if err != nil && !errors.Is(classify(err), errRetryable) {
			return nil, fmt.Errorf("migrate: take the Galera lock: %w", err)
		}
		if err == nil && holder == me {
			return func() {
				conn.ExecContext(context.WithoutCancel(ctx), `DELETE FROM schema_migration_lock WHERE id = 1 AND holder = ?`, me)
			}, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("migrate: another process held the Galera migration lock for %s", galeraLockWait)
		}
		// A certification conflict, or another holder: try again shortly.
		if err := backoff(ctx, 4); err != nil {
			return nil, err
		}
	}
}

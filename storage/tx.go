package storage

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"time"

	mysqldriver "github.com/go-sql-driver/mysql"
	"gorm.io/gorm"
)

// lazyTx is the connection pool GORM sees inside one MySQL transaction: a
// connection pinned for the transaction, on which START TRANSACTION travels
// in the same packet as the transaction's first statement
// ("START TRANSACTION; <first statement>", a multi-statement query), saving
// the round trip of a separate BEGIN in every transaction. The rest of the
// transaction, COMMIT and ROLLBACK are sent as usual, except that a last
// INSERT may take COMMIT along (insertCommit).
//
// Why it is sound:
//   - SQL injection stays impossible: the prefix is a constant, and the
//     statements are GORM's, built with placeholders; every value is a
//     parameter, escaped by the driver (interpolateParams) as before. The
//     DSN allows multi-statement queries only for this prefix; no caller
//     text ever becomes SQL.
//   - The server runs the statements of one query in order and stops at the
//     first error. If START TRANSACTION fails, nothing ran. If the first
//     statement fails after it, the error is returned like any statement
//     error and the caller rolls back (InTx always does on an error).
//   - Results: go-sql-driver answers a multi-statement Exec with the last
//     statement's RowsAffected and LastInsertId (START TRANSACTION's own OK
//     comes first), and a Query whose first result has no columns moves on
//     to the next result set by itself, so GORM reads the first statement's
//     rows and ids as if it had been sent alone.
//   - A connection the driver calls bad before anything reached the server
//     (driver.ErrBadConn) is replaced and the first statement sent again,
//     as database/sql does for a BEGIN. A connection whose COMMIT or
//     ROLLBACK failed, or that broke, never goes back to the pool with a
//     transaction open: it is discarded.
//   - A first statement with large arguments (see prefixLimit) is preceded
//     by its own START TRANSACTION, because the driver would prepare it on
//     the server instead of interpolating it, and a prepared statement
//     cannot hold two statements.
type lazyTx struct {
	db   *sql.DB
	conn *sql.Conn
	// ctx is the transaction's context, which COMMIT and ROLLBACK check
	// (GORM's TxCommitter has no context parameter).
	ctx   context.Context
	begun bool // START TRANSACTION was sent (perhaps with the first statement)
	// committed: insertCommit sent COMMIT with its INSERT, whatever the
	// answer; nothing may run in this transaction any more. commitErr is
	// that COMMIT's failure, which Commit reports again.
	committed bool
	commitErr error
	ended     bool // committed or rolled back; the connection is released
}

// errTxCommitted refuses a statement after the transaction committed with
// insertCommit: it would run outside the transaction.
var errTxCommitted = errors.New("transaction already committed with its last statement")

// commitFailed is the error of an insertCommit whose INSERT ran and whose
// COMMIT failed or was cut off: InTx treats it as a failed COMMIT.
type commitFailed struct{ err error }

func (c commitFailed) Error() string { return "commit: " + c.err.Error() }
func (c commitFailed) Unwrap() error { return c.err }

var (
	_ gorm.ConnPool    = (*lazyTx)(nil)
	_ gorm.TxCommitter = (*lazyTx)(nil)
)

const (
	beginSQL    = "START TRANSACTION"
	beginPrefix = beginSQL + "; "
	// prefixLimit bounds the interpolated size of a first statement sent
	// with the prefix: the driver interpolates only statements smaller than
	// its maxAllowedPacket (64 MiB by default) and prepares bigger ones on
	// the server. Below 1 MiB the statement is far from that; above it, one
	// round trip more does not matter.
	prefixLimit = 1 << 20
	// endTimeout bounds a ROLLBACK sent after the transaction's context
	// ended, so the connection can be cleaned instead of discarded.
	endTimeout = 5 * time.Second
	// commitTimeout bounds a COMMIT (or INSERT … COMMIT) once sent. It
	// ignores the caller's context, but not for ever: on a connection the
	// network black-holed (no reset, no answer) it would wait for good, and
	// with it the request and a subscription waiting on it. Past the bound
	// the outcome is unknown, as for a connection that broke.
	commitTimeout = 10 * time.Second
	// badConnRetries is how often a first statement is sent again on a new
	// connection after driver.ErrBadConn, like database/sql's own retries.
	badConnRetries = 2
)

// beginLazy pins a connection for a transaction; nothing is sent yet.
func beginLazy(ctx context.Context, db *sql.DB) (*lazyTx, error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return nil, err
	}
	return &lazyTx{db: db, conn: conn, ctx: ctx}, nil
}

// first sends the transaction's first statement, by send(prefix): with the
// prefix "START TRANSACTION; " when inline, or after a START TRANSACTION of
// its own with prefix "". A connection that was bad before anything was
// written is replaced and the statement sent again.
func (t *lazyTx) first(ctx context.Context, inline bool, send func(prefix string) error) error {
	for attempt := 0; ; attempt++ {
		var err error
		if inline {
			err = send(beginPrefix)
		} else if _, err = t.conn.ExecContext(ctx, beginSQL); err == nil {
			t.begun = true
			return send("")
		}
		if !errors.Is(err, driver.ErrBadConn) || attempt >= badConnRetries {
			// START TRANSACTION may have run: the caller rolls back.
			t.begun = true
			return err
		}
		// Nothing reached the server, and database/sql has closed the
		// connection: take another. (On failure t.conn stays the closed
		// one, whose every use returns sql.ErrConnDone.)
		conn, err := t.db.Conn(ctx)
		if err != nil {
			t.begun = true
			return err
		}
		t.conn = conn
	}
}

// fitsPrefix says whether query, interpolated, surely stays small enough for
// the driver to interpolate it rather than prepare it (escaping at most
// doubles a value).
func fitsPrefix(query string, args []any) bool {
	n := len(beginPrefix) + len(query)
	for _, a := range args {
		switch v := a.(type) {
		case int64, int, bool, nil, time.Time:
			n += 32
			continue
		case string:
			n += 2*len(v) + 2
			continue
		case []byte:
			n += 2*len(v) + 3
			continue
		}
		// Valuers (dbTime), pointers, named types: as the driver will see them.
		v, err := driver.DefaultParameterConverter.ConvertValue(a)
		if err != nil {
			return false // the driver will say what is wrong, on its own
		}
		switch v := v.(type) {
		case string:
			n += 2*len(v) + 2
		case []byte:
			n += 2*len(v) + 3
		default:
			n += 32
		}
	}
	return n <= prefixLimit
}

func (t *lazyTx) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	if t.committed {
		return nil, errTxCommitted
	}
	if t.begun {
		return t.conn.ExecContext(ctx, query, args...)
	}
	var res sql.Result
	err := t.first(ctx, fitsPrefix(query, args), func(prefix string) (err error) {
		res, err = t.conn.ExecContext(ctx, prefix+query, args...)
		return err
	})
	return res, err
}

func (t *lazyTx) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if t.committed {
		return nil, errTxCommitted
	}
	if t.begun {
		return t.conn.QueryContext(ctx, query, args...)
	}
	var rows *sql.Rows
	err := t.first(ctx, fitsPrefix(query, args), func(prefix string) (err error) {
		rows, err = t.conn.QueryContext(ctx, prefix+query, args...)
		return err
	})
	return rows, err
}

// QueryRowContext always sends a first statement with the prefix: a
// *sql.Row can neither carry the error of a separate START TRANSACTION nor
// be sent again. GORM uses it for Row(), whose queries carry no large values.
func (t *lazyTx) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	if t.committed {
		// A *sql.Row cannot carry errTxCommitted; running the query would
		// run it outside the transaction. A bug in the caller.
		panic(errTxCommitted)
	}
	if !t.begun {
		t.begun = true
		query = beginPrefix + query
	}
	return t.conn.QueryRowContext(ctx, query, args...)
}

// PrepareContext is for GORM's prepared-statement mode, which the store does
// not use; START TRANSACTION goes first, on its own.
func (t *lazyTx) PrepareContext(ctx context.Context, query string) (*sql.Stmt, error) {
	if t.committed {
		return nil, errTxCommitted
	}
	if !t.begun {
		if err := t.first(ctx, false, func(string) error { return nil }); err != nil {
			return nil, err
		}
	}
	return t.conn.PrepareContext(ctx, query)
}

// insertCommitSuffix follows the INSERT of insertCommit: the id it made, then
// the end of the transaction. With returning the INSERT answers the id
// itself (MariaDB ≥ 10.5), one statement less for the server.
func insertCommitSuffix(returning bool) string {
	if returning {
		return " RETURNING seq; COMMIT"
	}
	return "; SELECT LAST_INSERT_ID(); COMMIT"
}

// canInsertCommit says whether insertCommit can send insert with args in one
// query (see fitsPrefix: a bigger one would be prepared, and fail).
func (t *lazyTx) canInsertCommit(insert string, args []any) bool {
	return !t.committed && fitsPrefix(insert+insertCommitSuffix(false), args)
}

// insertCommit runs insert (one single-row INSERT into a table whose
// auto-increment key is seq), reads the id it made and commits, in one round
// trip ("INSERT … RETURNING seq; COMMIT" or "INSERT …; SELECT
// LAST_INSERT_ID(); COMMIT", preceded by START TRANSACTION when it is also
// the first statement); see insertCommitQuery.
func (t *lazyTx) insertCommit(ctx context.Context, insert string, args []any, returning bool) (int64, error) {
	var id int64
	err := t.insertCommitQuery(ctx, insert+insertCommitSuffix(returning), args, func(rows *sql.Rows) error {
		if rows.Next() {
			return rows.Scan(&id)
		}
		return nil
	})
	if err == nil && id <= 0 {
		err = t.failCommit(fmt.Errorf("no id from %q", insert))
	}
	return id, err
}

// insertCommitQuery sends query, which writes and ends with COMMIT, and
// hands its first result set to read. The server runs the statements in
// order and stops at the first error, so:
//   - a MySQL error answer before COMMIT's, or driver.ErrBadConn (nothing
//     was written), means COMMIT did not run: it is returned as a statement
//     error, and the caller rolls back;
//   - any other failure (the connection broke while the query was on its
//     way or its answer was being read), and any error in COMMIT's answer
//     or from read, is a COMMIT whose outcome is unknown or failed:
//     commitFailed.
//
// Like COMMIT it runs to its end once sent, whatever ctx does.
func (t *lazyTx) insertCommitQuery(ctx context.Context, query string, args []any, read func(*sql.Rows) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	defer cancel()
	var (
		rows *sql.Rows
		err  error
	)
	if t.begun {
		rows, err = t.conn.QueryContext(ctx, query, args...)
	} else {
		err = t.first(ctx, true, func(prefix string) (err error) {
			rows, err = t.conn.QueryContext(ctx, prefix+query, args...)
			return err
		})
	}
	// A MySQL error before COMMIT's own answer comes from a statement
	// before it, and the server ran nothing after that one. (An INSERT …
	// RETURNING reports its error after the columns of its result.)
	var me *mysqldriver.MySQLError
	if err != nil {
		if errors.As(err, &me) || errors.Is(err, driver.ErrBadConn) {
			return err
		}
		return t.failCommit(err) // COMMIT may have run: nothing more may
	}
	readErr := read(rows)
	if err := rows.Err(); err != nil {
		rows.Close()
		if errors.As(err, &me) {
			return err
		}
		return t.failCommit(err)
	}
	t.committed = true
	for rows.NextResultSet() { // COMMIT's answer
	}
	if err := errors.Join(readErr, rows.Err(), rows.Close()); err != nil {
		return t.failCommit(err)
	}
	return nil
}

// failCommit records that insertCommit's COMMIT failed or may have failed.
func (t *lazyTx) failCommit(err error) error {
	t.committed, t.commitErr = true, err
	return commitFailed{err}
}

// Commit commits and releases the connection. A transaction that never sent
// a statement has nothing to commit.
func (t *lazyTx) Commit() error {
	if t.ended {
		return sql.ErrTxDone
	}
	if t.committed && t.commitErr != nil {
		// The caller went on after insertCommit failed: say it again.
		t.Rollback()
		return t.commitErr
	}
	if !t.begun || t.committed {
		return t.release()
	}
	if err := t.ctx.Err(); err != nil {
		// Not sent: the transaction ends rolled back.
		t.Rollback()
		return err
	}
	// Once sent, COMMIT runs to its end whatever the context does, as
	// database/sql's Tx.Commit does: a cancel could only cut the answer
	// off and turn a commit that landed into an unknown one.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(t.ctx), commitTimeout)
	defer cancel()
	if _, err := t.conn.ExecContext(ctx, "COMMIT"); err != nil {
		// Whatever happened (a deadlock reported at commit rolled back; a
		// broken connection left it unknown), make sure no transaction
		// stays open on the connection.
		t.Rollback()
		return err
	}
	return t.release()
}

// Rollback rolls back and releases the connection, or discards the
// connection if the rollback fails. It is sent even after the transaction's
// context ended (with a bound of its own), so a canceled request does not
// cost a connection.
func (t *lazyTx) Rollback() error {
	if t.ended {
		return sql.ErrTxDone
	}
	if !t.begun {
		return t.release()
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(t.ctx), endTimeout)
	defer cancel()
	if _, err := t.conn.ExecContext(ctx, "ROLLBACK"); err != nil {
		t.discard()
		return err
	}
	return t.release()
}

func (t *lazyTx) release() error {
	t.ended = true
	err := t.conn.Close()
	if errors.Is(err, sql.ErrConnDone) {
		return nil // database/sql dropped it already (a bad connection)
	}
	return err
}

// discard closes the connection instead of returning it to the pool: its
// transaction's state is unknown. (A Raw function returning ErrBadConn is
// database/sql's way to drop a connection.)
func (t *lazyTx) discard() {
	t.ended = true
	t.conn.Raw(func(any) error { return driver.ErrBadConn })
	t.conn.Close()
}

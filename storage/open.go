package storage

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/glebarez/sqlite"
	mysqldriver "github.com/go-sql-driver/mysql"
	"gorm.io/driver/mysql"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"
)

// serverWaitTimeout is the MySQL session's wait_timeout (see mysqlDSN).
const serverWaitTimeout = 20 * time.Second

// Dialects.
const (
	DialectMySQL  = "mysql"
	DialectSQLite = "sqlite"
)

// Options tunes Open.
type Options struct {
	// MaxOpenConns caps the MySQL pool (SQLite always uses one connection).
	MaxOpenConns int
	// MaxTxAttempts bounds how often a transaction that hit a deadlock or a
	// lock-wait timeout is run again.
	MaxTxAttempts int
	// Observer hears about retried transactions and connection failures;
	// nil: nobody.
	Observer Observer
	Logger   *slog.Logger
}

// Open connects to the database named by a URL, mysql://user:pass@host:port/db?params
// or sqlite://path/to/file.db (sqlite://:memory: for a throwaway database),
// and applies any missing migrations.
func Open(ctx context.Context, databaseURL string, opts Options) (Store, error) {
	if opts.MaxTxAttempts <= 0 {
		opts.MaxTxAttempts = 10
	}
	if opts.MaxOpenConns <= 0 {
		opts.MaxOpenConns = 32
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Observer == nil {
		opts.Observer = nopObserver{}
	}
	scheme, rest, ok := strings.Cut(databaseURL, "://")
	if !ok {
		return nil, fmt.Errorf("DATABASE_URL %q: want mysql://… or sqlite://…", redactURL(databaseURL))
	}
	var (
		dialector gorm.Dialector
		dialect   string
		galera    bool
		dsn       string
	)
	switch scheme {
	case "mysql":
		var err error
		dsn, galera, err = mysqlDSN(ctx, databaseURL)
		if err != nil {
			return nil, err
		}
		dialect, dialector = DialectMySQL, mysql.New(mysql.Config{DSN: dsn})
	case "sqlite", "sqlite3":
		dialect, dialector = DialectSQLite, sqlite.Open(sqliteDSN(rest))
	default:
		return nil, fmt.Errorf("DATABASE_URL scheme %q: want mysql or sqlite", scheme)
	}

	db, err := gorm.Open(dialector, gormConfig())
	if err != nil {
		return nil, fmt.Errorf("open %s database: %w", dialect, classify(err))
	}
	sqlDB, err := db.DB()
	if err != nil {
		return nil, fmt.Errorf("open %s database: %w", dialect, err)
	}
	if dialect == DialectSQLite {
		// One connection: SQLite has one writer, and a single connection
		// makes every transaction serial, which is the per-run lock.
		sqlDB.SetMaxOpenConns(1)
	} else {
		sqlDB.SetMaxOpenConns(opts.MaxOpenConns)
		sqlDB.SetMaxIdleConns(opts.MaxOpenConns)
		sqlDB.SetConnMaxLifetime(30 * time.Minute)
		sqlDB.SetConnMaxIdleTime(serverWaitTimeout / 2)
	}
	if err := sqlDB.PingContext(ctx); err != nil {
		sqlDB.Close()
		return nil, fmt.Errorf("open %s database: %w", dialect, classify(err))
	}
	if err := migrate(ctx, sqlDB, dialect, nil); err != nil {
		sqlDB.Close()
		return nil, err
	}
	returning := false
	if d, ok := dialector.(*mysql.Dialector); ok {
		returning = mariaDBAtLeast(d.ServerVersion, 10, 5)
	}
	s := &gormStore{
		gormExecutor: gormExecutor{db: db, dialect: dialect, obs: opts.Observer, returning: returning, pool: sqlDB, maxIdle: opts.MaxOpenConns, galera: galera},
		sqlDB:        sqlDB,
		maxAttempts:  opts.MaxTxAttempts,
		log:          opts.Logger,
	}
	if dialect == DialectMySQL {
		// The lease's own pool (see gormStore.lease); it connects when
		// first used.
		ldb, err := gorm.Open(mysql.New(mysql.Config{DSN: dsn, SkipInitializeWithVersion: true}), gormConfig())
		if err != nil {
			sqlDB.Close()
			return nil, fmt.Errorf("open %s database: %w", dialect, classify(err))
		}
		lsql, err := ldb.DB()
		if err != nil {
			sqlDB.Close()
			return nil, fmt.Errorf("open %s database: %w", dialect, err)
		}
		lsql.SetMaxOpenConns(1)
		lsql.SetMaxIdleConns(1)
		lsql.SetConnMaxLifetime(30 * time.Minute)
		lsql.SetConnMaxIdleTime(serverWaitTimeout / 2)
		s.lease = &gormExecutor{db: ldb, dialect: dialect, obs: opts.Observer, returning: returning, pool: lsql, maxIdle: 1, galera: galera}
	}
	return s, nil
}

func gormConfig() *gorm.Config {
	return &gorm.Config{
		SkipDefaultTransaction: true, // the engine draws its own transaction boundaries
		Logger:                 logger.Discard,
		NowFunc:                func() time.Time { return time.Now().UTC() },
	}
}

// mysqlDSN turns a mysql:// URL into a go-sql-driver DSN: times parsed as
// UTC, the session in UTC and READ COMMITTED (row locks only, no gap locks:
// correctness comes from the run row lock and compare-and-set, and gap locks
// would only add deadlocks), parameters interpolated client side so a
// statement costs one round trip instead of prepare/execute/close, and
// multi-statement queries allowed (see lazyTx).
//
// On a Galera node (wsrep_on), sessions get wsrep_sync_wait=15 unless the
// URL sets it: every statement first waits until the node has applied what
// the cluster committed before it, so a run created through one node is
// seen by the next request on another (without it, a notify sent right
// after a trigger, through another node, could answer NOT_FOUND). The
// second result says whether the server is a Galera node.
func mysqlDSN(ctx context.Context, databaseURL string) (string, bool, error) {
	u, err := url.Parse(databaseURL)
	if err != nil {
		return "", false, fmt.Errorf("DATABASE_URL: %w", err)
	}
	cfg := mysqldriver.NewConfig()
	cfg.Net = "tcp"
	cfg.Addr = u.Host
	if u.Port() == "" {
		cfg.Addr = u.Hostname() + ":3306"
	}
	if u.User != nil {
		cfg.User = u.User.Username()
		cfg.Passwd, _ = u.User.Password()
	}
	cfg.DBName = strings.TrimPrefix(u.Path, "/")
	if cfg.DBName == "" {
		return "", false, fmt.Errorf("DATABASE_URL %q: no database name", redactURL(databaseURL))
	}
	cfg.ParseTime = true
	cfg.Loc = time.UTC
	cfg.InterpolateParams = true
	// For the START TRANSACTION that a transaction sends with its first
	// statement (lazyTx). Every value is still a parameter escaped by the
	// driver; no SQL is ever built from caller text.
	cfg.MultiStatements = true
	cfg.Params = map[string]string{"time_zone": "'+00:00'"}
	cfg.Collation = "utf8mb4_bin"
	for k, vs := range u.Query() {
		if len(vs) > 0 {
			cfg.Params[k] = vs[0]
		}
	}
	// MySQL 8 and MariaDB ≥ 11.1 call the variable transaction_isolation;
	// MariaDB 10.x only knows tx_isolation. Ask once which one this server has.
	probe, err := sql.Open("mysql", cfg.FormatDSN())
	if err != nil {
		return "", false, fmt.Errorf("DATABASE_URL: %w", err)
	}
	defer probe.Close()
	isolationVar := "transaction_isolation"
	var level string
	if err := probe.QueryRowContext(ctx, `SELECT @@transaction_isolation`).Scan(&level); err != nil {
		if err2 := probe.QueryRowContext(ctx, `SELECT @@tx_isolation`).Scan(&level); err2 != nil {
			return "", false, fmt.Errorf("connect to MySQL at %s: %w", cfg.Addr, classify(err))
		}
		isolationVar = "tx_isolation"
	}
	// A dial to a host the network dropped out of waits for the kernel
	// (minutes) unless bounded; the pool also dials on its own, with no
	// deadline of ours.
	cfg.Timeout = 10 * time.Second
	if _, set := cfg.Params["wait_timeout"]; !set {
		// A client cut off from the server by a dead network path (no
		// reset) leaves its transaction open on the server, holding its row
		// locks (a run's, stopping every notify and wait of that run) until
		// the server gives up on the connection: after wait_timeout of
		// silence, 8 hours by default. Our transactions never wait on
		// anything but the database, so a connection silent for this long
		// in a transaction is dead. The pool retires idle connections
		// before the server would (SetConnMaxIdleTime in Open).
		cfg.Params["wait_timeout"] = strconv.Itoa(int(serverWaitTimeout / time.Second))
	}
	if _, set := cfg.Params[isolationVar]; !set {
		cfg.Params[isolationVar] = "'READ-COMMITTED'"
	}
	// MySQL has no wsrep_on: an error here means no Galera.
	var wsrepOn int
	galera := probe.QueryRowContext(ctx, `SELECT @@wsrep_on`).Scan(&wsrepOn) == nil && wsrepOn == 1
	if _, set := cfg.Params["wsrep_sync_wait"]; galera && !set {
		cfg.Params["wsrep_sync_wait"] = "15"
	}
	if err := refuseMultiPrimary(ctx, probe, cfg.Addr); err != nil {
		return "", false, err
	}
	return cfg.FormatDSN(), galera, nil
}

// refuseMultiPrimary fails when the server is a member of a MySQL Group
// Replication group running in multi-primary mode. Like Galera, it does not
// replicate row locks (a SELECT … FOR UPDATE on one member does not block
// another), but Rendezvous makes its run lock a write, and retries a
// certification failure, only on Galera: on a multi-primary group it would
// lose notifications in the notify-vs-wait race. Single-primary mode,
// pointed at the primary, is one MySQL. A server without the plugin (and
// MariaDB) does not know the variable: nothing to refuse.
func refuseMultiPrimary(ctx context.Context, probe *sql.DB, addr string) error {
	var single int
	if probe.QueryRowContext(ctx, `SELECT @@group_replication_single_primary_mode`).Scan(&single) != nil || single != 0 {
		return nil
	}
	var state string
	err := probe.QueryRowContext(ctx, `SELECT MEMBER_STATE FROM performance_schema.replication_group_members WHERE MEMBER_ID = @@server_uuid`).Scan(&state)
	if err != nil || state == "OFFLINE" {
		return nil // not in a group (no row), or left it
	}
	return fmt.Errorf("DATABASE_URL: %s is a member (%s) of a MySQL Group Replication group in multi-primary mode, which Rendezvous does not support: it does not replicate row locks, and notifications could be lost; run the group in single-primary mode and point every replica at the primary", addr, state)
}

func sqliteDSN(path string) string {
	if path == "" || path == ":memory:" {
		// Private to this store, lives as long as its single connection.
		return ":memory:?_pragma=busy_timeout(10000)"
	}
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	return path + sep + "_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)"
}

// redactURL hides a password in a database URL for messages and logs.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	if _, has := u.User.Password(); has {
		u.User = url.UserPassword(u.User.Username(), "xxxxx")
	}
	return u.String()
}

// mariaDBAtLeast says whether a server version ("10.11.19-MariaDB-0+deb12u1")
// is MariaDB major.minor or later.
func mariaDBAtLeast(version string, major, minor int) bool {
	if !strings.Contains(version, "MariaDB") {
		return false
	}
	var ma, mi int
	if _, err := fmt.Sscanf(version, "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

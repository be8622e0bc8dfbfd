// Package testdb gives each test a database of its own: a fresh MySQL
// database (created on the server named by RENDEZVOUS_TEST_MYSQL, dropped
// after the test) or a fresh SQLite file. When MySQL cannot be reached the
// MySQL half of the suite is skipped, unless RENDEZVOUS_REQUIRE_MYSQL=1, as
// in CI, turns that into a failure.
package testdb

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// DefaultMySQL is used when RENDEZVOUS_TEST_MYSQL is unset.
const DefaultMySQL = "mysql://root@127.0.0.1:3306/test"

// Env names.
const (
	EnvMySQL        = "RENDEZVOUS_TEST_MYSQL"
	EnvRequireMySQL = "RENDEZVOUS_REQUIRE_MYSQL"
)

// AdminURL is the MySQL server the tests use.
func AdminURL(getenv func(string) string) string {
	if v := getenv(EnvMySQL); v != "" {
		return v
	}
	return DefaultMySQL
}

// Ping opens the MySQL server at u and checks that it answers.
func Ping(ctx context.Context, u string) error {
	db, err := openAdmin(u)
	if err != nil {
		return err
	}
	defer db.Close()
	return db.PingContext(ctx)
}

func openAdmin(u string) (*sql.DB, error) {
	p, err := url.Parse(u)
	if err != nil || p.Scheme != "mysql" {
		return nil, fmt.Errorf("%s: want mysql://user:pass@host:port/db", u)
	}
	cfg := mysql.NewConfig()
	cfg.Net, cfg.Addr = "tcp", p.Host
	if p.User != nil {
		cfg.User = p.User.Username()
		cfg.Passwd, _ = p.User.Password()
	}
	cfg.Timeout = 3 * time.Second
	return sql.Open("mysql", cfg.FormatDSN())
}

var (
	probeOnce sync.Once
	probeErr  error
)

// MySQL returns the URL of a new, empty MySQL database that is dropped when
// the test ends, or skips the test when no MySQL is reachable.
func MySQL(t testing.TB) string {
	t.Helper()
	admin := AdminURL(getenv)
	probeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		probeErr = Ping(ctx, admin)
	})
	if probeErr != nil {
		if getenv(EnvRequireMySQL) == "1" {
			t.Fatalf("MySQL required (%s=1) but not reachable at %s: %v", EnvRequireMySQL, admin, probeErr)
		}
		t.Skipf("MySQL not reachable at %s (%v): skipped; set %s to a reachable server", admin, probeErr, EnvMySQL)
	}
	db, err := openAdmin(admin)
	if err != nil {
		t.Fatal(err)
	}
	var b [6]byte
	rand.Read(b[:])
	name := "rdv_test_" + hex.EncodeToString(b[:])
	if _, err := db.Exec("CREATE DATABASE " + name + " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"); err != nil {
		db.Close()
		t.Fatalf("create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		defer db.Close()
		if _, err := db.Exec("DROP DATABASE IF EXISTS " + name); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	p, _ := url.Parse(admin)
	p.Path = "/" + name
	return p.String()
}

// SQLite returns the URL of a new SQLite file in the test's temp dir.
func SQLite(t testing.TB) string {
	return "sqlite://" + filepath.Join(t.TempDir(), "rendezvous.db")
}

// Dialects runs fn once per database, as parallel subtests named sqlite and mysql.
func Dialects(t *testing.T, fn func(t *testing.T, databaseURL string)) {
	t.Helper()
	t.Run("sqlite", func(t *testing.T) {
		t.Parallel()
		fn(t, SQLite(t))
	})
	t.Run("mysql", func(t *testing.T) {
		t.Parallel()
		fn(t, MySQL(t))
	})
}

// Dialect names the dialect of a database URL.
func Dialect(databaseURL string) string {
	scheme, _, _ := strings.Cut(databaseURL, "://")
	return scheme
}

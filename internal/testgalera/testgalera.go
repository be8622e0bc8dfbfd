// Package testgalera gives a test a database on the three-node MariaDB
// Galera cluster of scripts/galera: one database (created through node 1,
// replicated to all), named by three URLs, one per node.
//
// The cluster is used when it answers on its ports. When it does not:
// RENDEZVOUS_TEST_GALERA=1 starts it (scripts/galera start; it is left
// running for the next tests, `scripts/galera stop` stops it);
// RENDEZVOUS_REQUIRE_GALERA=1 (CI) turns a missing cluster into a failure;
// otherwise the test is skipped with a message saying how to run it.
package testgalera

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// Env names.
const (
	EnvStart   = "RENDEZVOUS_TEST_GALERA"
	EnvRequire = "RENDEZVOUS_REQUIRE_GALERA"
)

// Nodes is how many nodes the cluster has; node n (1-based) answers MySQL
// on 127.0.0.1:3310+n (the ports of scripts/galera).
const Nodes = 3

// Addr is the MySQL address of node n.
func Addr(n int) string { return fmt.Sprintf("127.0.0.1:%d", 3310+n) }

// Script is the path of scripts/galera, found from the working directory
// upwards (tests run in their package's directory).
func Script() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		p := filepath.Join(dir, "scripts", "galera")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("scripts/galera not found above the working directory")
		}
		dir = parent
	}
}

// Run runs scripts/galera with the arguments (start, kill 2, restart 2…).
func Run(ctx context.Context, args ...string) error {
	script, err := Script()
	if err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, script, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("scripts/galera %v: %w: %s", args, err, out)
	}
	return nil
}

func open(addr string) (*sql.DB, error) {
	cfg := mysql.NewConfig()
	cfg.Net, cfg.Addr, cfg.User = "tcp", addr, "root"
	cfg.Timeout = 3 * time.Second
	return sql.Open("mysql", cfg.FormatDSN())
}

// ping says whether every node answers and is Synced in a cluster of three.
func ping(ctx context.Context) error {
	for n := 1; n <= Nodes; n++ {
		db, err := open(Addr(n))
		if err != nil {
			return err
		}
		var name, state, size string
		err = db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'wsrep_local_state_comment'").Scan(&name, &state)
		if err == nil {
			err = db.QueryRowContext(ctx, "SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'").Scan(&name, &size)
		}
		db.Close()
		if err != nil {
			return fmt.Errorf("node %d (%s): %w", n, Addr(n), err)
		}
		if state != "Synced" || size != fmt.Sprint(Nodes) {
			return fmt.Errorf("node %d (%s): state %s, cluster size %s", n, Addr(n), state, size)
		}
	}
	return nil
}

var (
	upOnce sync.Once
	upErr  error
)

// Ready returns nil when the cluster is up (starting it under
// RENDEZVOUS_TEST_GALERA=1), else why not.
func Ready() error {
	upOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		upErr = ping(ctx)
		cancel()
		if upErr == nil || os.Getenv(EnvStart) != "1" {
			return
		}
		ctx, cancel = context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		if err := Run(ctx, "start"); err != nil {
			upErr = err
			return
		}
		upErr = ping(ctx)
	})
	return upErr
}

// Require skips the test (fails it under RENDEZVOUS_REQUIRE_GALERA=1)
// when the cluster is not up.
func Require(t testing.TB) {
	t.Helper()
	if err := Ready(); err != nil {
		if os.Getenv(EnvRequire) == "1" {
			t.Fatalf("Galera cluster required (%s=1) but not ready: %v", EnvRequire, err)
		}
		t.Skipf("no Galera cluster (%v): skipped; run scripts/galera start, or set %s=1 to have the test start it", err, EnvStart)
	}
}

// Database creates a fresh database on the cluster, dropped when the test
// ends, and returns its URL on each node (index 0 is node 1).
func Database(t testing.TB) []string {
	t.Helper()
	Require(t)
	db, err := open(Addr(1))
	if err != nil {
		t.Fatal(err)
	}
	var b [6]byte
	rand.Read(b[:])
	name := "rdv_galera_" + hex.EncodeToString(b[:])
	if _, err := db.Exec("CREATE DATABASE " + name + " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"); err != nil {
		db.Close()
		t.Fatalf("create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		defer db.Close()
		// Through whichever node answers: a test may have killed node 1.
		for n := 1; n <= Nodes; n++ {
			d, err := open(Addr(n))
			if err != nil {
				continue
			}
			_, err = d.Exec("DROP DATABASE IF EXISTS " + name)
			d.Close()
			if err == nil {
				return
			}
		}
		t.Logf("drop database %s: no node answered", name)
	})
	urls := make([]string, Nodes)
	for n := 1; n <= Nodes; n++ {
		// No wsrep_sync_wait: storage sets it on a Galera node by itself,
		// and the tests run with what a user gets.
		urls[n-1] = fmt.Sprintf("mysql://root@%s/%s", Addr(n), name)
	}
	return urls
}

package main

// Seeding the history the cost-growth figure runs against: ended waiters,
// lookback events (mostly consumed) and the ended runs they belong to,
// written straight into the tables with multi-row INSERTs (the columns are
// those of storage/migrate.go). A tenth of the rows sit on the very runs and
// event id the measured notifies use, so an index that stopped serving a
// hot query would show.

import (
	"context"
	"database/sql"
	"fmt"
	"strconv"
	"strings"
	"time"
)

const (
	seedBatch   = 2000
	seedEvents  = 20 // distinct event ids of the seeded runs
	dbTimeStyle = "2006-01-02 15:04:05.000000"
)

type seedPlan struct {
	waiters, lookback int
	runs              int // seeded ended runs
	hotRuns           []string
	hotEvent          string
	now               time.Time
}

func ts(t time.Time) string { return "'" + t.UTC().Format(dbTimeStyle) + "'" }

func (p *seedPlan) seedRun(i int) string { return "wfr_seed-" + strconv.Itoa(i%p.runs) }

// row i of each table, as a VALUES tuple.

func (p *seedPlan) runRow(i int) string {
	t := p.now.Add(-48*time.Hour + time.Duration(i)*time.Millisecond)
	return "('" + p.seedRun(i) + "','RUN_SUCCESS','{\"seed\":" + strconv.Itoa(i) + "}',NULL,'{\"ok\":true}'," + ts(t) + "," + ts(t.Add(time.Hour)) + "," + ts(t.Add(time.Hour)) + ")"
}

func (p *seedPlan) waiterRow(i int) string {
	run, event := p.seedRun(i), "evt-"+strconv.Itoa(i%seedEvents)
	if i%10 == 0 {
		run, event = p.hotRuns[(i/10)%len(p.hotRuns)], p.hotEvent
	}
	created := p.now.Add(-48*time.Hour + time.Duration(i%86400)*time.Second)
	deadline := created.Add(time.Hour)
	var state, ended, msg string
	switch i % 3 {
	case 0:
		state, ended, msg = "NOTIFIED", ts(created.Add(30*time.Second)), "'msg_seed"+strconv.Itoa(i)+"'"
	case 1:
		state, ended, msg = "TIMED_OUT", ts(deadline), "NULL"
	default:
		state, ended, msg = "CANCELED", ts(created.Add(time.Minute)), "NULL"
	}
	// event_id, run_id, step_name, state, deadline, created_at, ended_at, message_id, event_data, replica_id
	return "('" + event + "','" + run + "',NULL,'" + state + "'," + ts(deadline) + "," + ts(created) + "," + ended + "," + msg + ",NULL,NULL)"
}

func (p *seedPlan) lookbackRow(i int) string {
	run, event := p.seedRun(i), "evt-"+strconv.Itoa(i%seedEvents)
	if i%10 == 0 {
		run, event = p.hotRuns[(i/10)%len(p.hotRuns)], p.hotEvent
	}
	created := p.now.Add(-time.Hour + time.Duration(i)*time.Millisecond/10)
	consumed, consumedAt := "1", ts(created.Add(time.Minute))
	if i%5 == 0 {
		consumed, consumedAt = "0", "NULL" // pending, not yet expired: nothing for the purge to do
	}
	// run_id, event_id, event_data, message_id, consumed, created_at, expires_at, consumed_at
	return "('" + run + "','" + event + "','{\"seed\":" + strconv.Itoa(i) + "}','msg_lb" + strconv.Itoa(i) + "'," + consumed + "," + ts(created) + "," + ts(created.Add(7*24*time.Hour)) + "," + consumedAt + ")"
}

func seedHistory(ctx context.Context, db *sql.DB, dialect string, p *seedPlan) error {
	return seedTables(ctx, db, dialect, []seedTable{
		{"runs", "id, state, body, label, result, created_at, updated_at, ended_at", p.runs, p.runRow},
		{"waiters", "event_id, run_id, step_name, state, deadline, created_at, ended_at, message_id, event_data, replica_id", p.waiters, p.waiterRow},
		{"lookback_events", "run_id, event_id, event_data, message_id, consumed, created_at, expires_at, consumed_at", p.lookback, p.lookbackRow},
	})
}

// seedTable is n rows of a table, row(i) giving the VALUES tuple of row i.
type seedTable struct {
	name, cols string
	n          int
	row        func(int) string
}

// seedTables writes the rows in multi-row INSERTs of seedBatch rows.
func seedTables(ctx context.Context, db *sql.DB, dialect string, tables []seedTable) error {
	workers := 2 // MariaDB: two writers keep both cores busy
	if dialect == "sqlite" {
		workers = 1 // one writer; batches are grouped in transactions below
	}
	for _, t := range tables {
		batches := (t.n + seedBatch - 1) / seedBatch
		stmt := func(b int) string {
			var sb strings.Builder
			sb.WriteString("INSERT INTO " + t.name + " (" + t.cols + ") VALUES ")
			for i := b * seedBatch; i < min(t.n, (b+1)*seedBatch); i++ {
				if i > b*seedBatch {
					sb.WriteByte(',')
				}
				sb.WriteString(t.row(i))
			}
			return sb.String()
		}
		if dialect == "sqlite" {
			const perTx = 25
			for b := 0; b < batches; b += perTx {
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					return fmt.Errorf("seed %s: %w", t.name, err)
				}
				for bb := b; bb < min(batches, b+perTx); bb++ {
					if _, err := tx.ExecContext(ctx, stmt(bb)); err != nil {
						tx.Rollback()
						return fmt.Errorf("seed %s: %w", t.name, err)
					}
				}
				if err := tx.Commit(); err != nil {
					return fmt.Errorf("seed %s: %w", t.name, err)
				}
			}
			continue
		}
		if err := parallel(batches, workers, func(b int) error {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			_, err := db.ExecContext(ctx, stmt(b))
			return err
		}); err != nil {
			return fmt.Errorf("seed %s: %w", t.name, err)
		}
	}
	return nil
}

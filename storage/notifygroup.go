// The statements of a group of targeted notifies committed together (the
// engine's group commit, engine/notifygroup.go): one locking read for every
// run of the group, one INSERT for every lookback event, and COMMIT.

package storage

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"

	"rendezvous/models"
)

// RunLockListed is what RunLockListWaitingMany found for one run.
type RunLockListed struct {
	// State is the run's state; "" when there is no such run.
	State models.RunState
	// Waiting is what RunLockListWaiting would list, oldest first.
	Waiting []*models.Waiter
}

// placeholders is "?, ?, …" for n values.
func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?, ", n), ", ")
}

// stmtCtx is the context a statement runs on, as in q.
func (e *gormExecutor) stmtCtx(ctx context.Context) context.Context {
	if e.txCtx != nil && ctx.Err() == nil {
		return e.txCtx
	}
	return ctx
}

func (e *gormExecutor) RunLockListWaitingMany(ctx context.Context, ps []RunLockListWaitingParams) ([]RunLockListed, error) {
	if len(ps) == 0 {
		return nil, nil
	}
	if len(ps) > chunkSize {
		return nil, fmt.Errorf("lock %d runs in one statement: at most %d", len(ps), chunkSize)
	}
	self, now := ps[0].Self, newDBTime(ps[0].Now)
	byRun := make(map[string]int, len(ps))
	var (
		runIDs   = make([]any, 0, len(ps))
		eventIDs []any
		events   = map[string]bool{}
	)
	for i, p := range ps {
		if p.Self != self || !p.Now.Equal(ps[0].Now) {
			return nil, errors.New("lock runs in one statement: Self and Now differ")
		}
		if _, dup := byRun[p.RunID]; dup {
			return nil, fmt.Errorf("lock runs in one statement: run %s twice", p.RunID)
		}
		byRun[p.RunID] = i
		runIDs = append(runIDs, p.RunID)
		if !events[p.EventID] {
			events[p.EventID] = true
			eventIDs = append(eventIDs, p.EventID)
		}
	}
	if e.dialect == DialectMySQL && e.galera {
		// Every run written, as bumpRun does for one.
		if err := e.classify(e.q(ctx).Exec(`UPDATE runs SET lock_version = lock_version + 1 WHERE id IN (`+
			placeholders(len(runIDs))+`)`, runIDs...).Error); err != nil {
			return nil, err
		}
	}
	// runLockListWaitingSQL with lists: the runs are read (and locked) one
	// by one in index order, each before its waiters, which are read with a
	// locking read once the run's lock is granted. A run's waiters of
	// another event id of the group are read too, and dropped below.
	query := `SELECT r.id, r.state, w.seq, w.event_id, w.run_id, w.step_name, w.state, w.deadline,
	w.created_at, w.ended_at, w.message_id, w.event_data, w.replica_id
FROM runs r LEFT JOIN waiters w ON w.run_id = r.id AND w.event_id IN (` + placeholders(len(eventIDs)) + `) AND w.state = ? AND w.deadline > ?
WHERE r.id IN (` + placeholders(len(runIDs)) + `)`
	if e.dialect == DialectMySQL {
		query += " FOR UPDATE"
	}
	args := make([]any, 0, len(eventIDs)+2+len(runIDs))
	args = append(args, eventIDs...)
	args = append(args, string(models.WaiterWaiting), now)
	args = append(args, runIDs...)
	// Straight to the connection: no GORM callbacks on the hot path.
	rows, err := e.db.Statement.ConnPool.QueryContext(e.stmtCtx(ctx), query, args...)
	if err != nil {
		return nil, e.classify(err)
	}
	defer rows.Close()
	out := make([]RunLockListed, len(ps))
	var waiters []waiterRow
	for rows.Next() {
		var (
			runID, state    string
			seq             sql.NullInt64
			eventID, wState sql.NullString
			w               waiterRow
		)
		if err := rows.Scan(&runID, &state, &seq, &eventID, &w.RunID, &w.StepName, &wState, &w.Deadline,
			&w.CreatedAt, &w.EndedAt, &w.MessageID, &w.EventData, &w.ReplicaID); err != nil {
			return nil, e.classify(err)
		}
		i, ok := byRun[runID]
		if !ok {
			continue // an id that matched under a collation but is not the one asked for
		}
		out[i].State = models.RunState(state)
		if seq.Valid && eventID.String == ps[i].EventID {
			w.Seq, w.EventID, w.State = seq.Int64, eventID.String, wState.String
			waiters = append(waiters, w)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, e.classify(err)
	}
	rows.Close()
	if len(waiters) == 0 {
		return out, nil
	}
	// The owners' leases, in one read for the whole group.
	runOf := make(map[string]string, len(waiters))
	for _, w := range waiters {
		runOf[waiterID(w.Seq)] = *w.RunID
	}
	var lapsed []string
	if waiters, err = e.liveOwners(ctx, waiters, self, now, &lapsed); err != nil {
		return nil, err
	}
	slices.SortFunc(waiters, func(a, b waiterRow) int { return cmp.Compare(a.Seq, b.Seq) })
	for k := range waiters {
		i := byRun[*waiters[k].RunID]
		out[i].Waiting = append(out[i].Waiting, waiters[k].model())
	}
	for _, id := range lapsed {
		if i := byRun[runOf[id]]; ps[i].Lapsed != nil {
			*ps[i].Lapsed = append(*ps[i].Lapsed, id)
		}
	}
	return out, nil
}

func (e *gormExecutor) LookbackEventInsertManyCommit(ctx context.Context, evs []*models.LookbackEvent) error {
	switch len(evs) {
	case 0:
		return nil
	case 1:
		return e.LookbackEventInsertCommit(ctx, evs[0])
	}
	pool, ok := e.db.Statement.ConnPool.(*lazyTx)
	if !ok || !e.returning {
		// SQLite (whose COMMIT costs no round trip and which has one
		// connection), or a server without INSERT … RETURNING, which
		// could not say which id each row got (auto-increment values of
		// one statement need not be consecutive): one by one, and InTx
		// commits.
		for _, ev := range evs {
			if err := e.LookbackEventInsert(ctx, ev); err != nil {
				return err
			}
		}
		return nil
	}
	insert, args := lookbackInsertMany(evs)
	byMsg := make(map[string]*models.LookbackEvent, len(evs))
	for _, ev := range evs {
		byMsg[ev.MessageID] = ev
	}
	got := 0
	read := func(rows *sql.Rows) error {
		for rows.Next() {
			var (
				seq int64
				msg string
			)
			if err := rows.Scan(&seq, &msg); err != nil {
				return err
			}
			if ev := byMsg[msg]; ev != nil && ev.ID == "" {
				ev.ID = lookbackID(seq)
				got++
			}
		}
		return nil
	}
	for _, ev := range evs {
		ev.ID = ""
	}
	if e.galera || !pool.canInsertCommit(insert, args) {
		// Galera: COMMIT on its own (see LookbackEventInsertCommit); or
		// too large to go with COMMIT. InTx commits.
		rows, err := pool.QueryContext(e.stmtCtx(ctx), insert+" RETURNING seq, message_id", args...)
		if err != nil {
			return e.classify(err)
		}
		err = read(rows)
		if err := errors.Join(err, rows.Err(), rows.Close()); err != nil {
			return e.classify(err)
		}
		if got != len(evs) {
			return fmt.Errorf("insert %d lookback events: %d ids returned", len(evs), got)
		}
		return nil
	}
	err := pool.insertCommitQuery(ctx, insert+" RETURNING seq, message_id; COMMIT", args, read)
	if err == nil && got != len(evs) {
		err = pool.failCommit(fmt.Errorf("insert %d lookback events: %d ids returned", len(evs), got))
	}
	if err != nil {
		var cf commitFailed
		if errors.As(err, &cf) {
			return err // for InTx, as it is
		}
		return e.classify(err)
	}
	return nil
}

// lookbackInsertMany is lookbackInsertSQL for several rows.
func lookbackInsertMany(evs []*models.LookbackEvent) (string, []any) {
	var b strings.Builder
	b.WriteString(lookbackInsertSQL)
	args := make([]any, 0, 7*len(evs))
	for i, ev := range evs {
		if i > 0 {
			b.WriteString(", (?, ?, ?, ?, ?, ?, ?)")
		}
		args = append(args, ev.WorkflowRunID, ev.EventID, []byte(ev.EventData), ev.MessageID, false, newDBTime(ev.CreatedAt), newDBTime(ev.ExpiresAt))
	}
	return b.String(), args
}

// The runs table's queries (split from gorm.go, one file per table as Temporal's sqlplugin does).

package storage

import (
	"cmp"
	"context"
	"database/sql"
	"fmt"
	"slices"

	"rendezvous/models"

	"gorm.io/gorm"
)

func (e *gormExecutor) RunGet(ctx context.Context, runID string, forUpdate bool) (*models.WorkflowRun, error) {
	if forUpdate {
		if err := e.bumpRun(ctx, runID); err != nil {
			return nil, err
		}
	}
	var row runRow
	if err := e.lock(e.q(ctx).Where("id = ?", runID), forUpdate).Take(&row).Error; err != nil {
		return nil, e.notFound(err)
	}
	return row.model(), nil
}

// bumpRunSQL makes the run lock a write. On one MySQL server the UPDATE
// takes the row lock the SELECT … FOR UPDATE after it would have taken. On
// Galera, row locks are not replicated: a locking read on one node does
// not block the same read on another, and both transactions would go on
// (a targeted notify storing a lookback event while a wait on another node
// registers without seeing it: 116 trials in 300 lost the event). Galera
// does certify writes: of two transactions that wrote the same row on
// different nodes, the later one fails at COMMIT with a deadlock (1213),
// is rolled back, and InTx runs it again, after the first. So every path
// that locks a run writes it.
const bumpRunSQL = `UPDATE runs SET lock_version = lock_version + 1 WHERE id = ?`

// bumpRun writes the run's row on Galera (nothing when there is no such
// run: the read after it says so). Elsewhere the locking read that follows
// is the lock, and a round trip less: one MySQL server blocks it, and
// SQLite has a single writer.
func (e *gormExecutor) bumpRun(ctx context.Context, runID string) error {
	if e.dialect != DialectMySQL || !e.galera {
		return nil
	}
	return e.classify(e.q(ctx).Exec(bumpRunSQL, runID).Error)
}

// runLockListWaitingSQL is one statement for the run lock and the waiters a
// targeted notify resolves. Why its shape:
//   - The waiters are joined, not read in a subquery: under FOR UPDATE every
//     table of the join is read with a locking read, which sees the latest
//     committed rows once the run lock is granted; a subquery is a
//     consistent read, whose snapshot could date from before the wait.
//   - The owners' leases are not checked here but after, and only for
//     waiters owned by another replica (see liveOwners). Joining replicas
//     would lock the replica's row under FOR UPDATE (serialising every
//     notify on the replica's waiters and blocking its lease renewal); an
//     EXISTS subquery (non-locking) costs the database about a fifth of the
//     whole notify's CPU on every call, waiters or not, as MariaDB sets the
//     subquery up each time.
//   - runs is a const table (unique id): the optimizer reads and locks it
//     before it reads any waiter, and a missing run returns no row.
//   - No ORDER BY: it costs a temporary table and a filesort; rows come in
//     index order (run_id, event_id, state, seq) and are sorted by seq after.
//
// The run's state is repeated on every row; with no waiter there is one row
// with NULL waiter columns. The lock tests show what is locked and seen.
const runLockListWaitingSQL = `SELECT r.state, w.seq, w.event_id, w.run_id, w.step_name, w.state, w.deadline,
	w.created_at, w.ended_at, w.message_id, w.event_data, w.replica_id
FROM runs r LEFT JOIN waiters w ON w.run_id = r.id AND w.event_id = ? AND w.state = ? AND w.deadline > ?
WHERE r.id = ?`

func (e *gormExecutor) RunLockListWaiting(ctx context.Context, p *RunLockListWaitingParams) (models.RunState, []*models.Waiter, error) {
	query := runLockListWaitingSQL
	if e.dialect == DialectMySQL {
		// SQLite has no row locks: its single connection makes the
		// transaction serial, as for lock().
		query += " FOR UPDATE"
	}
	if err := e.bumpRun(ctx, p.RunID); err != nil {
		return "", nil, err
	}
	now := newDBTime(p.Now)
	rows, err := e.q(ctx).Raw(query, p.EventID, string(models.WaiterWaiting), now, p.RunID).Rows()
	if err != nil {
		return "", nil, e.classify(err)
	}
	defer rows.Close()
	var (
		state   string
		found   bool
		waiters []waiterRow
	)
	for rows.Next() {
		var (
			seq             sql.NullInt64
			eventID, wState sql.NullString
			w               waiterRow
		)
		if err := rows.Scan(&state, &seq, &eventID, &w.RunID, &w.StepName, &wState, &w.Deadline,
			&w.CreatedAt, &w.EndedAt, &w.MessageID, &w.EventData, &w.ReplicaID); err != nil {
			return "", nil, e.classify(err)
		}
		found = true
		if seq.Valid {
			w.Seq, w.EventID, w.State = seq.Int64, eventID.String, wState.String
			waiters = append(waiters, w)
		}
	}
	if err := rows.Err(); err != nil {
		return "", nil, e.classify(err)
	}
	rows.Close()
	if !found {
		return "", nil, ErrNotFound
	}
	if waiters, err = e.liveOwners(ctx, waiters, p.Self, now, p.Lapsed); err != nil {
		return "", nil, err
	}
	slices.SortFunc(waiters, func(a, b waiterRow) int { return cmp.Compare(a.Seq, b.Seq) })
	return models.RunState(state), waiterModels(waiters), nil
}

// liveOwners keeps the waiters whose owner counts: no owner (a durable
// step), self, or a replica whose lease runs past now. It asks the
// database only about other replicas, with a plain (non-locking) read.
// The ids of the waiters it leaves out go to lapsed, when set.
func (e *gormExecutor) liveOwners(ctx context.Context, waiters []waiterRow, self string, now dbTime, lapsed *[]string) ([]waiterRow, error) {
	var others []string
	for _, w := range waiters {
		if w.ReplicaID != nil && *w.ReplicaID != self && !slices.Contains(others, *w.ReplicaID) {
			others = append(others, *w.ReplicaID)
		}
	}
	if len(others) == 0 {
		return waiters, nil
	}
	var live []string
	if err := e.q(ctx).Model(&replicaRow{}).Where("id IN ? AND lease_until > ?", others, now).Pluck("id", &live).Error; err != nil {
		return nil, e.classify(err)
	}
	return slices.DeleteFunc(waiters, func(w waiterRow) bool {
		out := w.ReplicaID != nil && *w.ReplicaID != self && !slices.Contains(live, *w.ReplicaID)
		if out && lapsed != nil {
			*lapsed = append(*lapsed, waiterID(w.Seq))
		}
		return out
	}), nil
}

func (e *gormExecutor) RunInsert(ctx context.Context, run *models.WorkflowRun) error {
	row := runRow{
		ID:        run.WorkflowRunID,
		State:     string(run.State),
		Body:      run.Body,
		Label:     run.Label,
		Result:    run.Result,
		CreatedAt: newDBTime(run.CreatedAt),
		UpdatedAt: newDBTime(run.UpdatedAt),
		// A run without dispatch waits for a runsToStart worker.
		StartPending: run.StartPending,
	}
	if run.State != models.RunStarted {
		row.EndedAt = row.UpdatedAt
	}
	return e.classify(e.q(ctx).Create(&row).Error)
}

func (e *gormExecutor) RunEnd(ctx context.Context, p *RunEndParams) error {
	set := map[string]any{
		"state":      string(p.State),
		"result":     p.Result,
		"updated_at": newDBTime(p.UpdatedAt),
	}
	if p.State != models.RunStarted {
		set["ended_at"] = newDBTime(p.UpdatedAt)
	}
	res := e.q(ctx).Model(&runRow{}).Where("id = ? AND state = ?", p.RunID, string(models.RunStarted)).Updates(set)
	if res.Error != nil {
		return e.classify(res.Error)
	}
	if res.RowsAffected != 1 {
		return fmt.Errorf("end run %s: %w", p.RunID, ErrNotStarted)
	}
	return nil
}

func (e *gormExecutor) RunList(ctx context.Context, p *RunListParams) ([]*models.WorkflowRun, error) {
	q := e.q(ctx).Model(&runRow{})
	if p.State != nil {
		q = q.Where("state = ?", string(*p.State))
	}
	if p.Label != nil {
		q = q.Where("label = ?", *p.Label)
	}
	return e.runsPage(ctx, q, p.AfterRunID, p.Limit)
}

func (e *gormExecutor) RunCountByState(ctx context.Context) (map[models.RunState]int64, error) {
	return countByState[models.RunState](e, ctx, &runRow{})
}

// countByState counts the rows of model's table by their state column.
func countByState[S ~string](e *gormExecutor, ctx context.Context, model any) (map[S]int64, error) {
	var rows []stateCount
	if err := e.q(ctx).Model(model).Select("state, COUNT(*) AS n").Group("state").Scan(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	out := make(map[S]int64, len(rows))
	for _, r := range rows {
		out[S(r.State)] = r.N
	}
	return out, nil
}

// runsPage runs a listing of runs newest first (by insertion order), up to
// limit, continuing after the run afterRunID when it is set (ErrNotFound if
// that run does not exist).
func (e *gormExecutor) runsPage(ctx context.Context, q *gorm.DB, afterRunID string, limit int) ([]*models.WorkflowRun, error) {
	if afterRunID != "" {
		var after runRow
		if err := e.q(ctx).Select("seq").Where("id = ?", afterRunID).Take(&after).Error; err != nil {
			return nil, e.notFound(err)
		}
		q = q.Where("seq < ?", after.Seq)
	}
	var rows []runRow
	if err := q.Order("seq DESC").Limit(limit).Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	out := make([]*models.WorkflowRun, len(rows))
	for i := range rows {
		out[i] = rows[i].model()
	}
	return out, nil
}

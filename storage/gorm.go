package storage

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"rendezvous/models"
)

// chunkSize bounds the ids in one IN (…) list.
const chunkSize = 1000

type gormStore struct {
	gormExecutor
	sqlDB       *sql.DB
	maxAttempts int
	log         *slog.Logger
}

var _ Store = (*gormStore)(nil)

// gormExecutor runs the queries on a pool or inside a transaction; the same
// code serves both.
type gormExecutor struct {
	db      *gorm.DB
	dialect string
	obs     Observer
	// returning: the server knows INSERT … RETURNING (MariaDB ≥ 10.5).
	returning bool
}

// classify classifies a driver error (see the package function) and tells
// the observer when the database could not be reached.
func (e *gormExecutor) classify(err error) error {
	c := classify(err)
	if c != nil && errors.Is(c, ErrUnavailable) {
		e.obs.DBRetry(CauseConnection)
	}
	return c
}

func (s *gormStore) Dialect() string { return s.dialect }

func (s *gormStore) Ping(ctx context.Context) error { return s.classify(s.sqlDB.PingContext(ctx)) }

func (s *gormStore) Close() error { return s.sqlDB.Close() }

func (s *gormStore) InTx(ctx context.Context, fn func(tx Executor) error) error {
	for attempt := 1; ; attempt++ {
		err := s.runTx(ctx, fn)
		if err == nil || !errors.Is(err, errRetryable) {
			return err
		}
		if attempt >= s.maxAttempts {
			return fmt.Errorf("%w: transaction gave up after %d attempts: %v", ErrUnavailable, attempt, err)
		}
		s.obs.DBRetry(conflictCause(err))
		s.log.DebugContext(ctx, "transaction conflict, retrying", "attempt", attempt, "err", err)
		if err := backoff(ctx, attempt); err != nil {
			return err
		}
	}
}

// runTx runs fn once in a transaction. fn's error is returned as it is: the
// executor classified driver errors at the edge, and anything else (an
// engine error naming caller-chosen ids) must not be mistaken for one. A
// failed COMMIT is ErrCommitUnknown: the write may have landed.
func (s *gormStore) runTx(ctx context.Context, fn func(tx Executor) error) (err error) {
	tx, err := s.begin(ctx)
	if err != nil {
		return s.classify(err)
	}
	defer func() {
		if p := recover(); p != nil {
			tx.Rollback()
			panic(p)
		}
	}()
	if err := fn(&gormExecutor{db: tx, dialect: s.dialect, obs: s.obs, returning: s.returning}); err != nil {
		tx.Rollback()
		var cf commitFailed
		if errors.As(err, &cf) {
			return s.commitErr(cf.err) // LookbackEventInsertCommit's COMMIT
		}
		if pool, ok := tx.Statement.ConnPool.(*lazyTx); ok && pool.committed {
			return fmt.Errorf("%w: bug: the transaction committed with LookbackEventInsertCommit, then failed: %v", ErrCommitUnknown, err)
		}
		return err
	}
	if err := tx.Commit().Error; err != nil {
		return s.commitErr(err)
	}
	return nil
}

// commitErr is what a failed COMMIT means: a deadlock reported at commit
// rolled the transaction back and it may run again; anything else leaves
// its outcome unknown.
func (s *gormStore) commitErr(err error) error {
	c := classify(err)
	if errors.Is(c, errRetryable) {
		return c
	}
	if errors.Is(c, ErrUnavailable) {
		s.obs.DBRetry(CauseConnection)
	}
	return fmt.Errorf("%w: %v", ErrCommitUnknown, err)
}

// begin starts a transaction. On MySQL nothing is sent yet: START
// TRANSACTION goes with the first statement (lazyTx). SQLite's BEGIN costs
// no round trip.
func (s *gormStore) begin(ctx context.Context) (*gorm.DB, error) {
	if s.dialect != DialectMySQL {
		tx := s.db.WithContext(ctx).Begin()
		return tx, tx.Error
	}
	pool, err := beginLazy(ctx, s.sqlDB)
	if err != nil {
		return nil, err
	}
	// What Begin does, with lazyTx in place of a *sql.Tx.
	tx := s.db.Session(&gorm.Session{Context: ctx, NewDB: true})
	tx.Statement.ConnPool = pool
	return tx, nil
}

func (e *gormExecutor) q(ctx context.Context) *gorm.DB { return e.db.WithContext(ctx) }

// lock adds FOR UPDATE on MySQL. SQLite has no row locks: its single
// connection already makes transactions serial.
func (e *gormExecutor) lock(q *gorm.DB, forUpdate bool) *gorm.DB {
	if forUpdate && e.dialect == DialectMySQL {
		return q.Clauses(clause.Locking{Strength: "UPDATE"})
	}
	return q
}

func (e *gormExecutor) notFound(err error) error {
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return ErrNotFound
	}
	return e.classify(err)
}

// ---- runs

func (e *gormExecutor) RunGet(ctx context.Context, runID string, forUpdate bool) (*models.WorkflowRun, error) {
	var row runRow
	if err := e.lock(e.q(ctx).Where("id = ?", runID), forUpdate).Take(&row).Error; err != nil {
		return nil, e.notFound(err)
	}
	return row.model(), nil
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
	if waiters, err = e.liveOwners(ctx, waiters, p.Self, now); err != nil {
		return "", nil, err
	}
	slices.SortFunc(waiters, func(a, b waiterRow) int { return cmp.Compare(a.Seq, b.Seq) })
	return models.RunState(state), waiterModels(waiters), nil
}

// liveOwners keeps the waiters whose owner counts: no owner (a durable
// step), self, or a replica whose lease runs past now. It asks the
// database only about other replicas, with a plain (non-locking) read.
func (e *gormExecutor) liveOwners(ctx context.Context, waiters []waiterRow, self string, now dbTime) ([]waiterRow, error) {
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
		return w.ReplicaID != nil && *w.ReplicaID != self && !slices.Contains(live, *w.ReplicaID)
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
	}
	return e.classify(e.q(ctx).Create(&row).Error)
}

func (e *gormExecutor) RunEnd(ctx context.Context, p *RunEndParams) error {
	res := e.q(ctx).Model(&runRow{}).Where("id = ? AND state = ?", p.RunID, string(models.RunStarted)).Updates(map[string]any{
		"state":      string(p.State),
		"result":     p.Result,
		"updated_at": newDBTime(p.UpdatedAt),
	})
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
	if p.AfterRunID != "" {
		var after runRow
		if err := e.q(ctx).Select("seq").Where("id = ?", p.AfterRunID).Take(&after).Error; err != nil {
			return nil, e.notFound(err)
		}
		q = q.Where("seq < ?", after.Seq)
	}
	var rows []runRow
	if err := q.Order("seq DESC").Limit(p.Limit).Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	out := make([]*models.WorkflowRun, len(rows))
	for i := range rows {
		out[i] = rows[i].model()
	}
	return out, nil
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

// ---- waiters

func (e *gormExecutor) WaiterInsert(ctx context.Context, w *models.Waiter) error {
	row := waiterRow{
		EventID:   w.EventID,
		RunID:     w.WorkflowRunID,
		StepName:  w.StepName,
		State:     string(w.State),
		Deadline:  newDBTime(w.Deadline),
		CreatedAt: newDBTime(w.CreatedAt),
		MessageID: w.MessageID,
		EventData: w.EventData,
	}
	if w.Owner != "" {
		row.ReplicaID = &w.Owner
	}
	if w.EndedAt != nil {
		row.EndedAt = newDBTime(*w.EndedAt)
	}
	if err := e.q(ctx).Create(&row).Error; err != nil {
		return e.classify(err)
	}
	w.ID = waiterID(row.Seq)
	return nil
}

func (e *gormExecutor) WaiterGet(ctx context.Context, id string) (*models.Waiter, error) {
	seq, ok := parseSeq(id, waiterIDPrefix)
	if !ok {
		return nil, ErrNotFound
	}
	var row waiterRow
	if err := e.q(ctx).Where("seq = ?", seq).Take(&row).Error; err != nil {
		return nil, e.notFound(err)
	}
	w := row.model()
	if w.EventData == nil && w.MessageID != nil {
		// Resolved by a notify: its data is kept once, in notifications. (A
		// waiter born from a lookback event carries its own copy.)
		var n notificationRow
		err := e.q(ctx).Select("event_data").Where("message_id = ?", *w.MessageID).Take(&n).Error
		if err != nil && !errors.Is(err, gorm.ErrRecordNotFound) {
			return nil, e.classify(err)
		}
		w.EventData = n.EventData
	}
	return w, nil
}

func (e *gormExecutor) WaiterListWaiting(ctx context.Context, p *WaiterListWaitingParams) ([]*models.Waiter, error) {
	q := e.q(ctx)
	if p.RunID != nil {
		q = q.Where("run_id = ? AND event_id = ?", *p.RunID, p.EventID)
	} else {
		q = q.Where("event_id = ?", p.EventID)
	}
	now := newDBTime(p.Now)
	q = q.Where("state = ? AND deadline > ?", string(models.WaiterWaiting), now)
	var rows []waiterRow
	if err := e.lock(q.Order("seq"), p.ForUpdate).Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	// Owners' leases in a second read, and only for other replicas'
	// waiters: as a subquery MariaDB prepared it on every call, a fifth of
	// a notify's database time even with no other replica.
	rows, err := e.liveOwners(ctx, rows, p.Self, now)
	if err != nil {
		return nil, err
	}
	return waiterModels(rows), nil
}

func (e *gormExecutor) WaiterListByRun(ctx context.Context, runID string) ([]*models.Waiter, error) {
	var rows []waiterRow
	// Without event_data: listings never show it, and ended waiters of a
	// long run could carry a lot of it.
	if err := e.q(ctx).Omit("event_data").Where("run_id = ?", runID).Order("seq").Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	return waiterModels(rows), nil
}

func waiterModels(rows []waiterRow) []*models.Waiter {
	out := make([]*models.Waiter, len(rows))
	for i := range rows {
		out[i] = rows[i].model()
	}
	return out
}

func (e *gormExecutor) WaiterEnd(ctx context.Context, p *WaiterEndParams) ([]string, error) {
	seqs := waiterSeqs(p.WaiterIDs)
	set := map[string]any{"state": string(p.State), "ended_at": newDBTime(p.EndedAt)}
	if p.MessageID != nil {
		set["message_id"] = *p.MessageID
	}
	waiting := func(q *gorm.DB) *gorm.DB {
		q = q.Where("state = ?", string(models.WaiterWaiting))
		if p.DeadlineAfter != nil {
			q = q.Where("deadline > ?", newDBTime(*p.DeadlineAfter))
		}
		return q
	}
	var ended []string
	for chunk := range chunks(seqs) {
		if len(chunk) == 1 {
			// One waiter: the compare-and-set's row count says who won.
			res := waiting(e.q(ctx).Model(&waiterRow{}).Where("seq = ?", chunk[0])).Updates(set)
			if res.Error != nil {
				return nil, e.classify(res.Error)
			}
			if res.RowsAffected == 1 {
				ended = append(ended, waiterID(chunk[0]))
			}
			continue
		}
		if p.MessageID != nil {
			// Several, for a notify: move them in one statement, then tell
			// which moved by the notify's message id (unique to this call;
			// the moved rows stay locked until commit). Usually all did,
			// and the second statement is not needed.
			res := waiting(e.q(ctx).Model(&waiterRow{}).Where("seq IN ?", chunk)).Updates(set)
			if res.Error != nil {
				return nil, e.classify(res.Error)
			}
			moved := chunk
			if res.RowsAffected != int64(len(chunk)) {
				moved = nil
				if err := e.q(ctx).Model(&waiterRow{}).Where("seq IN ? AND message_id = ?", chunk, *p.MessageID).
					Order("seq").Pluck("seq", &moved).Error; err != nil {
					return nil, e.classify(err)
				}
			}
			for _, seq := range moved {
				ended = append(ended, waiterID(seq))
			}
			continue
		}
		// Several: lock the ones still waiting, then move exactly those, so
		// the ids returned are the ones this call ended.
		var still []int64
		if err := e.lock(waiting(e.q(ctx).Model(&waiterRow{}).Where("seq IN ?", chunk)), true).
			Order("seq").Pluck("seq", &still).Error; err != nil {
			return nil, e.classify(err)
		}
		if len(still) == 0 {
			continue
		}
		res := waiting(e.q(ctx).Model(&waiterRow{}).Where("seq IN ?", still)).Updates(set)
		if res.Error != nil {
			return nil, e.classify(res.Error)
		}
		if res.RowsAffected != int64(len(still)) {
			// The rows were locked above, so this only happens outside a
			// transaction, where the lock did not last.
			return nil, fmt.Errorf("end waiters: %d of %d changed under us; WaiterEnd with several ids must run in a transaction", res.RowsAffected, len(still))
		}
		for _, seq := range still {
			ended = append(ended, waiterID(seq))
		}
	}
	if p.MessageID != nil && len(ended) > 0 {
		row := notificationRow{MessageID: *p.MessageID, EventID: p.EventID, EventData: p.EventData, CreatedAt: newDBTime(p.EndedAt)}
		if row.EventID == "" {
			if err := e.q(ctx).Model(&waiterRow{}).Select("event_id").Where("seq = ?", mustSeq(ended[0])).Take(&row).Error; err != nil {
				return nil, e.classify(err)
			}
		}
		// A second call for the same message (more waiters of the same
		// notify) finds the row there already.
		if err := e.q(ctx).Clauses(clause.OnConflict{DoNothing: true}).Create(&row).Error; err != nil {
			return nil, e.classify(err)
		}
	}
	return ended, nil
}

// waiterSeqs returns the row keys of the waiter ids; ids that name no
// waiter are left out (they match no row).
func waiterSeqs(ids []string) []int64 {
	seqs := make([]int64, 0, len(ids))
	for _, id := range ids {
		if seq, ok := parseSeq(id, waiterIDPrefix); ok {
			seqs = append(seqs, seq)
		}
	}
	return seqs
}

func mustSeq(id string) int64 {
	seq, _ := parseSeq(id, waiterIDPrefix)
	return seq
}

func (e *gormExecutor) WaiterDeleteWaiting(ctx context.Context, ids []string) (int64, error) {
	seqs := waiterSeqs(ids)
	var deleted int64
	for chunk := range chunks(seqs) {
		res := e.q(ctx).Where("seq IN ? AND state = ?", chunk, string(models.WaiterWaiting)).Delete(&waiterRow{})
		if res.Error != nil {
			return deleted, e.classify(res.Error)
		}
		deleted += res.RowsAffected
	}
	return deleted, nil
}

func (e *gormExecutor) WaiterListEnded(ctx context.Context, ids []string) ([]string, error) {
	seqs := waiterSeqs(ids)
	var ended []string
	for chunk := range chunks(seqs) {
		var got []int64
		if err := e.q(ctx).Model(&waiterRow{}).Where("seq IN ? AND state <> ?", chunk, string(models.WaiterWaiting)).
			Pluck("seq", &got).Error; err != nil {
			return nil, e.classify(err)
		}
		for _, seq := range got {
			ended = append(ended, waiterID(seq))
		}
	}
	return ended, nil
}

func (e *gormExecutor) WaiterListExpired(ctx context.Context, now time.Time, limit int) ([]*models.Waiter, error) {
	var rows []waiterRow
	if err := e.q(ctx).Where("state = ? AND deadline <= ?", string(models.WaiterWaiting), newDBTime(now)).
		Order("deadline").Limit(limit).Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	return waiterModels(rows), nil
}

func (e *gormExecutor) WaiterCountWaiting(ctx context.Context, now time.Time) (int64, error) {
	var n int64
	err := e.q(ctx).Model(&waiterRow{}).Where("state = ? AND deadline > ?", string(models.WaiterWaiting), newDBTime(now)).Count(&n).Error
	return n, e.classify(err)
}

type stateCount struct {
	State string `gorm:"column:state"`
	N     int64  `gorm:"column:n"`
}

func (e *gormExecutor) WaiterCountByState(ctx context.Context, now time.Time) (map[models.WaiterState]int64, error) {
	out, err := countByState[models.WaiterState](e, ctx, &waiterRow{})
	if err != nil {
		return nil, err
	}
	if out[models.WaiterWaiting] == 0 {
		return out, nil
	}
	// Waiting past the deadline is timed out, written by the sweeper or not.
	var overdue int64
	if err := e.q(ctx).Model(&waiterRow{}).Where("state = ? AND deadline <= ?", string(models.WaiterWaiting), newDBTime(now)).
		Count(&overdue).Error; err != nil {
		return nil, e.classify(err)
	}
	if overdue > 0 {
		out[models.WaiterWaiting] -= overdue
		out[models.WaiterTimedOut] += overdue
		if out[models.WaiterWaiting] <= 0 {
			delete(out, models.WaiterWaiting) // a waiter ended between the two counts
		}
	}
	return out, nil
}

func (e *gormExecutor) WaiterOldestDeadline(ctx context.Context, now time.Time) (*time.Time, error) {
	var oldest dbTime
	row := e.q(ctx).Model(&waiterRow{}).Select("MIN(deadline)").
		Where("state = ? AND deadline > ?", string(models.WaiterWaiting), newDBTime(now)).Row()
	if err := row.Scan(&oldest); err != nil {
		return nil, e.classify(err)
	}
	return oldest.ptr(), nil
}

// ---- replica leases

func (e *gormExecutor) ReplicaRenew(ctx context.Context, replicaID string, leaseUntil time.Time) error {
	res := e.q(ctx).Model(&replicaRow{}).Where("id = ?", replicaID).Update("lease_until", newDBTime(leaseUntil))
	if res.Error != nil {
		return e.classify(res.Error)
	}
	if res.RowsAffected == 1 {
		return nil
	}
	err := e.q(ctx).Clauses(clause.OnConflict{
		Columns:   []clause.Column{{Name: "id"}},
		DoUpdates: clause.Assignments(map[string]any{"lease_until": newDBTime(leaseUntil)}),
	}).Create(&replicaRow{ID: replicaID, LeaseUntil: newDBTime(leaseUntil)}).Error
	return e.classify(err)
}

func (e *gormExecutor) ReplicaRelease(ctx context.Context, replicaID string) error {
	return e.classify(e.q(ctx).Where("id = ?", replicaID).Delete(&replicaRow{}).Error)
}

func (e *gormExecutor) WaiterReapOrphans(ctx context.Context, now time.Time) (int64, error) {
	var dead []string
	if err := e.q(ctx).Model(&replicaRow{}).Where("lease_until <= ?", newDBTime(now)).Pluck("id", &dead).Error; err != nil {
		return 0, e.classify(err)
	}
	if len(dead) == 0 {
		return 0, nil
	}
	res := e.q(ctx).Where("replica_id IN ? AND state = ?", dead, string(models.WaiterWaiting)).Delete(&waiterRow{})
	if res.Error != nil {
		return 0, e.classify(res.Error)
	}
	// A replica that was only cut off renews (re-creates) its lease when it
	// is back; its waiters are gone by then and its subscribers are told so.
	if err := e.q(ctx).Where("id IN ? AND lease_until <= ?", dead, newDBTime(now)).Delete(&replicaRow{}).Error; err != nil {
		return 0, e.classify(err)
	}
	return res.RowsAffected, nil
}

// ---- lookback events

func (e *gormExecutor) LookbackEventInsert(ctx context.Context, ev *models.LookbackEvent) error {
	row := lookbackRow{
		RunID:     ev.WorkflowRunID,
		EventID:   ev.EventID,
		EventData: ev.EventData,
		MessageID: ev.MessageID,
		CreatedAt: newDBTime(ev.CreatedAt),
		ExpiresAt: newDBTime(ev.ExpiresAt),
	}
	if err := e.q(ctx).Create(&row).Error; err != nil {
		return e.classify(err)
	}
	ev.ID = lookbackID(row.Seq)
	return nil
}

// lookbackInsertSQL is LookbackEventInsert's statement, written out for
// LookbackEventInsertCommit, which sends it with COMMIT.
const lookbackInsertSQL = `INSERT INTO lookback_events (run_id, event_id, event_data, message_id, consumed, created_at, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?)`

func (e *gormExecutor) LookbackEventInsertCommit(ctx context.Context, ev *models.LookbackEvent) error {
	pool, ok := e.db.Statement.ConnPool.(*lazyTx)
	args := []any{ev.WorkflowRunID, ev.EventID, []byte(ev.EventData), ev.MessageID, false, newDBTime(ev.CreatedAt), newDBTime(ev.ExpiresAt)}
	if !ok || !pool.canInsertCommit(lookbackInsertSQL, args) {
		// SQLite (whose COMMIT costs no round trip), the pool, or an
		// event too large to go with COMMIT: InTx commits as usual.
		return e.LookbackEventInsert(ctx, ev)
	}
	seq, err := pool.insertCommit(ctx, lookbackInsertSQL, args, e.returning)
	if err != nil {
		var cf commitFailed
		if errors.As(err, &cf) {
			return err // for InTx, as it is
		}
		return e.classify(err)
	}
	ev.ID = lookbackID(seq)
	return nil
}

func (e *gormExecutor) LookbackEventConsume(ctx context.Context, runID, eventID string, now time.Time) (*models.LookbackEvent, error) {
	var row lookbackRow
	q := e.q(ctx).Where("run_id = ? AND event_id = ? AND consumed = ? AND expires_at > ?", runID, eventID, false, newDBTime(now))
	err := e.lock(q.Order("seq"), true).Take(&row).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, e.classify(err)
	}
	res := e.q(ctx).Model(&lookbackRow{}).Where("seq = ? AND consumed = ?", row.Seq, false).
		Updates(map[string]any{"consumed": true, "consumed_at": newDBTime(now)})
	if res.Error != nil {
		return nil, e.classify(res.Error)
	}
	if res.RowsAffected != 1 {
		// Only possible without the run lock the contract asks for.
		return nil, fmt.Errorf("consume lookback event %s: already consumed", lookbackID(row.Seq))
	}
	return row.model(), nil
}

func (e *gormExecutor) LookbackEventListByRun(ctx context.Context, runID string, now time.Time) ([]*models.LookbackEvent, error) {
	var rows []lookbackRow
	if err := e.q(ctx).Where("run_id = ? AND consumed = ? AND expires_at > ?", runID, false, newDBTime(now)).
		Order("seq").Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	out := make([]*models.LookbackEvent, len(rows))
	for i := range rows {
		out[i] = rows[i].model()
	}
	return out, nil
}

func (e *gormExecutor) LookbackEventDeleteByRun(ctx context.Context, runID string) (int64, error) {
	res := e.q(ctx).Where("run_id = ? AND consumed = ?", runID, false).Delete(&lookbackRow{})
	return res.RowsAffected, e.classify(res.Error)
}

func (e *gormExecutor) LookbackEventPurge(ctx context.Context, now time.Time, limit int) (int64, int64, error) {
	var seqs []int64
	if err := e.q(ctx).Model(&lookbackRow{}).Where("expires_at <= ?", newDBTime(now)).
		Order("expires_at").Limit(limit).Pluck("seq", &seqs).Error; err != nil {
		return 0, 0, e.classify(err)
	}
	if len(seqs) == 0 {
		return 0, 0, nil
	}
	// The unconsumed ones first, to count them: an expired event can no
	// longer be consumed, so the split cannot race a waiter.
	unconsumed := e.q(ctx).Where("seq IN ? AND consumed = ?", seqs, false).Delete(&lookbackRow{})
	if unconsumed.Error != nil {
		return 0, 0, e.classify(unconsumed.Error)
	}
	rest := e.q(ctx).Where("seq IN ?", seqs).Delete(&lookbackRow{})
	if rest.Error != nil {
		return unconsumed.RowsAffected, unconsumed.RowsAffected, e.classify(rest.Error)
	}
	return unconsumed.RowsAffected + rest.RowsAffected, unconsumed.RowsAffected, nil
}

func (e *gormExecutor) LookbackEventCountPending(ctx context.Context, now time.Time) (int64, error) {
	var n int64
	err := e.q(ctx).Model(&lookbackRow{}).Where("consumed = ? AND expires_at > ?", false, newDBTime(now)).Count(&n).Error
	return n, e.classify(err)
}

// ---- steps

func (e *gormExecutor) StepGet(ctx context.Context, runID, stepName string) (*StepRecord, error) {
	var row stepRow
	if err := e.q(ctx).Where("run_id = ? AND step_name = ?", runID, stepName).Take(&row).Error; err != nil {
		return nil, e.notFound(err)
	}
	return row.record(), nil
}

func (e *gormExecutor) StepInsert(ctx context.Context, s *StepRecord) error {
	row := stepRow{
		RunID:     s.RunID,
		StepName:  s.StepName,
		Type:      string(s.Type),
		EventID:   s.EventID,
		Result:    s.Result,
		CreatedAt: newDBTime(s.CreatedAt),
	}
	if s.WaiterID != "" {
		seq, ok := parseSeq(s.WaiterID, waiterIDPrefix)
		if !ok {
			return fmt.Errorf("insert step %s: bad waiter id %q", s.StepName, s.WaiterID)
		}
		row.WaiterSeq = &seq
	}
	if s.CompletedAt != nil {
		row.CompletedAt = newDBTime(*s.CompletedAt)
	}
	return e.classify(e.q(ctx).Create(&row).Error)
}

func (e *gormExecutor) StepListByRun(ctx context.Context, runID string) ([]*StepRecord, error) {
	var rows []stepRow
	if err := e.q(ctx).Where("run_id = ?", runID).Order("seq").Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	out := make([]*StepRecord, len(rows))
	for i := range rows {
		out[i] = rows[i].record()
	}
	return out, nil
}

// chunks yields s in pieces of at most chunkSize.
func chunks(s []int64) func(yield func([]int64) bool) {
	return func(yield func([]int64) bool) {
		for len(s) > 0 {
			n := min(len(s), chunkSize)
			if !yield(s[:n]) {
				return
			}
			s = s[n:]
		}
	}
}

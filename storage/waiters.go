// The waiters table's queries (split from gorm.go, one file per table as Temporal's sqlplugin does).

package storage

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"rendezvous/models"
)

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

// waiterColumns are a waiterRow's columns, in the order scanWaiter reads them.
const waiterColumns = `seq, event_id, run_id, step_name, state, deadline, created_at, ended_at, message_id, event_data, replica_id`

func scanWaiter(rows *sql.Rows, w *waiterRow) error {
	return rows.Scan(&w.Seq, &w.EventID, &w.RunID, &w.StepName, &w.State, &w.Deadline,
		&w.CreatedAt, &w.EndedAt, &w.MessageID, &w.EventData, &w.ReplicaID)
}

func (e *gormExecutor) WaiterListWaiting(ctx context.Context, p *WaiterListWaitingParams) ([]*models.Waiter, error) {
	// Written out and scanned by hand: a broadcast lists every waiter of
	// its event id, and GORM's scanning cost 10 µs a row (100 ms of a
	// 10,000-waiter fan-out, before anybody is woken).
	query := `SELECT ` + waiterColumns + ` FROM waiters WHERE `
	now := newDBTime(p.Now)
	var args []any
	if p.RunID != nil {
		query += `run_id = ? AND event_id = ?`
		args = append(args, *p.RunID, p.EventID)
	} else {
		query += `event_id = ?`
		args = append(args, p.EventID)
	}
	query += ` AND state = ? AND deadline > ? ORDER BY seq`
	args = append(args, string(models.WaiterWaiting), now)
	if p.ForUpdate && e.dialect == DialectMySQL {
		query += ` FOR UPDATE`
	}
	rs, err := e.db.Statement.ConnPool.QueryContext(e.stmtCtx(ctx), query, args...)
	if err != nil {
		return nil, e.classify(err)
	}
	defer rs.Close()
	var rows []waiterRow
	for rs.Next() {
		rows = append(rows, waiterRow{})
		if err := scanWaiter(rs, &rows[len(rows)-1]); err != nil {
			return nil, e.classify(err)
		}
	}
	if err := rs.Err(); err != nil {
		return nil, e.classify(err)
	}
	rs.Close()
	// Owners' leases in a second read, and only for other replicas'
	// waiters: as a subquery MariaDB prepared it on every call, a fifth of
	// a notify's database time even with no other replica.
	rows, err = e.liveOwners(ctx, rows, p.Self, now, p.Lapsed)
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

func (e *gormExecutor) WaiterListWaitingByRun(ctx context.Context, runID string) ([]*models.Waiter, error) {
	var rows []waiterRow
	// Served by waiters_run_state_ended: only the waiting ones are read.
	if err := e.q(ctx).Where("run_id = ? AND state = ?", runID, string(models.WaiterWaiting)).
		Order("seq").Find(&rows).Error; err != nil {
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
	if len(ended) > 0 && !p.NoCallbacks {
		if err := e.outboxDue(ctx, waiterSeqs(ended), p.EndedAt); err != nil {
			return nil, err
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

func (e *gormExecutor) WaiterListNotWaiting(ctx context.Context, ids []string) ([]string, error) {
	waiting := make(map[int64]bool, len(ids))
	for chunk := range chunks(waiterSeqs(ids)) {
		var got []int64
		if err := e.q(ctx).Model(&waiterRow{}).Where("seq IN ? AND state = ?", chunk, string(models.WaiterWaiting)).
			Pluck("seq", &got).Error; err != nil {
			return nil, e.classify(err)
		}
		for _, seq := range got {
			waiting[seq] = true
		}
	}
	var out []string
	for _, id := range ids {
		if seq, ok := parseSeq(id, waiterIDPrefix); !ok || !waiting[seq] {
			out = append(out, id)
		}
	}
	return out, nil
}

func (e *gormExecutor) WaiterGetMany(ctx context.Context, ids []string) (map[string]*models.Waiter, error) {
	out := make(map[string]*models.Waiter, len(ids))
	var messages []string
	seen := map[string]bool{}
	for chunk := range chunks(waiterSeqs(ids)) {
		var rows []waiterRow
		if err := e.q(ctx).Where("seq IN ?", chunk).Find(&rows).Error; err != nil {
			return nil, e.classify(err)
		}
		for i := range rows {
			w := rows[i].model()
			out[w.ID] = w
			if w.EventData == nil && w.MessageID != nil && !seen[*w.MessageID] {
				seen[*w.MessageID] = true
				messages = append(messages, *w.MessageID)
			}
		}
	}
	// The data of the notifications that resolved them, kept once per
	// notify (see WaiterGet): one read for a broadcast's many waiters.
	data := make(map[string][]byte, len(messages))
	for chunk := range chunks(messages) {
		var ns []notificationRow
		if err := e.q(ctx).Select("message_id", "event_data").Where("message_id IN ?", chunk).Find(&ns).Error; err != nil {
			return nil, e.classify(err)
		}
		for _, n := range ns {
			data[n.MessageID] = n.EventData
		}
	}
	for _, w := range out {
		if w.EventData == nil && w.MessageID != nil {
			w.EventData = data[*w.MessageID]
		}
	}
	return out, nil
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

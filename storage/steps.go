// The steps table's queries (split from gorm.go, one file per table as Temporal's sqlplugin does).

package storage

import (
	"context"
	"database/sql"
	"fmt"

	"rendezvous/models"
)

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

// stepListSQL joins each wait step to its waiter by primary key, so a run's
// step listing reads only the waiters its steps name.
const stepListSQL = `SELECT s.seq, s.run_id, s.step_name, s.type, s.event_id, s.waiter_seq, s.result, s.created_at, s.completed_at,
	w.state, w.deadline, w.ended_at
FROM steps s LEFT JOIN waiters w ON w.seq = s.waiter_seq
WHERE s.run_id = ? ORDER BY s.seq`

func (e *gormExecutor) StepListByRun(ctx context.Context, runID string) ([]*StepRecord, error) {
	rows, err := e.q(ctx).Raw(stepListSQL, runID).Rows()
	if err != nil {
		return nil, e.classify(err)
	}
	defer rows.Close()
	var out []*StepRecord
	for rows.Next() {
		var (
			r        stepRow
			wState   sql.NullString
			deadline dbTime
			endedAt  dbTime
		)
		if err := rows.Scan(&r.Seq, &r.RunID, &r.StepName, &r.Type, &r.EventID, &r.WaiterSeq, &r.Result, &r.CreatedAt, &r.CompletedAt,
			&wState, &deadline, &endedAt); err != nil {
			return nil, e.classify(err)
		}
		rec := r.record()
		if wState.Valid {
			rec.Waiter = &StepWaiter{State: models.WaiterState(wState.String), Deadline: deadline.Time, EndedAt: endedAt.ptr()}
		}
		out = append(out, rec)
	}
	if err := rows.Err(); err != nil {
		return nil, e.classify(err)
	}
	if out == nil {
		out = []*StepRecord{}
	}
	return out, nil
}

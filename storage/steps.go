// The steps table's queries (split from gorm.go, one file per table as Temporal's sqlplugin does).

package storage

import (
	"context"
	"fmt"
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

// The lookback table's queries (split from gorm.go, one file per table as Temporal's sqlplugin does).

package storage

import (
	"context"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"

	"rendezvous/models"
)

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
	if !ok || e.galera || !pool.canInsertCommit(lookbackInsertSQL, args) {
		// SQLite (whose COMMIT costs no round trip), the pool, or an
		// event too large to go with COMMIT: InTx commits as usual.
		// Galera too: there, "INSERT … RETURNING seq; COMMIT" in one
		// query answers success for a transaction that failed
		// certification (its lookback event was never stored: 5 to 8
		// acknowledged notifies in 1,000 races of e2e's
		// TestGaleraNotifyWaitRace), while a COMMIT of its own reports
		// the failure (1213) and InTx runs the transaction again. It is
		// the server's doing, not the driver's: the packets recorded
		// under go-sql-driver say OK for that COMMIT
		// (internal/testgalera's TestGaleraMultiStatementCommit, opt-in).
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

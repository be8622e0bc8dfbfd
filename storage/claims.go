// The hand-over of runs to runsToStart workers: claims on rows of the runs
// table, decided in the database so that two replicas never hand one run
// to two workers at once.

package storage

import (
	"context"
	"time"

	"gorm.io/gorm"

	"rendezvous/models"
)

// RunClaimParams: hand up to Limit of the oldest runs waiting for a worker
// with Label (nil: runs without a label) to Worker, until LeaseUntil.
type RunClaimParams struct {
	Label      *string
	Worker     string
	Now        time.Time
	LeaseUntil time.Time
	Limit      int
}

// RunClaimExecutor is the hand-over's queries.
type RunClaimExecutor interface {
	// RunClaim claims runs for a worker (run it inside InTx): started,
	// not acked, not held under a live claim; oldest first. Each claim
	// counts an attempt.
	RunClaim(ctx context.Context, p *RunClaimParams) ([]*models.WorkflowRun, error)
	// RunAck ends the run's hand-over if it is held under a claim live at
	// now and not acked yet; false otherwise.
	// With attempt, only that hand-over (attempts = attempt) is acked.
	RunAck(ctx context.Context, runID string, now time.Time, attempt *int) (bool, error)
	// RunReleaseClaims gives back the worker's runs it has not acked, so
	// that the next worker may have them at once (a subscription that
	// ended).
	RunReleaseClaims(ctx context.Context, worker string) (int64, error)
	// RunCountClaimed counts the runs the worker holds under a claim live
	// at now and not acked.
	RunCountClaimed(ctx context.Context, worker string, now time.Time) (int64, error)
	// RunStartEnd takes the run out of the hand-over for good (it ended).
	RunStartEnd(ctx context.Context, runID string) error
}

func (e *gormExecutor) RunClaim(ctx context.Context, p *RunClaimParams) ([]*models.WorkflowRun, error) {
	now := newDBTime(p.Now)
	free := func() *gorm.DB {
		q := e.q(ctx).Model(&runRow{}).Where("start_pending = ?", true)
		if p.Label == nil {
			q = q.Where("label IS NULL")
		} else {
			q = q.Where("label = ?", *p.Label)
		}
		return q.Where("(claim_until IS NULL OR claim_until <= ?)", now)
	}
	seqs, err := e.claimCandidates(func() *gorm.DB { return free().Order("seq").Limit(p.Limit) })
	if err != nil {
		return nil, err
	}
	if len(seqs) == 0 {
		return nil, nil
	}
	// Compare and set: a run claimed meanwhile by another replica has a
	// live claim_until and is left alone.
	res := free().Where("seq IN ? AND state = ?", seqs, string(models.RunStarted)).Updates(map[string]any{
		"claimed_by":  p.Worker,
		"claim_until": newDBTime(p.LeaseUntil),
		"claimed_at":  now,
		"attempts":    gorm.Expr("attempts + 1"),
	})
	if res.Error != nil {
		return nil, e.classify(res.Error)
	}
	if res.RowsAffected == 0 {
		return nil, nil
	}
	var rows []runRow
	if err := e.q(ctx).Where("seq IN ? AND claimed_by = ? AND claim_until = ? AND start_pending = ?", seqs, p.Worker, newDBTime(p.LeaseUntil), true).
		Order("seq").Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	out := make([]*models.WorkflowRun, len(rows))
	for i := range rows {
		out[i] = rows[i].model()
	}
	return out, nil
}

func (e *gormExecutor) RunAck(ctx context.Context, runID string, now time.Time, attempt *int) (bool, error) {
	t := newDBTime(now)
	q := e.q(ctx).Model(&runRow{}).
		Where("id = ? AND start_pending = ? AND state = ? AND claim_until > ?", runID, true, string(models.RunStarted), t)
	if attempt != nil {
		q = q.Where("attempts = ?", *attempt)
	}
	res := q.Updates(map[string]any{"start_pending": false, "acked_at": t})
	if res.Error != nil {
		return false, e.classify(res.Error)
	}
	return res.RowsAffected == 1, nil
}

func (e *gormExecutor) RunReleaseClaims(ctx context.Context, worker string) (int64, error) {
	res := e.q(ctx).Model(&runRow{}).Where("claimed_by = ? AND start_pending = ?", worker, true).
		Updates(map[string]any{"claim_until": nil, "claimed_by": nil})
	return res.RowsAffected, e.classify(res.Error)
}

func (e *gormExecutor) RunStartEnd(ctx context.Context, runID string) error {
	return e.classify(e.q(ctx).Model(&runRow{}).Where("id = ? AND start_pending = ?", runID, true).
		Updates(map[string]any{"start_pending": false, "claim_until": nil, "claimed_by": nil}).Error)
}

func (e *gormExecutor) RunCountClaimed(ctx context.Context, worker string, now time.Time) (int64, error) {
	var n int64
	err := e.q(ctx).Model(&runRow{}).Where("claimed_by = ? AND start_pending = ? AND claim_until > ?", worker, true, newDBTime(now)).Count(&n).Error
	return n, e.classify(err)
}

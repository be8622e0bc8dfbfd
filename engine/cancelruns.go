package engine

import (
	"context"
	"time"

	"rendezvous/models"
	"rendezvous/storage"
)

// CancelRunsParams choose the runs CancelRuns cancels: RunIDs alone, or the
// started runs matching every filter given (none: all started runs), at
// most Count of them, newest first.
type CancelRunsParams struct {
	RunIDs                 []string
	Labels                 []string
	CreatedFrom, CreatedTo *time.Time
	// DispatchURL and DispatchURLPrefix: the run's dispatch URL is this,
	// or starts with this.
	DispatchURL, DispatchURLPrefix *string
	Count                          int
}

// MaxCancelCount bounds one CancelRuns call by filter.
const MaxCancelCount = 1000

// CancelRuns cancels runs as Cancel does, each in its own transaction under
// its own lock, and returns how many it moved to RUN_CANCELED. Runs that
// do not exist or have already ended are skipped, not errors: a bulk cancel
// racing a run's end is not a failure.
func (e *Engine) CancelRuns(ctx context.Context, p CancelRunsParams) (int, error) {
	var ids []string
	if len(p.RunIDs) > 0 {
		if len(p.RunIDs) > MaxCancelCount {
			return 0, errorf(CodeBadUserInput, "at most %d workflow run ids may be canceled at once", MaxCancelCount)
		}
		for _, raw := range p.RunIDs {
			id, err := e.normalizeRunID(raw)
			if err != nil {
				return 0, err
			}
			ids = append(ids, id)
		}
	} else {
		if p.Count < 1 || p.Count > MaxCancelCount {
			return 0, errorf(CodeBadUserInput, "count must be between 1 and %d", MaxCancelCount)
		}
		started := models.RunStarted
		runs, err := e.store.RunSelect(ctx, &storage.RunSelectParams{
			State: &started, Labels: p.Labels, CreatedFrom: p.CreatedFrom, CreatedTo: p.CreatedTo,
			DispatchURL: p.DispatchURL, DispatchURLPrefix: p.DispatchURLPrefix, Limit: p.Count,
		})
		if err != nil {
			return 0, storageErr("select runs to cancel", err)
		}
		for _, r := range runs {
			ids = append(ids, r.WorkflowRunID)
		}
	}
	n := 0
	for _, id := range ids {
		_, err := e.endRun(ctx, id, models.RunCanceled, nil)
		switch ErrorCode(err) {
		case "":
			if err != nil {
				return n, err
			}
			n++
		case CodeNotFound, CodeRunNotActive:
		default:
			return n, err
		}
	}
	return n, nil
}

package engine

import (
	"context"
	"encoding/base64"
	"errors"
	"time"

	"rendezvous/models"
	"rendezvous/storage"
)

// RunLogsParams filter and page RunLogs. Zero fields do not filter.
type RunLogsParams struct {
	RunID                  *string
	State                  *models.RunState
	Labels                 []string
	CreatedFrom, CreatedTo *time.Time
	DispatchURL            *string // the run's dispatch URL is exactly this
	Cursor                 string  // from RunLogPage.Cursor
	Count                  int
}

// RunLogPage is one page of RunLogs; Cursor is "" on the last page.
type RunLogPage struct {
	Runs   []*RunLog
	Cursor string
}

// RunLog is a run with the details of its durable steps, for the Upstash
// logs listing.
type RunLog struct {
	Run *models.WorkflowRun
	// DispatchURL is where the run was dispatched; "" without dispatch.
	DispatchURL string
	Steps       []*RunLogStep
}

// RunLogStep is one durable step: a wait step carries its waiter as it is
// now (deadline applied, with the event data it was notified with), a
// notify step the result of its first call.
type RunLogStep struct {
	models.Step
	Waiter *models.Waiter
	Notify *models.NotifyResult
}

// RunLogs lists runs newest first with their steps.
func (e *Engine) RunLogs(ctx context.Context, p RunLogsParams) (*RunLogPage, error) {
	if p.Count < 1 || p.Count > MaxPageSize {
		return nil, errorf(CodeBadUserInput, "count must be between 1 and %d", MaxPageSize)
	}
	sp := &storage.RunSelectParams{State: p.State, Labels: p.Labels, CreatedFrom: p.CreatedFrom, CreatedTo: p.CreatedTo, DispatchURL: p.DispatchURL, Limit: p.Count + 1}
	if p.RunID != nil {
		id, err := e.normalizeRunID(*p.RunID)
		if err != nil {
			return nil, err
		}
		sp.RunIDs = []string{id}
	}
	if p.Cursor != "" {
		raw, err := base64.RawURLEncoding.DecodeString(p.Cursor)
		if err != nil || len(raw) == 0 {
			return nil, errorf(CodeBadUserInput, "cursor is not a cursor this service made")
		}
		sp.AfterRunID = string(raw)
	}
	runs, err := e.store.RunSelect(ctx, sp)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, errorf(CodeBadUserInput, "cursor is not a cursor this service made")
	}
	if err != nil {
		return nil, storageErr("list run logs", err)
	}
	page := &RunLogPage{Runs: make([]*RunLog, 0, len(runs))}
	if len(runs) > p.Count {
		runs = runs[:p.Count]
		page.Cursor = base64.RawURLEncoding.EncodeToString([]byte(runs[len(runs)-1].WorkflowRunID))
	}
	for _, run := range runs {
		steps, err := e.runLogSteps(ctx, run.WorkflowRunID)
		if err != nil {
			return nil, err
		}
		l := &RunLog{Run: run, Steps: steps}
		ob, err := e.store.OutboxGetByRun(ctx, run.WorkflowRunID)
		switch {
		case err == nil:
			l.DispatchURL = ob.URL
		case !errors.Is(err, storage.ErrNotFound):
			return nil, storageErr("get dispatch of "+run.WorkflowRunID, err)
		}
		page.Runs = append(page.Runs, l)
	}
	return page, nil
}

// runLogSteps reads the run's steps, each wait step's waiter with its data
// and each notify step's stored result: a few reads per step, which a
// listing of at most MaxPageSize runs can afford.
func (e *Engine) runLogSteps(ctx context.Context, runID string) ([]*RunLogStep, error) {
	recs, err := e.store.StepListByRun(ctx, runID)
	if err != nil {
		return nil, storageErr("list steps of "+runID, err)
	}
	now := e.now()
	out := make([]*RunLogStep, 0, len(recs))
	for _, r := range recs {
		s := &RunLogStep{Step: models.Step{StepName: r.StepName, Type: r.Type, EventID: r.EventID, CreatedAt: r.CreatedAt, CompletedAt: r.CompletedAt}}
		switch r.Type {
		case models.StepWaitForEvent:
			if r.WaiterID != "" {
				w, err := e.store.WaiterGet(ctx, r.WaiterID)
				if err != nil && !errors.Is(err, storage.ErrNotFound) {
					return nil, storageErr("get waiter of step "+r.StepName, err)
				}
				if w != nil {
					s.Waiter = effective(w, now)
					s.CompletedAt = s.Waiter.EndedAt
				}
			}
		case models.StepNotify:
			if len(r.Result) > 0 {
				res, err := decodeNotifyStepResult(r.Result)
				if err != nil {
					return nil, storageErr("read result of step "+r.StepName, err)
				}
				s.Notify = res
			}
		}
		out = append(out, s)
	}
	return out, nil
}

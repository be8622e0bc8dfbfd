// Run selections by several filters at once, for the Upstash REST surface's
// logs listing and bulk cancel (RunList serves GraphQL's workflowRuns).

package storage

import (
	"context"
	"time"
	"unicode/utf8"

	"rendezvous/models"
)

// RunSelectParams filter RunSelect; zero fields do not filter. Filters are
// combined with AND; a list matches any of its values.
type RunSelectParams struct {
	RunIDs []string
	State  *models.RunState
	Labels []string
	// CreatedFrom and CreatedTo bound created_at, both inclusive.
	CreatedFrom, CreatedTo *time.Time
	// DispatchURL and DispatchURLPrefix match runs triggered with a
	// dispatch to exactly that URL, or to a URL starting with the prefix
	// (compared byte for byte, as ids are); runs without dispatch never match.
	DispatchURL, DispatchURLPrefix *string
	// AfterRunID continues a newest-first listing after this run;
	// ErrNotFound if it does not exist.
	AfterRunID string
	Limit      int
}

// RunSelect lists runs matching p, newest first (by insertion order).
func (e *gormExecutor) RunSelect(ctx context.Context, p *RunSelectParams) ([]*models.WorkflowRun, error) {
	q := e.q(ctx).Model(&runRow{})
	if len(p.RunIDs) > 0 {
		q = q.Where("id IN ?", p.RunIDs)
	}
	if p.State != nil {
		q = q.Where("state = ?", string(*p.State))
	}
	if len(p.Labels) > 0 {
		q = q.Where("label IN ?", p.Labels)
	}
	if p.CreatedFrom != nil {
		q = q.Where("created_at >= ?", newDBTime(*p.CreatedFrom))
	}
	if p.CreatedTo != nil {
		q = q.Where("created_at <= ?", newDBTime(*p.CreatedTo))
	}
	if p.DispatchURL != nil {
		q = q.Where("EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = runs.id AND o.kind = ? AND o.url = ?)", OutboxKindDispatch, *p.DispatchURL)
	}
	if p.DispatchURLPrefix != nil {
		// SUBSTR counts characters on both dialects, and the column's
		// binary collation (MySQL) compares exactly; LIKE would be
		// case-insensitive on SQLite and need its wildcards escaped.
		prefix := *p.DispatchURLPrefix
		q = q.Where("EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = runs.id AND o.kind = ? AND SUBSTR(o.url, 1, ?) = ?)",
			OutboxKindDispatch, utf8.RuneCountInString(prefix), prefix)
	}
	return e.runsPage(ctx, q, p.AfterRunID, p.Limit)
}

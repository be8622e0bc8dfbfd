// Retention: deleting what has ended long enough ago, in small batches.

package storage

import (
	"context"
	"slices"
	"time"

	"rendezvous/models"
)

// PurgeParams bound one purge batch.
type PurgeParams struct {
	// EndedBefore: rows that ended at or before it may go.
	EndedBefore time.Time
	// Now is the present, for what is still live (a lookback event not yet
	// expired).
	Now time.Time
	// Limit caps the rows one call deletes (a little more with the runs and
	// notifications that go with them).
	Limit int
}

// PurgeResult counts what one call deleted.
type PurgeResult struct {
	Runs, Waiters, Steps, LookbackEvents, Notifications int64
	// Deliveries: outbox rows (a run's dispatch, its waiters' callbacks), purged with their run.
	Deliveries int64
	// More: the call stopped at its limit; call again for the rest.
	More bool
}

// Add sums two results.
func (r PurgeResult) Add(o PurgeResult) PurgeResult {
	return PurgeResult{
		Runs: r.Runs + o.Runs, Waiters: r.Waiters + o.Waiters, Steps: r.Steps + o.Steps,
		LookbackEvents: r.LookbackEvents + o.LookbackEvents, Notifications: r.Notifications + o.Notifications,
		Deliveries: r.Deliveries + o.Deliveries,
		More:       r.More || o.More,
	}
}

// Rows is every row deleted.
func (r PurgeResult) Rows() int64 {
	return r.Runs + r.Waiters + r.Steps + r.LookbackEvents + r.Notifications + r.Deliveries
}

// purgeRunsPerBatch: runs looked at per call; their rows fill the rest of
// the limit.
const purgeRunsPerBatch = 50

// purgeRunCandidatesSQL picks the runs that ended longest ago, in the order
// of runs_ended, leaving out any run that still has something live: a
// waiter WAITING, a lookback event neither consumed nor expired, or a
// delivery still owed (a waiter's callback goes on after its run ended,
// the dispatch in flight when it ended is still recorded). (Ending
// a run ends its waiters and drops its pending lookback events, in the same
// transaction, so neither should exist; if one does, the run stays.) A run
// in RUN_STARTED has no ended_at.
//
// Anti-joins, not NOT EXISTS: MariaDB turned NOT EXISTS on lookback_events
// into a materialized table of every pending lookback event, built on each
// call. A LEFT JOIN keeps runs the outer table, read in runs_ended order,
// each probed by run_id (waiters_run_state_ended, lookback_run_event_consumed,
// outbox_run) and dropped at the first live row. The unary pluses keep
// SQLite (which has no statistics) from probing lookback_events by
// (consumed, expires_at) or outbox by (state, next_attempt_at), a scan of
// every pending row per run, instead of by run_id; MySQL ignores them.
const purgeRunCandidatesSQL = `SELECT r.seq, r.id FROM runs r
LEFT JOIN waiters w ON w.run_id = r.id AND w.state = ?
LEFT JOIN lookback_events l ON l.run_id = r.id AND +l.consumed = ? AND +l.expires_at > ?
LEFT JOIN outbox o ON o.run_id = r.id AND +o.state IN (?, ?)
WHERE r.ended_at <= ? AND r.state <> ? AND w.seq IS NULL AND l.seq IS NULL AND o.seq IS NULL
ORDER BY r.ended_at, r.state, r.seq LIMIT ?`

// RunPurge deletes runs that ended at or before p.EndedBefore with
// everything of theirs: waiters, steps, lookback events, outbox rows, and the
// notifications no other waiter still refers to. One call deletes at most
// about p.Limit rows; a run goes last, once nothing of it is left, so a
// call that stops at the limit leaves every run whole or still listed for
// the next call. Run it inside InTx: the waiters and the notifications
// they leave unreferenced go together.
func (e *gormExecutor) RunPurge(ctx context.Context, p *PurgeParams) (PurgeResult, error) {
	var res PurgeResult
	if err := e.runEndedAtRepair(ctx, p.Limit); err != nil {
		return res, err
	}
	type candidate struct {
		Seq int64  `gorm:"column:seq"`
		ID  string `gorm:"column:id"`
	}
	var runs []candidate
	if err := e.q(ctx).Raw(purgeRunCandidatesSQL, string(models.WaiterWaiting), false, newDBTime(p.Now),
		string(models.DispatchPending), string(OutboxHeld), newDBTime(p.EndedBefore), string(models.RunStarted), min(purgeRunsPerBatch, max(p.Limit, 1))).Scan(&runs).Error; err != nil {
		return res, e.classify(err)
	}
	if len(runs) == 0 {
		return res, nil
	}
	ids := make([]string, len(runs))
	seqs := make([]int64, len(runs))
	for i, r := range runs {
		ids[i], seqs[i] = r.ID, r.Seq
	}
	budget := max(p.Limit, 1)

	// Waiters first, remembering the notifications they pointed at.
	var ws []waiterRef
	if err := e.q(ctx).Model(&waiterRow{}).Select("seq, message_id").
		Where("run_id IN ? AND state <> ?", ids, string(models.WaiterWaiting)).Limit(budget).Scan(&ws).Error; err != nil {
		return res, e.classify(err)
	}
	complete := len(ws) < budget
	if err := e.purgeWaiters(ctx, ws, &res); err != nil {
		return res, err
	}
	budget -= len(ws)

	for _, child := range runChildren {
		if budget <= 0 {
			complete = false
			break
		}
		var rows []int64
		if err := e.q(ctx).Table(child.table).Where("run_id IN ?", ids).Limit(budget).Pluck("seq", &rows).Error; err != nil {
			return res, e.classify(err)
		}
		if len(rows) == budget {
			complete = false
		}
		if len(rows) > 0 {
			del := e.q(ctx).Exec("DELETE FROM "+child.table+" WHERE seq IN ?", rows)
			if del.Error != nil {
				return res, e.classify(del.Error)
			}
			*child.count(&res) += del.RowsAffected
		}
		budget -= len(rows)
	}
	if !complete {
		res.More = true
		return res, nil
	}
	// Nothing of these runs is left: the runs themselves. (An ended run
	// gains no rows: every write to a run checks, under its lock, that it
	// is started.)
	del := e.q(ctx).Where("seq IN ? AND state <> ?", seqs, string(models.RunStarted)).Delete(&runRow{})
	if del.Error != nil {
		return res, e.classify(del.Error)
	}
	res.Runs = del.RowsAffected
	res.More = len(runs) == min(purgeRunsPerBatch, max(p.Limit, 1))
	return res, nil
}

// runEndedAtRepair gives runs ended without an ended_at their updated_at
// (when they ended). Migration 4 did so for the runs of its time, but
// during a rolling upgrade replicas still on the older binary end runs
// without setting it, and such a run would never be purged. Served by
// runs_ended's (NULL, ended state) ranges; with none it costs one probe.
func (e *gormExecutor) runEndedAtRepair(ctx context.Context, limit int) error {
	ended := []string{string(models.RunSuccess), string(models.RunFailed), string(models.RunCanceled)}
	var seqs []int64
	if err := e.q(ctx).Model(&runRow{}).Where("ended_at IS NULL AND state IN ?", ended).
		Limit(max(limit, 1)).Pluck("seq", &seqs).Error; err != nil {
		return e.classify(err)
	}
	if len(seqs) == 0 {
		return nil
	}
	return e.classify(e.q(ctx).Exec("UPDATE runs SET ended_at = updated_at WHERE seq IN ? AND ended_at IS NULL AND state IN ?", seqs, ended).Error)
}

// runChildren are the tables, other than waiters, whose rows belong to a
// run by run_id and go with it. An ended run's outbox rows have ended too
// before it is purged (ending a run cancels its pending dispatch in the
// same transaction; the candidates leave out runs with a delivery owed).
var runChildren = []struct {
	table string
	count func(*PurgeResult) *int64
}{
	{"steps", func(r *PurgeResult) *int64 { return &r.Steps }},
	{"lookback_events", func(r *PurgeResult) *int64 { return &r.LookbackEvents }},
	{"outbox", func(r *PurgeResult) *int64 { return &r.Deliveries }},
}

// WaiterPurgeRunless deletes up to p.Limit waiters without a run that
// ended at or before p.EndedBefore, and the notifications no waiter refers
// to any more.
// A waiter WAITING has no end and is never among them. Run it inside InTx.
func (e *gormExecutor) WaiterPurgeRunless(ctx context.Context, p *PurgeParams) (PurgeResult, error) {
	var res PurgeResult
	limit := max(p.Limit, 1)
	var ws []waiterRef
	// One ended state at a time: each is a range of waiters_run_state_ended
	// (run_id NULL, state, ended_at) that holds only ended waiters. With
	// state <> WAITING instead, the scan would walk past every live
	// subscription's waiter (run_id NULL, WAITING) on each call.
	for _, state := range []models.WaiterState{models.WaiterNotified, models.WaiterTimedOut, models.WaiterCanceled} {
		if len(ws) == limit {
			break
		}
		var more []waiterRef
		if err := e.q(ctx).Model(&waiterRow{}).Select("seq, message_id").
			Where("run_id IS NULL AND state = ? AND ended_at <= ?", string(state), newDBTime(p.EndedBefore)).
			Order("ended_at").Limit(limit - len(ws)).Scan(&more).Error; err != nil {
			return res, e.classify(err)
		}
		ws = append(ws, more...)
	}
	if err := e.purgeWaiters(ctx, ws, &res); err != nil {
		return res, err
	}
	res.More = len(ws) == limit
	return res, nil
}

type waiterRef struct {
	Seq       int64   `gorm:"column:seq"`
	MessageID *string `gorm:"column:message_id"`
}

// purgeWaiters deletes the waiters by primary key, then the notifications
// among theirs that no waiter refers to any more. The check for other
// waiters is a locking read on MySQL: two replicas purging two waiters of
// one notification at once then wait for each other (or deadlock, and one
// is retried) instead of both seeing the other's waiter still there and
// keeping the notification for ever. Lookback events keep their own copy
// of the data, so they never refer to a notification.
func (e *gormExecutor) purgeWaiters(ctx context.Context, ws []waiterRef, res *PurgeResult) error {
	if len(ws) == 0 {
		return nil
	}
	seqs := make([]int64, len(ws))
	var msgs []string
	seen := map[string]bool{}
	for i, w := range ws {
		seqs[i] = w.Seq
		if w.MessageID != nil && !seen[*w.MessageID] {
			seen[*w.MessageID] = true
			msgs = append(msgs, *w.MessageID)
		}
	}
	for chunk := range chunks(seqs) {
		del := e.q(ctx).Where("seq IN ? AND state <> ?", chunk, string(models.WaiterWaiting)).Delete(&waiterRow{})
		if del.Error != nil {
			return e.classify(del.Error)
		}
		res.Waiters += del.RowsAffected
	}
	for len(msgs) > 0 {
		n := min(len(msgs), chunkSize)
		chunk := msgs[:n]
		msgs = msgs[n:]
		var still []string
		if err := e.lock(e.q(ctx).Model(&waiterRow{}).Where("message_id IN ?", chunk), true).
			Distinct("message_id").Pluck("message_id", &still).Error; err != nil {
			return e.classify(err)
		}
		var free []string
		for _, m := range chunk {
			if !slices.Contains(still, m) {
				free = append(free, m)
			}
		}
		if len(free) == 0 {
			continue
		}
		del := e.q(ctx).Where("message_id IN ?", free).Delete(&notificationRow{})
		if del.Error != nil {
			return e.classify(del.Error)
		}
		res.Notifications += del.RowsAffected
	}
	return nil
}

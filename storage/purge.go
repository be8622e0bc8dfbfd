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
	// After: RunPurge reads ended runs after this position and moves it
	// past the runs it is done with (purged, or kept because something of
	// theirs is still live), so that a caller passing the same params again
	// goes on where the last call stopped. nil: from the oldest.
	After *RunCursor
}

// RunCursor is a position in the order RunPurge reads ended runs, the
// order of runs_ended: (ended_at, state, seq).
type RunCursor struct {
	EndedAt time.Time
	State   string
	Seq     int64
}

// PurgeResult counts what one call deleted.
type PurgeResult struct {
	Runs, Waiters, Steps, LookbackEvents, Notifications int64
	// Deliveries: outbox rows (a run's dispatch, its waiters' callbacks), purged with their run.
	Deliveries int64
	// More: the call stopped before the end (at its limit, or at the end
	// of what it read); call again, with the same params, for the rest.
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

// purgeRunsPerBatch: runs purged per call at most; their rows fill the
// rest of the limit.
const purgeRunsPerBatch = 50

// purgeScanRuns: ended runs read per call to find those to purge. A run
// with something still live is skipped (see purgeRunsLiveSQL), and the
// cursor moves past it, so runs kept at the head of runs_ended (a callback
// owed for days) never stall the purge of those behind them.
const purgeScanRuns = 200

// purgeRunsLiveSQL lists which of the given runs still have something live:
// a waiter WAITING, a lookback event neither consumed nor expired, or a
// delivery owed (a waiter's callback goes on after its run ended; the
// dispatch in flight when it ended is still recorded). Ending a run ends
// its waiters and drops its pending lookback events in the same
// transaction, so the first two should not exist; if one does, the run
// stays.
//
// Each part is a probe by run_id for an IN list (waiters_run_state_ended,
// lookback_run_event_consumed, outbox_run), not a join from runs. As joins
// from the scan of runs_ended, MariaDB picked its plans from table
// statistics, which lag behind a table that grew or shrank: it probed
// waiters by state (every live subscription's waiter, per run), joined
// lookback_events as a block nested loop over every pending event (597 ms
// per call for 50 runs after a bulk load), and planned outbox "Range
// checked for each record" (967 ms per call on 1M ended runs). For a
// short IN list it estimates each index by diving into it, and run_id
// wins. The unary pluses keep SQLite (which has no statistics) from
// probing lookback_events by (consumed, expires_at) or outbox by (state,
// next_attempt_at) instead of by run_id; MySQL ignores them.
const purgeRunsLiveSQL = `SELECT run_id FROM waiters WHERE run_id IN ? AND state = ?
UNION SELECT run_id FROM lookback_events WHERE run_id IN ? AND +consumed = ? AND +expires_at > ?
UNION SELECT run_id FROM outbox WHERE run_id IN ? AND +state IN ?`

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
	runs, next, scannedAll, err := e.runsToPurge(ctx, p)
	if err != nil {
		return res, err
	}
	if len(runs) == 0 {
		p.After, res.More = next, !scannedAll
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
		// The same runs come first again next call: the cursor stays.
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
	p.After, res.More = next, !scannedAll
	return res, nil
}

type purgeCandidate struct {
	Seq     int64  `gorm:"column:seq"`
	ID      string `gorm:"column:id"`
	State   string `gorm:"column:state"`
	EndedAt dbTime `gorm:"column:ended_at"`
}

// runsToPurge reads up to purgeScanRuns ended runs after p.After, oldest
// first, and returns the first of them (purgeRunsPerBatch at most, and
// the call's limit) with nothing live, the position just after the last
// run it returned or skipped, and whether it read every ended run left.
func (e *gormExecutor) runsToPurge(ctx context.Context, p *PurgeParams) (runs []purgeCandidate, next *RunCursor, scannedAll bool, err error) {
	q := e.q(ctx).Model(&runRow{}).Select("seq, id, state, ended_at").
		Where("ended_at <= ? AND state <> ?", newDBTime(p.EndedBefore), string(models.RunStarted))
	if a := p.After; a != nil {
		at := newDBTime(a.EndedAt)
		q = q.Where("ended_at >= ? AND (ended_at > ? OR state > ? OR (state = ? AND seq > ?))", at, at, a.State, a.State, a.Seq)
	}
	var scanned []purgeCandidate
	if err := q.Order("ended_at, state, seq").Limit(purgeScanRuns).Scan(&scanned).Error; err != nil {
		return nil, p.After, false, e.classify(err)
	}
	next, scannedAll = p.After, len(scanned) < purgeScanRuns
	if len(scanned) == 0 {
		return nil, next, scannedAll, nil
	}
	ids := make([]string, len(scanned))
	for i, r := range scanned {
		ids[i] = r.ID
	}
	var live []string
	if err := e.q(ctx).Raw(purgeRunsLiveSQL, ids, string(models.WaiterWaiting), ids, false, newDBTime(p.Now),
		ids, []string{string(models.DispatchPending), string(OutboxHeld)}).Scan(&live).Error; err != nil {
		return nil, p.After, false, e.classify(err)
	}
	want := min(purgeRunsPerBatch, max(p.Limit, 1))
	for i, r := range scanned {
		if len(runs) == want {
			// Stopped before the end of what was read: more is left.
			return runs, next, false, nil
		}
		if !slices.Contains(live, r.ID) {
			runs = append(runs, r)
		}
		next = &RunCursor{EndedAt: scanned[i].EndedAt.Time, State: r.State, Seq: r.Seq}
	}
	return runs, next, scannedAll, nil
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

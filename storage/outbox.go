// The outbox table: HTTP calls Rendezvous owes (a run's dispatch), written
// in the transaction that caused them and claimed by the delivery loop of
// any replica.

package storage

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"rendezvous/models"
)

// Kinds of outbox rows.
const (
	// OutboxKindDispatch is a run's dispatch (trigger with dispatch).
	OutboxKindDispatch = "dispatch"
	// OutboxKindCallback is a waiter's callback (waitForEventCallback): its
	// row is written HELD with the waiter and made PENDING, due at once, by
	// the statement that ends the waiter (WaiterEnd), in its transaction.
	OutboxKindCallback = "callback"
)

// OutboxHeld is the state of a callback row whose waiter is still
// WAITING: never claimed, never counted as pending; WaiterEnd moves it to
// PENDING. It is a storage state, not one of models.DispatchState's.
const OutboxHeld models.DispatchState = "HELD"

// OutboxRecord is one delivery as stored.
type OutboxRecord struct {
	ID    string // the delivery id, the same on every attempt
	RunID *string
	// WaiterID is a callback's waiter ("" for a dispatch).
	WaiterID    string
	Kind        string
	URL         string
	Headers     []byte // a JSON object of strings, or nil
	Body        []byte
	State       models.DispatchState
	Attempts    int // attempts claimed so far (the one in flight included)
	MaxAttempts int // retries + 1
	// NextAttemptAt: when the row is next due. A claim moves it to the end
	// of the claim's lease, so a claimed row is due again only if its
	// claimer did not record a result in time.
	NextAttemptAt time.Time
	Claim         string // the current claim's token; "" before the first
	LastStatus    *int
	LastError     *string
	CreatedAt     time.Time
	EndedAt       *time.Time // delivered, failed or canceled
}

type outboxRow struct {
	Seq           int64   `gorm:"column:seq;primaryKey;autoIncrement"`
	ID            string  `gorm:"column:id"`
	RunID         *string `gorm:"column:run_id"`
	WaiterSeq     *int64  `gorm:"column:waiter_seq"`
	Kind          string  `gorm:"column:kind"`
	URL           string  `gorm:"column:url"`
	Headers       []byte  `gorm:"column:headers"`
	Body          []byte  `gorm:"column:body"`
	State         string  `gorm:"column:state"`
	Attempts      int     `gorm:"column:attempts"`
	MaxAttempts   int     `gorm:"column:max_attempts"`
	NextAttemptAt dbTime  `gorm:"column:next_attempt_at"`
	Claim         *string `gorm:"column:claim"`
	LastStatus    *int    `gorm:"column:last_status"`
	LastError     *string `gorm:"column:last_error"`
	CreatedAt     dbTime  `gorm:"column:created_at"`
	EndedAt       dbTime  `gorm:"column:ended_at"`
}

func (outboxRow) TableName() string { return "outbox" }

func (r *outboxRow) record() *OutboxRecord {
	waiter := ""
	if r.WaiterSeq != nil {
		waiter = waiterID(*r.WaiterSeq)
	}
	return &OutboxRecord{WaiterID: waiter,
		ID: r.ID, RunID: r.RunID, Kind: r.Kind, URL: r.URL, Headers: r.Headers, Body: r.Body,
		State: models.DispatchState(r.State), Attempts: r.Attempts, MaxAttempts: r.MaxAttempts,
		NextAttemptAt: r.NextAttemptAt.Time, Claim: deref(r.Claim), LastStatus: r.LastStatus,
		LastError: r.LastError, CreatedAt: r.CreatedAt.Time, EndedAt: r.EndedAt.ptr(),
	}
}

// maxLastError is the last_error column's size; longer texts are cut.
const maxLastError = 500

func (e *gormExecutor) OutboxInsert(ctx context.Context, r *OutboxRecord) error {
	row := outboxRow{
		ID: r.ID, RunID: r.RunID, Kind: r.Kind, URL: r.URL, Headers: r.Headers, Body: r.Body,
		State: string(r.State), MaxAttempts: r.MaxAttempts, NextAttemptAt: newDBTime(r.NextAttemptAt),
		CreatedAt: newDBTime(r.CreatedAt),
	}
	if r.WaiterID != "" {
		seq, ok := parseSeq(r.WaiterID, waiterIDPrefix)
		if !ok {
			return fmt.Errorf("outbox row for waiter %q: not a waiter id", r.WaiterID)
		}
		row.WaiterSeq = &seq
	}
	return e.classify(e.q(ctx).Create(&row).Error)
}

func (e *gormExecutor) OutboxGetByRun(ctx context.Context, runID string) (*OutboxRecord, error) {
	var row outboxRow
	// The run's dispatch: its waiters' callbacks carry the run id too.
	if err := e.q(ctx).Where("run_id = ? AND kind = ?", runID, OutboxKindDispatch).Order("seq").Take(&row).Error; err != nil {
		return nil, e.notFound(err)
	}
	return row.record(), nil
}

func (e *gormExecutor) OutboxGetByWaiter(ctx context.Context, waiterID string) (*OutboxRecord, error) {
	seq, ok := parseSeq(waiterID, waiterIDPrefix)
	if !ok {
		return nil, ErrNotFound
	}
	var row outboxRow
	if err := e.q(ctx).Where("waiter_seq = ?", seq).Order("seq").Take(&row).Error; err != nil {
		return nil, e.notFound(err)
	}
	return row.record(), nil
}

// outboxDue makes the HELD callbacks of the waiters (row keys) that a
// WaiterEnd just ended PENDING and due at now, and notes it for the hook
// that runs after the commit (the delivery loop's wake-up).
func (e *gormExecutor) outboxDue(ctx context.Context, waiterSeqs []int64, now time.Time) error {
	for chunk := range chunks(waiterSeqs) {
		res := e.q(ctx).Model(&outboxRow{}).Where("waiter_seq IN ? AND state = ?", chunk, string(OutboxHeld)).
			Updates(map[string]any{"state": string(models.DispatchPending), "next_attempt_at": newDBTime(now)})
		if res.Error != nil {
			return e.classify(res.Error)
		}
		if res.RowsAffected > 0 && e.notes != nil {
			e.notes.outboxDue = true
		}
	}
	return nil
}

func (e *gormExecutor) OutboxGet(ctx context.Context, id string) (*OutboxRecord, error) {
	var row outboxRow
	if err := e.q(ctx).Where("id = ?", id).Take(&row).Error; err != nil {
		return nil, e.notFound(err)
	}
	return row.record(), nil
}

// noSkipLocked is set once the database has refused SKIP LOCKED (MySQL
// before 8.0, MariaDB before 10.6): claims then rely on the compare and set
// alone.
var noSkipLocked atomic.Bool

// claimCandidates plucks the seq of the rows query() selects, for a claim
// that compare-and-sets them next. On MySQL the rows are read with FOR
// UPDATE SKIP LOCKED, so that replicas claiming at once each take different
// rows instead of queueing behind one another's locks; a database that
// refuses SKIP LOCKED is asked again without it, and never again with it.
func (e *gormExecutor) claimCandidates(query func() *gorm.DB) ([]int64, error) {
	var seqs []int64
	if e.dialect == DialectMySQL && !noSkipLocked.Load() {
		err := query().Clauses(clause.Locking{Strength: "UPDATE", Options: "SKIP LOCKED"}).Pluck("seq", &seqs).Error
		if err != nil && isSyntaxError(err) {
			noSkipLocked.Store(true)
			seqs = nil
			err = query().Pluck("seq", &seqs).Error
		}
		if err != nil {
			return nil, e.classify(err)
		}
		return seqs, nil
	}
	if err := query().Pluck("seq", &seqs).Error; err != nil {
		return nil, e.classify(err)
	}
	return seqs, nil
}

func (e *gormExecutor) OutboxClaim(ctx context.Context, p *OutboxClaimParams) ([]*OutboxRecord, error) {
	now := newDBTime(p.Now)
	due := func() *gorm.DB {
		return e.q(ctx).Model(&outboxRow{}).Where("state = ? AND next_attempt_at <= ?", string(models.DispatchPending), now)
	}
	seqs, err := e.claimCandidates(func() *gorm.DB { return due().Order("next_attempt_at, seq").Limit(p.Limit) })
	if err != nil {
		return nil, err
	}
	if len(seqs) == 0 {
		return nil, nil
	}
	// The compare and set: a row another claimer took meanwhile is no
	// longer due (its next_attempt_at moved to its lease's end), so the
	// update leaves it alone. The UPDATE reads the latest committed row.
	res := due().Where("seq IN ?", seqs).Updates(map[string]any{
		"claim":           p.Claim,
		"next_attempt_at": newDBTime(p.LeaseUntil),
		"attempts":        gorm.Expr("attempts + 1"),
	})
	if res.Error != nil {
		return nil, e.classify(res.Error)
	}
	if res.RowsAffected == 0 {
		return nil, nil
	}
	var rows []outboxRow
	if err := e.q(ctx).Where("seq IN ? AND claim = ?", seqs, p.Claim).Order("seq").Find(&rows).Error; err != nil {
		return nil, e.classify(err)
	}
	out := make([]*OutboxRecord, len(rows))
	for i := range rows {
		out[i] = rows[i].record()
	}
	return out, nil
}

func isSyntaxError(err error) bool {
	// 1064: ER_PARSE_ERROR.
	return err != nil && (strings.Contains(err.Error(), "Error 1064") || strings.Contains(err.Error(), "1064 (42000)"))
}

func (e *gormExecutor) OutboxRecordAttempt(ctx context.Context, p *OutboxAttemptParams) (bool, error) {
	set := map[string]any{
		"state":           string(p.State),
		"last_status":     p.LastStatus,
		"last_error":      cut(p.LastError),
		"next_attempt_at": newDBTime(p.NextAttemptAt),
		"claim":           nil,
	}
	if p.State != models.DispatchPending {
		set["ended_at"] = newDBTime(p.Now)
	}
	if p.Uncount {
		set["attempts"] = gorm.Expr("attempts - 1")
	}
	res := e.q(ctx).Model(&outboxRow{}).
		Where("id = ? AND claim = ? AND state = ?", p.ID, p.Claim, string(models.DispatchPending)).Updates(set)
	if res.Error != nil {
		return false, e.classify(res.Error)
	}
	return res.RowsAffected == 1, nil
}

func cut(s *string) *string {
	if s == nil || len(*s) <= maxLastError {
		return s
	}
	c := strings.ToValidUTF8((*s)[:maxLastError], "")
	return &c
}

func (e *gormExecutor) OutboxCancelByRun(ctx context.Context, runID string, now time.Time) (int64, error) {
	// A delivery in flight (claimed) is left to its claimer: the run may
	// have ended because of it (the receiver finished the run before it
	// answered), and its result is the truth.
	// Only the run's dispatch: its waiters' callbacks are still owed (a
	// canceled waiter's callback says so).
	res := e.q(ctx).Model(&outboxRow{}).Where("run_id = ? AND kind = ? AND state = ? AND claim IS NULL", runID, OutboxKindDispatch, string(models.DispatchPending)).
		Updates(map[string]any{"state": string(models.DispatchCanceled), "ended_at": newDBTime(now), "claim": nil})
	return res.RowsAffected, e.classify(res.Error)
}

func (e *gormExecutor) OutboxCountByState(ctx context.Context) (map[models.DispatchState]int64, error) {
	return countByState[models.DispatchState](e, ctx, &outboxRow{})
}

func (e *gormExecutor) OutboxNextDue(ctx context.Context) (*time.Time, error) {
	var row outboxRow
	err := e.q(ctx).Select("next_attempt_at").Where("state = ?", string(models.DispatchPending)).
		Order("next_attempt_at").Take(&row).Error
	if err != nil {
		if err = e.notFound(err); errors.Is(err, ErrNotFound) {
			return nil, nil
		}
		return nil, err
	}
	t := row.NextAttemptAt.Time
	return &t, nil
}

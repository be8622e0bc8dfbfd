package storage

import (
	"database/sql/driver"
	"fmt"
	"strconv"
	"strings"
	"time"

	"rendezvous/models"
)

// Rows as stored. Every table orders by its auto-increment seq, never by a
// timestamp. Public ids of waiters and lookback events are derived from seq.

type runRow struct {
	Seq       int64   `gorm:"column:seq;primaryKey;autoIncrement"`
	ID        string  `gorm:"column:id"`
	State     string  `gorm:"column:state"`
	Body      []byte  `gorm:"column:body"`
	Label     *string `gorm:"column:label"`
	Result    []byte  `gorm:"column:result"`
	CreatedAt dbTime  `gorm:"column:created_at"`
	UpdatedAt dbTime  `gorm:"column:updated_at"`
	// EndedAt is when the run left RUN_STARTED (NULL while started): the
	// retention purge counts from it.
	EndedAt dbTime `gorm:"column:ended_at"`
	// Hand-over to workers (runsToStart); see claims.go.
	StartPending bool    `gorm:"column:start_pending"`
	ClaimedBy    *string `gorm:"column:claimed_by"`
	ClaimUntil   dbTime  `gorm:"column:claim_until"`
	ClaimedAt    dbTime  `gorm:"column:claimed_at"`
	AckedAt      dbTime  `gorm:"column:acked_at"`
	Attempts     int     `gorm:"column:attempts"`
}

func (runRow) TableName() string { return "runs" }

type waiterRow struct {
	Seq       int64   `gorm:"column:seq;primaryKey;autoIncrement"`
	EventID   string  `gorm:"column:event_id"`
	RunID     *string `gorm:"column:run_id"`
	StepName  *string `gorm:"column:step_name"`
	State     string  `gorm:"column:state"`
	Deadline  dbTime  `gorm:"column:deadline"`
	CreatedAt dbTime  `gorm:"column:created_at"`
	EndedAt   dbTime  `gorm:"column:ended_at"`
	MessageID *string `gorm:"column:message_id"`
	EventData []byte  `gorm:"column:event_data"`
	ReplicaID *string `gorm:"column:replica_id"`
}

func (waiterRow) TableName() string { return "waiters" }

type replicaRow struct {
	ID         string `gorm:"column:id;primaryKey"`
	LeaseUntil dbTime `gorm:"column:lease_until"`
}

func (replicaRow) TableName() string { return "replicas" }

type lookbackRow struct {
	Seq        int64  `gorm:"column:seq;primaryKey;autoIncrement"`
	RunID      string `gorm:"column:run_id"`
	EventID    string `gorm:"column:event_id"`
	EventData  []byte `gorm:"column:event_data"`
	MessageID  string `gorm:"column:message_id"`
	Consumed   bool   `gorm:"column:consumed"`
	CreatedAt  dbTime `gorm:"column:created_at"`
	ExpiresAt  dbTime `gorm:"column:expires_at"`
	ConsumedAt dbTime `gorm:"column:consumed_at"`
}

func (lookbackRow) TableName() string { return "lookback_events" }

type stepRow struct {
	Seq         int64  `gorm:"column:seq;primaryKey;autoIncrement"`
	RunID       string `gorm:"column:run_id"`
	StepName    string `gorm:"column:step_name"`
	Type        string `gorm:"column:type"`
	EventID     string `gorm:"column:event_id"`
	WaiterSeq   *int64 `gorm:"column:waiter_seq"`
	Result      []byte `gorm:"column:result"`
	CreatedAt   dbTime `gorm:"column:created_at"`
	CompletedAt dbTime `gorm:"column:completed_at"`
}

func (stepRow) TableName() string { return "steps" }

// notificationRow keeps the data of a notify that resolved waiters, once,
// however many waiters it resolved; the waiters point at it by message_id.
type notificationRow struct {
	Seq       int64  `gorm:"column:seq;primaryKey;autoIncrement"`
	MessageID string `gorm:"column:message_id"`
	EventID   string `gorm:"column:event_id"`
	EventData []byte `gorm:"column:event_data"`
	CreatedAt dbTime `gorm:"column:created_at"`
}

func (notificationRow) TableName() string { return "notifications" }

const (
	waiterIDPrefix   = "wtr_"
	lookbackIDPrefix = "lbe_"
)

func waiterID(seq int64) string   { return waiterIDPrefix + strconv.FormatInt(seq, 10) }
func lookbackID(seq int64) string { return lookbackIDPrefix + strconv.FormatInt(seq, 10) }

// parseSeq turns a public id back into its seq; ok is false for an id this
// store never made (which then simply matches no row).
func parseSeq(id, prefix string) (int64, bool) {
	rest, found := strings.CutPrefix(id, prefix)
	if !found || rest == "" || len(rest) > 19 {
		return 0, false
	}
	n, err := strconv.ParseInt(rest, 10, 64)
	if err != nil || n <= 0 || strconv.FormatInt(n, 10) != rest {
		return 0, false
	}
	return n, true
}

func (r *runRow) model() *models.WorkflowRun {
	return &models.WorkflowRun{
		WorkflowRunID: r.ID,
		State:         models.RunState(r.State),
		Body:          r.Body,
		Label:         r.Label,
		Result:        r.Result,
		CreatedAt:     r.CreatedAt.Time,
		UpdatedAt:     r.UpdatedAt.Time,
		ClaimedAt:     r.ClaimedAt.ptr(),
		AckedAt:       r.AckedAt.ptr(),
		Attempts:      r.Attempts,
	}
}

func (r *waiterRow) model() *models.Waiter {
	return &models.Waiter{
		ID:            waiterID(r.Seq),
		EventID:       r.EventID,
		WorkflowRunID: r.RunID,
		StepName:      r.StepName,
		State:         models.WaiterState(r.State),
		Deadline:      r.Deadline.Time,
		CreatedAt:     r.CreatedAt.Time,
		EndedAt:       r.EndedAt.ptr(),
		MessageID:     r.MessageID,
		EventData:     r.EventData,
		Owner:         deref(r.ReplicaID),
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (r *lookbackRow) model() *models.LookbackEvent {
	return &models.LookbackEvent{
		ID:            lookbackID(r.Seq),
		WorkflowRunID: r.RunID,
		EventID:       r.EventID,
		EventData:     r.EventData,
		MessageID:     r.MessageID,
		CreatedAt:     r.CreatedAt.Time,
		ExpiresAt:     r.ExpiresAt.Time,
	}
}

func (r *stepRow) record() *StepRecord {
	s := &StepRecord{
		RunID:       r.RunID,
		StepName:    r.StepName,
		Type:        models.StepType(r.Type),
		EventID:     r.EventID,
		Result:      r.Result,
		CreatedAt:   r.CreatedAt.Time,
		CompletedAt: r.CompletedAt.ptr(),
	}
	if r.WaiterSeq != nil {
		s.WaiterID = waiterID(*r.WaiterSeq)
	}
	return s
}

// dbTime stores a time as UTC with microseconds, written as a fixed-width
// "YYYY-MM-DD hh:mm:ss.ffffff" string. MySQL reads that into DATETIME(6);
// SQLite keeps it as TEXT, where the fixed width makes string order equal to
// time order, so deadline comparisons work the same on both. The zero time is
// NULL.
type dbTime struct{ time.Time }

const dbTimeLayout = "2006-01-02 15:04:05.000000"

func newDBTime(t time.Time) dbTime { return dbTime{t.UTC().Truncate(time.Microsecond)} }

func (t dbTime) Value() (driver.Value, error) {
	if t.IsZero() {
		return nil, nil
	}
	return t.UTC().Format(dbTimeLayout), nil
}

func (t *dbTime) Scan(src any) error {
	switch v := src.(type) {
	case nil:
		t.Time = time.Time{}
		return nil
	case time.Time:
		t.Time = v.UTC()
		return nil
	case []byte:
		return t.parse(string(v))
	case string:
		return t.parse(v)
	}
	return fmt.Errorf("scan time: unsupported type %T", src)
}

func (t *dbTime) parse(s string) error {
	for _, layout := range []string{dbTimeLayout, "2006-01-02 15:04:05.999999999", time.RFC3339Nano, "2006-01-02 15:04:05.999999999-07:00"} {
		if p, err := time.ParseInLocation(layout, s, time.UTC); err == nil {
			t.Time = p.UTC()
			return nil
		}
	}
	return fmt.Errorf("scan time: cannot parse %q", s)
}

func (t dbTime) ptr() *time.Time {
	if t.IsZero() {
		return nil
	}
	v := t.Time
	return &v
}

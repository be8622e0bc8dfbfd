package storage_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mysqldriver "github.com/go-sql-driver/mysql"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/storage"
)

// ---- helpers shared by the storage tests

// openStore opens (and migrates) the database and closes it when the test ends.
func openStore(t *testing.T, databaseURL string) storage.Store {
	t.Helper()
	s, err := storage.Open(t.Context(), databaseURL, storage.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// rawDB opens the test database directly, to look at what the store wrote.
func rawDB(t *testing.T, databaseURL string) *sql.DB {
	t.Helper()
	var (
		db  *sql.DB
		err error
	)
	switch testdb.Dialect(databaseURL) {
	case storage.DialectMySQL:
		u, perr := url.Parse(databaseURL)
		require.NoError(t, perr)
		cfg := mysqldriver.NewConfig()
		cfg.Net, cfg.Addr = "tcp", u.Host
		if u.User != nil {
			cfg.User = u.User.Username()
			cfg.Passwd, _ = u.User.Password()
		}
		cfg.DBName = strings.TrimPrefix(u.Path, "/")
		db, err = sql.Open("mysql", cfg.FormatDSN())
	default:
		// The driver registered by the store's SQLite dialector.
		path := strings.TrimPrefix(databaseURL, "sqlite://")
		db, err = sql.Open("sqlite", path+"?_pragma=busy_timeout(10000)")
	}
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	return db
}

func mysqlDBName(t *testing.T, databaseURL string) string {
	t.Helper()
	u, err := url.Parse(databaseURL)
	require.NoError(t, err)
	return strings.TrimPrefix(u.Path, "/")
}

func ptr[T any](v T) *T { return &v }

// ---- the shared store suite

// TestStore runs the same suite against every dialect, in the manner of
// River's riverdrivertest: each subtest gets a fresh database of the dialect
// through setup, so global queries (list expired, purge, list runs) see only
// the subtest's rows.
func TestStore(t *testing.T) {
	t.Parallel()
	testdb.Dialects(t, func(t *testing.T, databaseURL string) {
		dialect := testdb.Dialect(databaseURL)
		first := true
		var mu sync.Mutex
		exerciseStore(t, func(t *testing.T) string {
			mu.Lock()
			defer mu.Unlock()
			if first { // the database Dialects made for us
				first = false
				return databaseURL
			}
			if dialect == storage.DialectMySQL {
				return testdb.MySQL(t)
			}
			return testdb.SQLite(t)
		})
	})
}

type testBundle struct {
	ctx   context.Context
	store storage.Store
	url   string
	// now is the suite's clock: a fixed instant with a sub-microsecond part,
	// so truncation to microseconds is exercised everywhere.
	now time.Time
}

func exerciseStore(t *testing.T, newDatabase func(t *testing.T) string) {
	setup := func(t *testing.T) *testBundle {
		t.Helper()
		u := newDatabase(t)
		return &testBundle{
			ctx:   t.Context(),
			store: openStore(t, u),
			url:   u,
			now:   time.Date(2031, 3, 4, 5, 6, 7, 123456789, time.UTC),
		}
	}

	insertRun := func(t *testing.T, b *testBundle, id string, mods ...func(*models.WorkflowRun)) *models.WorkflowRun {
		t.Helper()
		r := &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, CreatedAt: b.now, UpdatedAt: b.now}
		for _, m := range mods {
			m(r)
		}
		require.NoError(t, b.store.RunInsert(b.ctx, r))
		return r
	}

	insertWaiter := func(t *testing.T, b *testBundle, eventID string, runID *string, deadline time.Time) *models.Waiter {
		t.Helper()
		w := &models.Waiter{EventID: eventID, WorkflowRunID: runID, State: models.WaiterWaiting, Deadline: deadline, CreatedAt: b.now}
		require.NoError(t, b.store.WaiterInsert(b.ctx, w))
		require.NotEmpty(t, w.ID)
		return w
	}

	insertLookback := func(t *testing.T, b *testBundle, runID, eventID, data string, expiresAt time.Time) *models.LookbackEvent {
		t.Helper()
		e := &models.LookbackEvent{WorkflowRunID: runID, EventID: eventID, EventData: []byte(data), MessageID: "msg_lb", CreatedAt: b.now, ExpiresAt: expiresAt}
		require.NoError(t, b.store.LookbackEventInsert(b.ctx, e))
		require.NotEmpty(t, e.ID)
		return e
	}

	ids := func(ws []*models.Waiter) []string {
		out := make([]string, len(ws))
		for i, w := range ws {
			out[i] = w.ID
		}
		return out
	}

	runIDs := func(rs []*models.WorkflowRun) []string {
		out := make([]string, len(rs))
		for i, r := range rs {
			out[i] = r.WorkflowRunID
		}
		return out
	}

	t.Run("Dialect", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		require.Equal(t, testdb.Dialect(b.url), b.store.Dialect())
		require.NoError(t, b.store.Ping(b.ctx))
	})

	t.Run("RunInsertAndGet", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		label := "checkout"
		in := insertRun(t, b, "wfr_a", func(r *models.WorkflowRun) {
			r.Body = []byte(`{"order":1}`)
			r.Label = &label
		})

		got, err := b.store.RunGet(b.ctx, "wfr_a", false)
		require.NoError(t, err)
		require.Equal(t, in.WorkflowRunID, got.WorkflowRunID)
		require.Equal(t, models.RunStarted, got.State)
		require.Equal(t, `{"order":1}`, string(got.Body))
		require.Equal(t, &label, got.Label)
		require.Nil(t, got.Result)
		require.Equal(t, b.now.Truncate(time.Microsecond), got.CreatedAt)

		// forUpdate outside a transaction still reads the row.
		got, err = b.store.RunGet(b.ctx, "wfr_a", true)
		require.NoError(t, err)
		require.Equal(t, "wfr_a", got.WorkflowRunID)

		_, err = b.store.RunGet(b.ctx, "wfr_missing", false)
		require.ErrorIs(t, err, storage.ErrNotFound)
		_, err = b.store.RunGet(b.ctx, "wfr_missing", true)
		require.ErrorIs(t, err, storage.ErrNotFound)
	})

	t.Run("RunInsertDuplicate", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		insertRun(t, b, "wfr_dup", func(r *models.WorkflowRun) { r.Body = []byte(`1`) })
		err := b.store.RunInsert(b.ctx, &models.WorkflowRun{WorkflowRunID: "wfr_dup", State: models.RunStarted, Body: []byte(`2`), CreatedAt: b.now, UpdatedAt: b.now})
		require.ErrorIs(t, err, storage.ErrDuplicate)

		// Inside a transaction too, and the transaction does not retry it.
		calls := 0
		err = b.store.InTx(b.ctx, func(tx storage.Executor) error {
			calls++
			return tx.RunInsert(b.ctx, &models.WorkflowRun{WorkflowRunID: "wfr_dup", State: models.RunStarted, CreatedAt: b.now, UpdatedAt: b.now})
		})
		require.ErrorIs(t, err, storage.ErrDuplicate)
		require.Equal(t, 1, calls)

		got, err := b.store.RunGet(b.ctx, "wfr_dup", false)
		require.NoError(t, err)
		require.Equal(t, `1`, string(got.Body), "the first body stays")
	})

	t.Run("RunEnd", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		insertRun(t, b, "wfr_end")
		later := b.now.Add(time.Minute)
		require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: "wfr_end", State: models.RunSuccess, Result: []byte(`{"ok":true}`), UpdatedAt: later}))
		got, err := b.store.RunGet(b.ctx, "wfr_end", false)
		require.NoError(t, err)
		require.Equal(t, models.RunSuccess, got.State)
		require.Equal(t, `{"ok":true}`, string(got.Result))
		require.Equal(t, later.Truncate(time.Microsecond), got.UpdatedAt)
		require.Equal(t, b.now.Truncate(time.Microsecond), got.CreatedAt)
	})

	t.Run("RunList", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		// Same created_at for all: order must come from insertion order.
		for i := 1; i <= 7; i++ {
			insertRun(t, b, fmt.Sprintf("wfr_%d", i), func(r *models.WorkflowRun) {
				if i%2 == 0 {
					r.Label = ptr("even")
				} else {
					r.Label = ptr("odd")
				}
			})
		}
		require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: "wfr_3", State: models.RunFailed, UpdatedAt: b.now}))
		require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: "wfr_6", State: models.RunFailed, UpdatedAt: b.now}))

		list := func(p storage.RunListParams) []string {
			t.Helper()
			rs, err := b.store.RunList(b.ctx, &p)
			require.NoError(t, err)
			return runIDs(rs)
		}

		require.Equal(t, []string{"wfr_7", "wfr_6", "wfr_5", "wfr_4", "wfr_3", "wfr_2", "wfr_1"}, list(storage.RunListParams{Limit: 100}))

		// Paging newest first, each page continuing after the last id of the one before.
		var pages [][]string
		after := ""
		for {
			page := list(storage.RunListParams{AfterRunID: after, Limit: 3})
			if len(page) == 0 {
				break
			}
			pages = append(pages, page)
			after = page[len(page)-1]
		}
		require.Equal(t, [][]string{{"wfr_7", "wfr_6", "wfr_5"}, {"wfr_4", "wfr_3", "wfr_2"}, {"wfr_1"}}, pages)

		failed := models.RunFailed
		started := models.RunStarted
		require.Equal(t, []string{"wfr_6", "wfr_3"}, list(storage.RunListParams{State: &failed, Limit: 10}))
		require.Equal(t, []string{"wfr_6", "wfr_4", "wfr_2"}, list(storage.RunListParams{Label: ptr("even"), Limit: 10}))
		require.Equal(t, []string{"wfr_4", "wfr_2"}, list(storage.RunListParams{Label: ptr("even"), State: &started, Limit: 10}))
		// Paging with a filter; the cursor need not match the filter.
		require.Equal(t, []string{"wfr_5", "wfr_1"}, list(storage.RunListParams{Label: ptr("odd"), State: &started, AfterRunID: "wfr_6", Limit: 10}))
		require.Equal(t, []string{"wfr_3"}, list(storage.RunListParams{State: &failed, AfterRunID: "wfr_6", Limit: 10}))
		require.Empty(t, list(storage.RunListParams{Label: ptr("EVEN"), Limit: 10}), "labels compare byte for byte")

		_, err := b.store.RunList(b.ctx, &storage.RunListParams{AfterRunID: "wfr_unknown", Limit: 10})
		require.ErrorIs(t, err, storage.ErrNotFound)
	})

	t.Run("RunSelect", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		// Created an hour apart, with labels a, b, a, b, …
		for i := 1; i <= 6; i++ {
			insertRun(t, b, fmt.Sprintf("wfr_%d", i), func(r *models.WorkflowRun) {
				r.CreatedAt = b.now.Add(time.Duration(i) * time.Hour)
				r.Label = ptr(string(rune('a' + (i+1)%2)))
			})
		}
		require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: "wfr_5", State: models.RunCanceled, UpdatedAt: b.now}))
		sel := func(p storage.RunSelectParams) []string {
			t.Helper()
			if p.Limit == 0 {
				p.Limit = 100
			}
			rs, err := b.store.RunSelect(b.ctx, &p)
			require.NoError(t, err)
			return runIDs(rs)
		}
		started := models.RunStarted
		at := func(h int) *time.Time { v := b.now.Add(time.Duration(h) * time.Hour); return &v }
		require.Equal(t, []string{"wfr_6", "wfr_5", "wfr_4", "wfr_3", "wfr_2", "wfr_1"}, sel(storage.RunSelectParams{}))
		require.Equal(t, []string{"wfr_5", "wfr_3", "wfr_1"}, sel(storage.RunSelectParams{Labels: []string{"a"}}))
		require.Equal(t, []string{"wfr_6", "wfr_5", "wfr_4", "wfr_3", "wfr_2", "wfr_1"}, sel(storage.RunSelectParams{Labels: []string{"a", "b"}}))
		require.Equal(t, []string{"wfr_3", "wfr_1"}, sel(storage.RunSelectParams{Labels: []string{"a"}, State: &started}))
		// Date bounds are inclusive, to the microsecond.
		require.Equal(t, []string{"wfr_4", "wfr_3", "wfr_2"}, sel(storage.RunSelectParams{CreatedFrom: at(2), CreatedTo: at(4)}))
		require.Equal(t, []string{"wfr_6"}, sel(storage.RunSelectParams{CreatedFrom: at(6)}))
		require.Empty(t, sel(storage.RunSelectParams{CreatedTo: at(0)}))
		require.Equal(t, []string{"wfr_4", "wfr_2"}, sel(storage.RunSelectParams{RunIDs: []string{"wfr_2", "wfr_4", "wfr_nope"}}))
		require.Equal(t, []string{"wfr_2"}, sel(storage.RunSelectParams{RunIDs: []string{"wfr_2", "wfr_4"}, AfterRunID: "wfr_4"}))
		require.Equal(t, []string{"wfr_6", "wfr_5"}, sel(storage.RunSelectParams{Limit: 2}))
		require.Equal(t, []string{"wfr_4", "wfr_2"}, sel(storage.RunSelectParams{Labels: []string{"b"}, AfterRunID: "wfr_5"}))
		_, err := b.store.RunSelect(b.ctx, &storage.RunSelectParams{AfterRunID: "wfr_unknown", Limit: 10})
		require.ErrorIs(t, err, storage.ErrNotFound)

		// By dispatch URL: exact, or prefix in characters, byte for byte.
		for id, u := range map[string]string{"wfr_1": "https://x.example/wf/ü/a", "wfr_2": "https://x.example/wf/ü/b", "wfr_3": "https://x.example/WF/a"} {
			require.NoError(t, b.store.OutboxInsert(b.ctx, &storage.OutboxRecord{ID: "dlv_" + id, RunID: ptr(id), Kind: storage.OutboxKindDispatch,
				URL: u, Body: []byte(`{}`), State: models.DispatchPending, MaxAttempts: 1, NextAttemptAt: b.now, CreatedAt: b.now}))
		}
		require.Equal(t, []string{"wfr_2", "wfr_1"}, sel(storage.RunSelectParams{DispatchURLPrefix: ptr("https://x.example/wf/ü/")}))
		require.Equal(t, []string{"wfr_1"}, sel(storage.RunSelectParams{DispatchURL: ptr("https://x.example/wf/ü/a")}))
		require.Empty(t, sel(storage.RunSelectParams{DispatchURL: ptr("https://x.example/wf/ü/")}))
		require.Equal(t, []string{"wfr_3"}, sel(storage.RunSelectParams{DispatchURLPrefix: ptr("https://x.example/WF")}))
		require.Equal(t, []string{"wfr_3", "wfr_2", "wfr_1"}, sel(storage.RunSelectParams{DispatchURLPrefix: ptr("https://")}))
		require.Empty(t, sel(storage.RunSelectParams{DispatchURLPrefix: ptr("https://x.example/wf/ü/a/more")}))
	})

	t.Run("WaiterInsertAndGet", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		insertRun(t, b, "wfr_w")
		w := &models.Waiter{
			EventID:       "order-1-paid",
			WorkflowRunID: ptr("wfr_w"),
			StepName:      ptr("wait-payment"),
			State:         models.WaiterWaiting,
			Deadline:      b.now.Add(time.Hour),
			CreatedAt:     b.now,
		}
		require.NoError(t, b.store.WaiterInsert(b.ctx, w))
		require.NotEmpty(t, w.ID)

		other := insertWaiter(t, b, "order-1-paid", nil, b.now.Add(time.Hour))
		require.NotEqual(t, w.ID, other.ID)

		got, err := b.store.WaiterGet(b.ctx, w.ID)
		require.NoError(t, err)
		require.Equal(t, w.ID, got.ID)
		require.Equal(t, "order-1-paid", got.EventID)
		require.Equal(t, ptr("wfr_w"), got.WorkflowRunID)
		require.Equal(t, ptr("wait-payment"), got.StepName)
		require.Equal(t, models.WaiterWaiting, got.State)
		require.Equal(t, b.now.Add(time.Hour).Truncate(time.Microsecond), got.Deadline)
		require.Equal(t, b.now.Truncate(time.Microsecond), got.CreatedAt)
		require.Nil(t, got.EndedAt)
		require.Nil(t, got.MessageID)
		require.Nil(t, got.EventData)

		got, err = b.store.WaiterGet(b.ctx, other.ID)
		require.NoError(t, err)
		require.Nil(t, got.WorkflowRunID)
		require.Nil(t, got.StepName)

		for _, bad := range []string{"", "nope", "wtr_", "wtr_0", "wtr_-1", "wtr_01", "wtr_99999999", "lbe_1", "wtr_99999999999999999999"} {
			_, err := b.store.WaiterGet(b.ctx, bad)
			require.ErrorIs(t, err, storage.ErrNotFound, "%q", bad)
		}

		byRun, err := b.store.WaiterListByRun(b.ctx, "wfr_w")
		require.NoError(t, err)
		require.Equal(t, []string{w.ID}, ids(byRun))
	})

	t.Run("WaiterListWaiting", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		future := b.now.Add(time.Hour)
		runA, runB := ptr("wfr_A"), ptr("wfr_B")

		a1 := insertWaiter(t, b, "ev", runA, future)
		free := insertWaiter(t, b, "ev", nil, future)
		b1 := insertWaiter(t, b, "ev", runB, future)
		a2 := insertWaiter(t, b, "ev", runA, future)
		insertWaiter(t, b, "Ev", runA, future)                                  // other event id (case)
		insertWaiter(t, b, "other", runA, future)                               // other event id
		insertWaiter(t, b, "ev", runA, b.now.Add(-time.Second))                 // past deadline
		insertWaiter(t, b, "ev", runA, b.now)                                   // deadline is now: no longer waiting
		ended := insertWaiter(t, b, "ev", runA, future)                         // ended below
		atEdge := insertWaiter(t, b, "ev", runA, b.now.Add(2*time.Microsecond)) // still just in time
		moved, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{ended.ID}, State: models.WaiterCanceled, EndedAt: b.now})
		require.NoError(t, err)
		require.Equal(t, []string{ended.ID}, moved)

		list := func(p storage.WaiterListWaitingParams) []string {
			t.Helper()
			ws, err := b.store.WaiterListWaiting(b.ctx, &p)
			require.NoError(t, err)
			for _, w := range ws {
				require.Equal(t, models.WaiterWaiting, w.State)
			}
			return ids(ws)
		}

		require.Equal(t, []string{a1.ID, free.ID, b1.ID, a2.ID, atEdge.ID}, list(storage.WaiterListWaitingParams{EventID: "ev", Now: b.now}))
		require.Equal(t, []string{a1.ID, a2.ID, atEdge.ID}, list(storage.WaiterListWaitingParams{EventID: "ev", RunID: runA, Now: b.now}))
		require.Equal(t, []string{b1.ID}, list(storage.WaiterListWaitingParams{EventID: "ev", RunID: runB, Now: b.now}))
		require.Empty(t, list(storage.WaiterListWaitingParams{EventID: "ev", RunID: ptr("wfr_a"), Now: b.now}))
		require.Empty(t, list(storage.WaiterListWaitingParams{EventID: "nobody", Now: b.now}))

		// forUpdate inside a transaction returns the same.
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			ws, err := tx.WaiterListWaiting(b.ctx, &storage.WaiterListWaitingParams{EventID: "ev", RunID: runA, Now: b.now, ForUpdate: true})
			require.NoError(t, err)
			require.Equal(t, []string{a1.ID, a2.ID, atEdge.ID}, ids(ws))
			return nil
		}))

		// Later, only the far deadlines remain.
		require.Equal(t, []string{a1.ID, a2.ID}, list(storage.WaiterListWaitingParams{EventID: "ev", RunID: runA, Now: b.now.Add(time.Minute)}))
	})

	t.Run("RunLockListWaiting", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		future := b.now.Add(time.Hour)
		insertRun(t, b, "wfr_A")
		insertRun(t, b, "wfr_B")
		insertRun(t, b, "wfr_idle")
		insertRun(t, b, "wfr_done", func(r *models.WorkflowRun) { r.State = models.RunCanceled })
		runA := ptr("wfr_A")
		require.NoError(t, b.store.ReplicaRenew(b.ctx, "rep_live", future))
		require.NoError(t, b.store.ReplicaRenew(b.ctx, "rep_dead", b.now))
		owned := func(owner string, deadline time.Time) *models.Waiter {
			t.Helper()
			w := &models.Waiter{EventID: "ev", WorkflowRunID: runA, State: models.WaiterWaiting, Deadline: deadline, CreatedAt: b.now, Owner: owner}
			require.NoError(t, b.store.WaiterInsert(b.ctx, w))
			return w
		}

		a1 := insertWaiter(t, b, "ev", runA, future)
		insertWaiter(t, b, "ev", ptr("wfr_B"), future)  // other run
		insertWaiter(t, b, "ev", nil, future)           // no run
		insertWaiter(t, b, "Ev", runA, future)          // other event id (case)
		insertWaiter(t, b, "ev", runA, b.now)           // deadline is now: no longer waiting
		live := owned("rep_live", future)               // owner's lease runs
		owned("rep_dead", future)                       // owner's lease ran out
		owned("rep_unknown", future)                    // owner has no lease at all
		self := owned("rep_self", future)               // the caller's own, whatever its lease
		ended := insertWaiter(t, b, "ev", runA, future) // ended below
		atEdge := insertWaiter(t, b, "ev", runA, b.now.Add(2*time.Microsecond))
		_, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{ended.ID}, State: models.WaiterCanceled, EndedAt: b.now})
		require.NoError(t, err)

		lockList := func(runID, eventID string, now time.Time) (models.RunState, []*models.Waiter, error) {
			t.Helper()
			var (
				state models.RunState
				ws    []*models.Waiter
			)
			err := b.store.InTx(b.ctx, func(tx storage.Executor) error {
				var err error
				state, ws, err = tx.RunLockListWaiting(b.ctx, &storage.RunLockListWaitingParams{RunID: runID, EventID: eventID, Self: "rep_self", Now: now})
				return err
			})
			return state, ws, err
		}

		state, ws, err := lockList("wfr_A", "ev", b.now)
		require.NoError(t, err)
		require.Equal(t, models.RunStarted, state)
		require.Equal(t, []string{a1.ID, live.ID, self.ID, atEdge.ID}, ids(ws))
		// The same waiters, in full, as WaiterListWaiting lists for the run.
		same, err := b.store.WaiterListWaiting(b.ctx, &storage.WaiterListWaitingParams{EventID: "ev", RunID: runA, Self: "rep_self", Now: b.now})
		require.NoError(t, err)
		require.Equal(t, same, ws)
		require.Equal(t, "rep_live", ws[1].Owner)

		// Later, the edge is gone.
		_, ws, err = lockList("wfr_A", "ev", b.now.Add(time.Minute))
		require.NoError(t, err)
		require.Equal(t, []string{a1.ID, live.ID, self.ID}, ids(ws))

		// A run without waiters on the event, and an ended run, still give their state.
		state, ws, err = lockList("wfr_idle", "ev", b.now)
		require.NoError(t, err)
		require.Equal(t, models.RunStarted, state)
		require.Empty(t, ws)
		state, _, err = lockList("wfr_done", "ev", b.now)
		require.NoError(t, err)
		require.Equal(t, models.RunCanceled, state)

		// Ids are exact: no such run.
		for _, id := range []string{"wfr_missing", "wfr_a", "wfr_A "} {
			_, _, err = lockList(id, "ev", b.now)
			require.ErrorIs(t, err, storage.ErrNotFound, id)
		}
	})

	// A group of targeted notifies locks its runs and lists their waiters in
	// one statement: each run's answer is RunLockListWaiting's for it.
	t.Run("RunLockListWaitingMany", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		future := b.now.Add(time.Hour)
		for _, id := range []string{"wfr_A", "wfr_B", "wfr_C"} {
			insertRun(t, b, id)
		}
		insertRun(t, b, "wfr_done", func(r *models.WorkflowRun) { r.State = models.RunCanceled })
		require.NoError(t, b.store.ReplicaRenew(b.ctx, "rep_live", future))
		require.NoError(t, b.store.ReplicaRenew(b.ctx, "rep_dead", b.now))
		owned := func(runID, owner string) *models.Waiter {
			t.Helper()
			w := &models.Waiter{EventID: "ev", WorkflowRunID: ptr(runID), State: models.WaiterWaiting, Deadline: future, CreatedAt: b.now, Owner: owner}
			require.NoError(t, b.store.WaiterInsert(b.ctx, w))
			return w
		}
		a1 := insertWaiter(t, b, "ev", ptr("wfr_A"), future)
		insertWaiter(t, b, "other", ptr("wfr_A"), future) // A's notify is for ev
		aLive := owned("wfr_A", "rep_live")
		aDead := owned("wfr_A", "rep_dead")
		insertWaiter(t, b, "ev", ptr("wfr_A"), b.now)  // deadline is now
		insertWaiter(t, b, "ev", ptr("wfr_B"), future) // B's notify is for other
		b2 := insertWaiter(t, b, "other", ptr("wfr_B"), future)
		cDead := owned("wfr_C", "rep_dead")
		cSelf := owned("wfr_C", "rep_self")

		ps := []storage.RunLockListWaitingParams{
			{RunID: "wfr_done", EventID: "ev"},
			{RunID: "wfr_C", EventID: "ev"},
			{RunID: "wfr_missing", EventID: "ev"},
			{RunID: "wfr_A", EventID: "ev"},
			{RunID: "wfr_B", EventID: "other"},
		}
		lapsed := make([][]string, len(ps))
		for i := range ps {
			ps[i].Self, ps[i].Now, ps[i].Lapsed = "rep_self", b.now, &lapsed[i]
		}
		var got []storage.RunLockListed
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			var err error
			got, err = tx.RunLockListWaitingMany(b.ctx, ps)
			return err
		}))
		require.Len(t, got, len(ps))
		require.Equal(t, models.RunCanceled, got[0].State)
		require.Empty(t, got[0].Waiting)
		require.Equal(t, models.RunStarted, got[1].State)
		require.Equal(t, []string{cSelf.ID}, ids(got[1].Waiting))
		require.Equal(t, []string{cDead.ID}, lapsed[1])
		require.Equal(t, models.RunState(""), got[2].State, "no such run")
		require.Equal(t, models.RunStarted, got[3].State)
		require.Equal(t, []string{a1.ID, aLive.ID}, ids(got[3].Waiting))
		require.Equal(t, []string{aDead.ID}, lapsed[3])
		require.Equal(t, []string{b2.ID}, ids(got[4].Waiting))
		require.Empty(t, lapsed[4])
		require.Empty(t, lapsed[0])
		// Each as RunLockListWaiting lists it alone.
		for i, p := range ps {
			if got[i].State == "" {
				continue
			}
			var alone []*models.Waiter
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				var err error
				_, alone, err = tx.RunLockListWaiting(b.ctx, &storage.RunLockListWaitingParams{RunID: p.RunID, EventID: p.EventID, Self: "rep_self", Now: b.now})
				return err
			}))
			if len(alone) == 0 {
				require.Empty(t, got[i].Waiting, p.RunID)
				continue
			}
			require.Equal(t, alone, got[i].Waiting, p.RunID)
		}

		// A run twice is refused: the caller keeps one notify per run.
		err := b.store.InTx(b.ctx, func(tx storage.Executor) error {
			_, err := tx.RunLockListWaitingMany(b.ctx, []storage.RunLockListWaitingParams{ps[1], ps[1]})
			return err
		})
		require.ErrorContains(t, err, "twice")
	})

	// The lookback events of a group go in one INSERT (with COMMIT where it
	// can): each gets its own id, the one its row has.
	t.Run("LookbackEventInsertManyCommit", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		for _, id := range []string{"wfr_A", "wfr_B"} {
			insertRun(t, b, id)
		}
		for _, n := range []int{1, 3} {
			var evs []*models.LookbackEvent
			for i := range n {
				run := []string{"wfr_A", "wfr_B"}[i%2]
				evs = append(evs, &models.LookbackEvent{
					WorkflowRunID: run, EventID: fmt.Sprintf("ev%d-%d", n, i), EventData: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i)),
					MessageID: fmt.Sprintf("msg_%d_%d", n, i), CreatedAt: b.now, ExpiresAt: b.now.Add(time.Hour),
				})
			}
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				if _, err := tx.RunGet(b.ctx, "wfr_A", true); err != nil {
					return err
				}
				return tx.LookbackEventInsertManyCommit(b.ctx, evs)
			}))
			for _, ev := range evs {
				require.NotEmpty(t, ev.ID)
				stored, err := b.store.LookbackEventListByRun(b.ctx, ev.WorkflowRunID, b.now)
				require.NoError(t, err)
				found := false
				for _, s := range stored {
					if s.ID == ev.ID {
						found = true
						require.Equal(t, ev.MessageID, s.MessageID)
						require.Equal(t, ev.EventID, s.EventID)
						require.JSONEq(t, string(ev.EventData), string(s.EventData))
					}
				}
				require.True(t, found, "%s stored as %s", ev.MessageID, ev.ID)
			}
		}
	})

	t.Run("WaiterEndCompareAndSet", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		w := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		endedAt := b.now.Add(time.Second)

		moved, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{
			WaiterIDs: []string{w.ID}, State: models.WaiterNotified, EndedAt: endedAt,
			MessageID: ptr("msg_1"), EventID: "ev", EventData: []byte(`{"paid":true}`),
		})
		require.NoError(t, err)
		require.Equal(t, []string{w.ID}, moved)

		// The second end loses, whatever it is, and changes nothing.
		for _, state := range []models.WaiterState{models.WaiterNotified, models.WaiterTimedOut, models.WaiterCanceled} {
			moved, err = b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{
				WaiterIDs: []string{w.ID}, State: state, EndedAt: endedAt.Add(time.Hour),
				MessageID: ptr("msg_2"), EventData: []byte(`"second"`),
			})
			require.NoError(t, err)
			require.Empty(t, moved, state)
		}

		got, err := b.store.WaiterGet(b.ctx, w.ID)
		require.NoError(t, err)
		require.Equal(t, models.WaiterNotified, got.State)
		require.NotNil(t, got.EndedAt)
		require.Equal(t, endedAt.Truncate(time.Microsecond), *got.EndedAt)
		require.Equal(t, ptr("msg_1"), got.MessageID)
		require.Equal(t, `{"paid":true}`, string(got.EventData))

		// Ids that are not waiters end nothing.
		moved, err = b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{"nope", "wtr_99999999"}, State: models.WaiterCanceled, EndedAt: b.now})
		require.NoError(t, err)
		require.Empty(t, moved)
		moved, err = b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{State: models.WaiterCanceled, EndedAt: b.now})
		require.NoError(t, err)
		require.Empty(t, moved)

		// Without a message, no message id or data is written.
		w2 := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		moved, err = b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w2.ID}, State: models.WaiterCanceled, EndedAt: b.now})
		require.NoError(t, err)
		require.Equal(t, []string{w2.ID}, moved)
		got, err = b.store.WaiterGet(b.ctx, w2.ID)
		require.NoError(t, err)
		require.Equal(t, models.WaiterCanceled, got.State)
		require.Nil(t, got.MessageID)
		require.Nil(t, got.EventData)
	})

	t.Run("WaiterEndDeadlineAfter", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		past := insertWaiter(t, b, "ev", nil, b.now.Add(-time.Second))
		atNow := insertWaiter(t, b, "ev", nil, b.now)
		live := insertWaiter(t, b, "ev", nil, b.now.Add(time.Second))

		for _, w := range []*models.Waiter{past, atNow} {
			moved, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{
				WaiterIDs: []string{w.ID}, State: models.WaiterNotified, EndedAt: b.now,
				DeadlineAfter: &b.now, MessageID: ptr("msg_" + w.ID), EventData: []byte(`1`),
			})
			require.NoError(t, err)
			require.Empty(t, moved, "a waiter past its deadline must not be notified")
			got, err := b.store.WaiterGet(b.ctx, w.ID)
			require.NoError(t, err)
			require.Equal(t, models.WaiterWaiting, got.State)
		}
		moved, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{
			WaiterIDs: []string{live.ID}, State: models.WaiterNotified, EndedAt: b.now,
			DeadlineAfter: &b.now, MessageID: ptr("msg_live"), EventData: []byte(`1`),
		})
		require.NoError(t, err)
		require.Equal(t, []string{live.ID}, moved)

		// The timeout itself is not bound by the deadline.
		moved, err = b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{past.ID}, State: models.WaiterTimedOut, EndedAt: b.now})
		require.NoError(t, err)
		require.Equal(t, []string{past.ID}, moved)
	})

	t.Run("WaiterEndSeveralInTx", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		future := b.now.Add(time.Hour)
		already := insertWaiter(t, b, "ev", nil, future)
		w1 := insertWaiter(t, b, "ev", nil, future)
		expired := insertWaiter(t, b, "ev", nil, b.now.Add(-time.Minute))
		w2 := insertWaiter(t, b, "ev", nil, future)
		deleted := insertWaiter(t, b, "ev", nil, future)
		_, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{already.ID}, State: models.WaiterCanceled, EndedAt: b.now})
		require.NoError(t, err)
		n, err := b.store.WaiterDeleteWaiting(b.ctx, []string{deleted.ID})
		require.NoError(t, err)
		require.EqualValues(t, 1, n)

		var moved []string
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			var err error
			moved, err = tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{
				WaiterIDs:     []string{w2.ID, already.ID, "nope", expired.ID, w1.ID, deleted.ID, w2.ID, "wtr_99999999"},
				State:         models.WaiterNotified,
				EndedAt:       b.now,
				DeadlineAfter: &b.now,
				MessageID:     ptr("msg_x"),
				EventData:     []byte(`"x"`),
			})
			return err
		}))
		require.ElementsMatch(t, []string{w1.ID, w2.ID}, moved)

		for _, c := range []struct {
			w     *models.Waiter
			state models.WaiterState
		}{{already, models.WaiterCanceled}, {w1, models.WaiterNotified}, {expired, models.WaiterWaiting}, {w2, models.WaiterNotified}} {
			got, err := b.store.WaiterGet(b.ctx, c.w.ID)
			require.NoError(t, err)
			require.Equal(t, c.state, got.State, c.w.ID)
		}

		// Again: nothing left to move.
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			var err error
			moved, err = tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w1.ID, w2.ID, already.ID}, State: models.WaiterCanceled, EndedAt: b.now})
			return err
		}))
		require.Empty(t, moved)
	})

	t.Run("WaiterEndManyIDsAcrossChunks", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		var real []string
		for range 3 {
			real = append(real, insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour)).ID)
		}
		// More than one IN (…) chunk's worth of ids, the real ones in the second chunk.
		var list []string
		for i := range 1500 {
			list = append(list, "wtr_"+strconv.Itoa(1_000_000+i))
		}
		list = append(list, real...)
		var moved []string
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			var err error
			moved, err = tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: list, State: models.WaiterCanceled, EndedAt: b.now})
			return err
		}))
		require.ElementsMatch(t, real, moved)

		got, err := b.store.WaiterGetMany(b.ctx, list)
		require.NoError(t, err)
		require.Len(t, got, len(real))
		for _, id := range real {
			require.Equal(t, models.WaiterCanceled, got[id].State)
		}
	})

	t.Run("WaiterEndOneNotificationManyWaiters", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		var all []string
		for range 4 {
			all = append(all, insertWaiter(t, b, "broadcast", nil, b.now.Add(time.Hour)).ID)
		}
		data := []byte(`{"one":"payload","for":["many","waiters"]}`)
		end := func(ids []string, eventID string, messageID string) []string {
			t.Helper()
			var moved []string
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				var err error
				moved, err = tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{
					WaiterIDs: ids, State: models.WaiterNotified, EndedAt: b.now, DeadlineAfter: &b.now,
					MessageID: ptr(messageID), EventID: eventID, EventData: data,
				})
				return err
			}))
			return moved
		}
		// One notify ending its waiters in two calls (as in chunks), the
		// second without naming the event id; then another notify that
		// ends nobody, and one that ends only the waiter added since.
		require.ElementsMatch(t, all[:3], end(all[:3], "broadcast", "msg_broadcast"))
		require.Equal(t, all[3:], end(all[3:], "", "msg_broadcast"))
		require.Empty(t, end(all, "broadcast", "msg_later"))
		late := insertWaiter(t, b, "broadcast", nil, b.now.Add(time.Hour)).ID
		require.Equal(t, []string{late}, end(append([]string{late}, all...), "broadcast", "msg_late"),
			"only the waiter this notify moved, not those an earlier one did")

		for _, id := range all {
			w, err := b.store.WaiterGet(b.ctx, id)
			require.NoError(t, err)
			require.Equal(t, models.WaiterNotified, w.State)
			require.Equal(t, ptr("msg_broadcast"), w.MessageID)
			require.Equal(t, string(data), string(w.EventData), id)
		}

		// A notify with no data (JSON null stored as NULL) ends with none.
		w := insertWaiter(t, b, "broadcast", nil, b.now.Add(time.Hour))
		moved, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w.ID}, State: models.WaiterNotified, EndedAt: b.now, MessageID: ptr("msg_nodata"), EventID: "broadcast"})
		require.NoError(t, err)
		require.Equal(t, []string{w.ID}, moved)
		got, err := b.store.WaiterGet(b.ctx, w.ID)
		require.NoError(t, err)
		require.Nil(t, got.EventData)
		require.Equal(t, ptr("msg_nodata"), got.MessageID)
	})

	// A waiter that consumed a lookback event is inserted already ended and
	// carries its own copy of the data (there is no notifications row).
	t.Run("WaiterEndMakesCallbacksDue", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		var hooks atomic.Int64
		b.store.OnOutboxDue(func() { hooks.Add(1) })
		insertRun(t, b, "wfr_cb")
		step := func(name string) (*models.Waiter, string) {
			w := &models.Waiter{EventID: "ev", WorkflowRunID: ptr("wfr_cb"), StepName: ptr(name), State: models.WaiterWaiting,
				Deadline: b.now.Add(time.Hour), CreatedAt: b.now}
			require.NoError(t, b.store.WaiterInsert(b.ctx, w))
			id := "dlv_" + name
			require.NoError(t, b.store.OutboxInsert(b.ctx, &storage.OutboxRecord{ID: id, RunID: ptr("wfr_cb"), WaiterID: w.ID,
				Kind: storage.OutboxKindCallback, URL: "http://x/cb", Body: []byte{}, State: storage.OutboxHeld, MaxAttempts: 4,
				NextAttemptAt: w.Deadline, CreatedAt: b.now}))
			return w, id
		}
		state := func(id string) models.DispatchState {
			r, err := b.store.OutboxGet(b.ctx, id)
			require.NoError(t, err)
			return r.State
		}
		w1, d1 := step("one")
		w2, d2 := step("two")
		w3, d3 := step("three")
		got, err := b.store.OutboxGetByWaiter(b.ctx, w1.ID)
		require.NoError(t, err)
		require.Equal(t, d1, got.ID)
		require.Equal(t, w1.ID, got.WaiterID)
		_, err = b.store.OutboxGetByRun(b.ctx, "wfr_cb")
		require.ErrorIs(t, err, storage.ErrNotFound, "a callback is not the run's dispatch")

		// Held rows are never claimed.
		claim := func() []*storage.OutboxRecord {
			var recs []*storage.OutboxRecord
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				var err error
				recs, err = tx.OutboxClaim(b.ctx, &storage.OutboxClaimParams{Now: b.now.Add(2 * time.Hour), LeaseUntil: b.now.Add(3 * time.Hour), Claim: "c", Limit: 10})
				return err
			}))
			return recs
		}
		require.Empty(t, claim())

		// A rolled back end leaves the callback held, and no hook runs.
		boom := errors.New("boom")
		require.ErrorIs(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			_, err := tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w1.ID}, State: models.WaiterTimedOut, EndedAt: b.now})
			require.NoError(t, err)
			return boom
		}), boom)
		require.Equal(t, storage.OutboxHeld, state(d1))
		require.Zero(t, hooks.Load())

		// NoCallbacks: the caller vouched there are none; nothing is looked for.
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			_, err := tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w3.ID}, State: models.WaiterCanceled, EndedAt: b.now, NoCallbacks: true})
			return err
		}))
		require.Equal(t, storage.OutboxHeld, state(d3))

		// Ended: due at the end, in the same transaction, and the hook runs after the commit.
		msg := "msg_cb"
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			ended, err := tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w1.ID, w2.ID}, State: models.WaiterNotified,
				EndedAt: b.now.Add(time.Minute), MessageID: &msg, EventID: "ev", EventData: []byte(`1`)})
			require.Len(t, ended, 2)
			require.Zero(t, hooks.Load(), "not before the commit")
			return err
		}))
		require.Equal(t, int64(1), hooks.Load())
		require.Equal(t, models.DispatchPending, state(d1))
		require.Equal(t, models.DispatchPending, state(d2))
		r, err := b.store.OutboxGet(b.ctx, d2)
		require.NoError(t, err)
		require.True(t, r.NextAttemptAt.Equal(b.now.Add(time.Minute).Truncate(time.Microsecond)), "due when the waiter ended: %s", r.NextAttemptAt)
		require.Len(t, claim(), 2)

		// On the store, outside a transaction: it opens one of its own.
		w4, d4 := step("four")
		ended, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w4.ID}, State: models.WaiterTimedOut, EndedAt: b.now})
		require.NoError(t, err)
		require.Equal(t, []string{w4.ID}, ended)
		require.Equal(t, models.DispatchPending, state(d4))
		require.Equal(t, int64(2), hooks.Load())

		// Ending the run cancels its dispatch only: the callbacks are owed.
		n, err := b.store.OutboxCancelByRun(b.ctx, "wfr_cb", b.now)
		require.NoError(t, err)
		require.Zero(t, n)
	})

	t.Run("WaiterInsertEnded", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		for i, data := range [][]byte{[]byte(`{"from":"lookback","n":[1,2]}`), nil} {
			w := &models.Waiter{
				EventID: "ev", WorkflowRunID: ptr("wfr_lb"), StepName: ptr("step-" + strconv.Itoa(i)),
				State: models.WaiterNotified, Deadline: b.now.Add(time.Hour), CreatedAt: b.now,
				EndedAt: &b.now, MessageID: ptr("msg_lookback_" + strconv.Itoa(i)), EventData: data,
			}
			require.NoError(t, b.store.WaiterInsert(b.ctx, w))
			got, err := b.store.WaiterGet(b.ctx, w.ID)
			require.NoError(t, err)
			require.Equal(t, models.WaiterNotified, got.State)
			require.Equal(t, w.MessageID, got.MessageID)
			require.Equal(t, string(data), string(got.EventData))
			require.NotNil(t, got.EndedAt)
			require.Equal(t, b.now.Truncate(time.Microsecond), *got.EndedAt)

			// Already ended: nothing can end it again, and it is not waiting.
			moved, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w.ID}, State: models.WaiterTimedOut, EndedAt: b.now})
			require.NoError(t, err)
			require.Empty(t, moved)
			ws, err := b.store.WaiterListWaiting(b.ctx, &storage.WaiterListWaitingParams{EventID: "ev", Now: b.now})
			require.NoError(t, err)
			require.Empty(t, ws)
		}
	})

	t.Run("WaiterDeleteWaiting", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		waiting := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		ended := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		_, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{ended.ID}, State: models.WaiterNotified, EndedAt: b.now, MessageID: ptr("m"), EventData: []byte(`1`)})
		require.NoError(t, err)

		n, err := b.store.WaiterDeleteWaiting(b.ctx, []string{waiting.ID})
		require.NoError(t, err)
		require.EqualValues(t, 1, n)
		_, err = b.store.WaiterGet(b.ctx, waiting.ID)
		require.ErrorIs(t, err, storage.ErrNotFound)

		n, err = b.store.WaiterDeleteWaiting(b.ctx, []string{waiting.ID})
		require.NoError(t, err)
		require.Zero(t, n, "already deleted")

		n, err = b.store.WaiterDeleteWaiting(b.ctx, []string{ended.ID})
		require.NoError(t, err)
		require.Zero(t, n, "an ended waiter keeps its result")
		got, err := b.store.WaiterGet(b.ctx, ended.ID)
		require.NoError(t, err)
		require.Equal(t, models.WaiterNotified, got.State)

		n, err = b.store.WaiterDeleteWaiting(b.ctx, []string{"", "nope", "wtr_99999999"})
		require.NoError(t, err)
		require.Zero(t, n)
		n, err = b.store.WaiterDeleteWaiting(b.ctx, nil)
		require.NoError(t, err)
		require.Zero(t, n)

		// Many at once (more than one IN list): only the waiting ones go.
		var batch []string
		for i := range 1100 {
			w := insertWaiter(t, b, "ev-many", nil, b.now.Add(time.Hour))
			batch = append(batch, w.ID)
			if i%100 == 0 {
				_, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w.ID}, State: models.WaiterTimedOut, EndedAt: b.now})
				require.NoError(t, err)
			}
		}
		n, err = b.store.WaiterDeleteWaiting(b.ctx, append(batch, ended.ID))
		require.NoError(t, err)
		require.EqualValues(t, 1100-11, n)
		gone, err := b.store.WaiterListNotWaiting(b.ctx, batch)
		require.NoError(t, err)
		require.Len(t, gone, 1100, "none is waiting")
		left, err := b.store.WaiterGetMany(b.ctx, batch)
		require.NoError(t, err)
		require.Len(t, left, 11, "the ended ones stay")
	})

	t.Run("WaiterListNotWaiting", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		waiting := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		var ended []string
		for _, state := range []models.WaiterState{models.WaiterNotified, models.WaiterTimedOut, models.WaiterCanceled} {
			w := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
			_, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w.ID}, State: state, EndedAt: b.now})
			require.NoError(t, err)
			ended = append(ended, w.ID)
		}
		// Ended and gone alike: a subscription waits for neither.
		deleted := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		n, err := b.store.WaiterDeleteWaiting(b.ctx, []string{deleted.ID})
		require.NoError(t, err)
		require.EqualValues(t, 1, n)
		got, err := b.store.WaiterListNotWaiting(b.ctx, append([]string{waiting.ID, "nope", "wtr_99999999", deleted.ID}, ended...))
		require.NoError(t, err)
		require.ElementsMatch(t, append([]string{"nope", "wtr_99999999", deleted.ID}, ended...), got)

		got, err = b.store.WaiterListNotWaiting(b.ctx, []string{waiting.ID})
		require.NoError(t, err)
		require.Empty(t, got)
		got, err = b.store.WaiterListNotWaiting(b.ctx, nil)
		require.NoError(t, err)
		require.Empty(t, got)
	})

	t.Run("WaiterGetMany", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		waiting := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		var notified []string
		for range 3 {
			notified = append(notified, insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour)).ID)
		}
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			_, err := tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: notified, State: models.WaiterNotified, EndedAt: b.now,
				MessageID: ptr("msg_many"), EventID: "ev", EventData: []byte(`{"k":[1,2]}`)})
			return err
		}))
		timedOut := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		_, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{timedOut.ID}, State: models.WaiterTimedOut, EndedAt: b.now})
		require.NoError(t, err)

		ids := append([]string{waiting.ID, timedOut.ID, "nope", "wtr_99999999"}, notified...)
		got, err := b.store.WaiterGetMany(b.ctx, ids)
		require.NoError(t, err)
		require.Len(t, got, 5)
		for _, id := range append([]string{waiting.ID, timedOut.ID}, notified...) {
			one, err := b.store.WaiterGet(b.ctx, id)
			require.NoError(t, err)
			require.Equal(t, one, got[id], "WaiterGetMany must read what WaiterGet reads")
		}
		require.Equal(t, `{"k":[1,2]}`, string(got[notified[0]].EventData))
		got, err = b.store.WaiterGetMany(b.ctx, nil)
		require.NoError(t, err)
		require.Empty(t, got)
	})

	t.Run("WaiterListExpired", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		// Inserted out of deadline order: the list is by deadline.
		late := insertWaiter(t, b, "ev", nil, b.now.Add(-time.Second))
		early := insertWaiter(t, b, "ev", ptr("wfr_x"), b.now.Add(-time.Hour))
		atNow := insertWaiter(t, b, "other", nil, b.now)
		insertWaiter(t, b, "ev", nil, b.now.Add(time.Microsecond)) // not yet
		insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))        // not yet
		endedPast := insertWaiter(t, b, "ev", nil, b.now.Add(-time.Minute))
		_, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{endedPast.ID}, State: models.WaiterTimedOut, EndedAt: b.now})
		require.NoError(t, err)

		got, err := b.store.WaiterListExpired(b.ctx, b.now, 100)
		require.NoError(t, err)
		require.Equal(t, []string{early.ID, late.ID, atNow.ID}, ids(got))

		got, err = b.store.WaiterListExpired(b.ctx, b.now, 2)
		require.NoError(t, err)
		require.Equal(t, []string{early.ID, late.ID}, ids(got))

		got, err = b.store.WaiterListExpired(b.ctx, b.now.Add(-2*time.Hour), 100)
		require.NoError(t, err)
		require.Empty(t, got)
	})

	t.Run("LookbackEventInsertCommit", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		insertRun(t, b, "wfr_C")
		before := insertLookback(t, b, "wfr_C", "ev", `"before"`, b.now.Add(time.Hour))
		var ev *models.LookbackEvent
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			if _, _, err := tx.RunLockListWaiting(b.ctx, &storage.RunLockListWaitingParams{RunID: "wfr_C", EventID: "ev", Now: b.now}); err != nil {
				return err
			}
			ev = &models.LookbackEvent{WorkflowRunID: "wfr_C", EventID: "ev", EventData: []byte(`{"n":1}`), MessageID: "msg_c",
				CreatedAt: b.now, ExpiresAt: b.now.Add(time.Hour)}
			return tx.LookbackEventInsertCommit(b.ctx, ev)
		}))
		require.NotEmpty(t, ev.ID)
		require.NotEqual(t, before.ID, ev.ID)
		listed, err := b.store.LookbackEventListByRun(b.ctx, "wfr_C", b.now)
		require.NoError(t, err)
		require.Len(t, listed, 2)
		want := *ev
		want.CreatedAt, want.ExpiresAt = b.now.Truncate(time.Microsecond), b.now.Add(time.Hour).Truncate(time.Microsecond)
		require.Equal(t, &want, listed[1], "stored as LookbackEventInsert stores it")

		// As the first statement, and outside a transaction, too.
		for _, ex := range []func(fn func(storage.Executor) error) error{
			func(fn func(storage.Executor) error) error { return b.store.InTx(b.ctx, fn) },
			func(fn func(storage.Executor) error) error { return fn(b.store) },
		} {
			require.NoError(t, ex(func(tx storage.Executor) error {
				return tx.LookbackEventInsertCommit(b.ctx, &models.LookbackEvent{WorkflowRunID: "wfr_C", EventID: "ev", MessageID: "msg_d",
					CreatedAt: b.now, ExpiresAt: b.now.Add(time.Hour)})
			}))
		}
		listed, err = b.store.LookbackEventListByRun(b.ctx, "wfr_C", b.now)
		require.NoError(t, err)
		require.Len(t, listed, 4)
	})

	t.Run("LookbackEventConsume", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		insertRun(t, b, "wfr_L")
		keep := b.now.Add(time.Hour)
		insertLookback(t, b, "wfr_L", "ev", `"expired"`, b.now.Add(-time.Second)) // oldest, but expired
		insertLookback(t, b, "wfr_L", "ev", `"at-now"`, b.now)                    // expires now: expired
		first := insertLookback(t, b, "wfr_L", "ev", `"first"`, keep)
		insertLookback(t, b, "wfr_L", "other", `"other event"`, keep)
		insertLookback(t, b, "wfr_L", "EV", `"other case"`, keep)
		insertLookback(t, b, "wfr_l", "ev", `"other run"`, keep)
		second := insertLookback(t, b, "wfr_L", "ev", `"second"`, keep)

		listed, err := b.store.LookbackEventListByRun(b.ctx, "wfr_L", b.now)
		require.NoError(t, err)
		require.Len(t, listed, 4, "unconsumed and unexpired, all event ids")

		var got []*models.LookbackEvent
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			if _, err := tx.RunGet(b.ctx, "wfr_L", true); err != nil {
				return err
			}
			for {
				e, err := tx.LookbackEventConsume(b.ctx, "wfr_L", "ev", b.now)
				if err != nil {
					return err
				}
				if e == nil {
					return nil
				}
				got = append(got, e)
			}
		}))
		require.Len(t, got, 2)
		require.Equal(t, first.ID, got[0].ID)
		require.Equal(t, second.ID, got[1].ID)
		require.Equal(t, `"first"`, string(got[0].EventData))
		require.Equal(t, "msg_lb", got[0].MessageID)
		require.Equal(t, "wfr_L", got[0].WorkflowRunID)
		require.Equal(t, "ev", got[0].EventID)
		require.Equal(t, b.now.Truncate(time.Microsecond), got[0].CreatedAt)
		require.Equal(t, keep.Truncate(time.Microsecond), got[0].ExpiresAt)

		// Each once.
		e, err := b.store.LookbackEventConsume(b.ctx, "wfr_L", "ev", b.now)
		require.NoError(t, err)
		require.Nil(t, e)

		listed, err = b.store.LookbackEventListByRun(b.ctx, "wfr_L", b.now)
		require.NoError(t, err)
		require.Len(t, listed, 2, "the consumed ones are no longer listed")

		// None at all.
		e, err = b.store.LookbackEventConsume(b.ctx, "wfr_none", "ev", b.now)
		require.NoError(t, err)
		require.Nil(t, e)
	})

	t.Run("LookbackEventDeleteByRun", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		keep := b.now.Add(time.Hour)
		insertLookback(t, b, "wfr_D", "ev", `1`, keep)
		insertLookback(t, b, "wfr_D", "ev", `2`, keep)
		insertLookback(t, b, "wfr_D", "other", `3`, keep)
		insertLookback(t, b, "wfr_D", "ev", `4`, b.now.Add(-time.Hour)) // expired, unconsumed: dropped too
		insertLookback(t, b, "wfr_other", "ev", `5`, keep)
		consumed, err := b.store.LookbackEventConsume(b.ctx, "wfr_D", "ev", b.now)
		require.NoError(t, err)
		require.NotNil(t, consumed)

		n, err := b.store.LookbackEventDeleteByRun(b.ctx, "wfr_D")
		require.NoError(t, err)
		require.EqualValues(t, 3, n, "only the unconsumed ones")

		listed, err := b.store.LookbackEventListByRun(b.ctx, "wfr_D", b.now)
		require.NoError(t, err)
		require.Empty(t, listed)
		listed, err = b.store.LookbackEventListByRun(b.ctx, "wfr_other", b.now)
		require.NoError(t, err)
		require.Len(t, listed, 1)

		n, err = b.store.LookbackEventDeleteByRun(b.ctx, "wfr_D")
		require.NoError(t, err)
		require.Zero(t, n)

		// The consumed one is still there: a purge far in the future finds it
		// along with the other run's event, which alone expired unconsumed.
		n, unconsumed, err := b.store.LookbackEventPurge(b.ctx, b.now.Add(24*time.Hour), 100)
		require.NoError(t, err)
		require.EqualValues(t, 2, n)
		require.EqualValues(t, 1, unconsumed)
	})

	t.Run("LookbackEventPurge", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		for i := range 5 {
			insertLookback(t, b, "wfr_P", "ev", strconv.Itoa(i), b.now.Add(-time.Duration(i+1)*time.Minute))
		}
		insertLookback(t, b, "wfr_P", "ev", `"at-now"`, b.now)
		live := insertLookback(t, b, "wfr_P", "ev", `"live"`, b.now.Add(time.Microsecond))

		n, unconsumed, err := b.store.LookbackEventPurge(b.ctx, b.now, 4)
		require.NoError(t, err)
		require.EqualValues(t, 4, n, "bounded by limit")
		require.EqualValues(t, 4, unconsumed, "none was consumed")
		n, _, err = b.store.LookbackEventPurge(b.ctx, b.now, 100)
		require.NoError(t, err)
		require.EqualValues(t, 2, n)
		n, unconsumed, err = b.store.LookbackEventPurge(b.ctx, b.now, 100)
		require.NoError(t, err)
		require.Zero(t, n)
		require.Zero(t, unconsumed)

		e, err := b.store.LookbackEventConsume(b.ctx, "wfr_P", "ev", b.now)
		require.NoError(t, err)
		require.NotNil(t, e)
		require.Equal(t, live.ID, e.ID)
	})

	t.Run("Counts", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		// Empty: nothing anywhere.
		runs, err := b.store.RunCountByState(b.ctx)
		require.NoError(t, err)
		require.Empty(t, runs)
		waiters, err := b.store.WaiterCountByState(b.ctx, b.now)
		require.NoError(t, err)
		require.Empty(t, waiters)
		oldest, err := b.store.WaiterOldestDeadline(b.ctx, b.now)
		require.NoError(t, err)
		require.Nil(t, oldest)
		n, err := b.store.WaiterCountWaiting(b.ctx, b.now)
		require.NoError(t, err)
		require.Zero(t, n)
		n, err = b.store.LookbackEventCountPending(b.ctx, b.now)
		require.NoError(t, err)
		require.Zero(t, n)

		insertRun(t, b, "wfr_c1")
		insertRun(t, b, "wfr_c2")
		insertRun(t, b, "wfr_c3")
		require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: "wfr_c3", State: models.RunFailed, UpdatedAt: b.now}))
		runs, err = b.store.RunCountByState(b.ctx)
		require.NoError(t, err)
		require.Equal(t, map[models.RunState]int64{models.RunStarted: 2, models.RunFailed: 1}, runs)

		soon := b.now.Add(time.Minute)
		insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		insertWaiter(t, b, "ev", nil, soon)
		insertWaiter(t, b, "ev", nil, b.now.Add(-time.Second)) // overdue: timed out, swept or not
		notified := insertWaiter(t, b, "ev", nil, b.now.Add(time.Hour))
		_, err = b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{notified.ID}, State: models.WaiterNotified, EndedAt: b.now, MessageID: ptr("msg_c"), EventID: "ev"})
		require.NoError(t, err)
		waiters, err = b.store.WaiterCountByState(b.ctx, b.now)
		require.NoError(t, err)
		require.Equal(t, map[models.WaiterState]int64{models.WaiterWaiting: 2, models.WaiterTimedOut: 1, models.WaiterNotified: 1}, waiters)
		n, err = b.store.WaiterCountWaiting(b.ctx, b.now)
		require.NoError(t, err)
		require.EqualValues(t, 2, n)
		oldest, err = b.store.WaiterOldestDeadline(b.ctx, b.now)
		require.NoError(t, err)
		require.NotNil(t, oldest)
		require.Equal(t, soon.Truncate(time.Microsecond), *oldest)

		insertLookback(t, b, "wfr_c1", "ev", `1`, b.now.Add(time.Hour))
		insertLookback(t, b, "wfr_c1", "ev", `2`, b.now.Add(time.Hour))
		insertLookback(t, b, "wfr_c1", "ev", `3`, b.now.Add(-time.Hour)) // expired
		_, err = b.store.LookbackEventConsume(b.ctx, "wfr_c1", "ev", b.now)
		require.NoError(t, err)
		n, err = b.store.LookbackEventCountPending(b.ctx, b.now)
		require.NoError(t, err)
		require.EqualValues(t, 1, n)
	})

	t.Run("Steps", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		insertRun(t, b, "wfr_S")
		w := insertWaiter(t, b, "ev", ptr("wfr_S"), b.now.Add(time.Hour))
		done := b.now.Add(time.Second)

		wait := &storage.StepRecord{RunID: "wfr_S", StepName: "wait", Type: models.StepWaitForEvent, EventID: "ev", WaiterID: w.ID, CreatedAt: b.now}
		notify := &storage.StepRecord{RunID: "wfr_S", StepName: "notify", Type: models.StepNotify, EventID: "ev2", Result: []byte(`{"n":1}`), CreatedAt: b.now, CompletedAt: &done}
		require.NoError(t, b.store.StepInsert(b.ctx, wait))
		require.NoError(t, b.store.StepInsert(b.ctx, notify))

		err := b.store.StepInsert(b.ctx, &storage.StepRecord{RunID: "wfr_S", StepName: "wait", Type: models.StepNotify, EventID: "x", CreatedAt: b.now})
		require.ErrorIs(t, err, storage.ErrDuplicate)
		// Same name, other case or other run: a different step.
		require.NoError(t, b.store.StepInsert(b.ctx, &storage.StepRecord{RunID: "wfr_S", StepName: "Wait", Type: models.StepNotify, EventID: "x", CreatedAt: b.now}))
		require.NoError(t, b.store.StepInsert(b.ctx, &storage.StepRecord{RunID: "wfr_s", StepName: "wait", Type: models.StepNotify, EventID: "x", CreatedAt: b.now}))
		require.Error(t, b.store.StepInsert(b.ctx, &storage.StepRecord{RunID: "wfr_S", StepName: "bad", Type: models.StepWaitForEvent, EventID: "x", WaiterID: "nope", CreatedAt: b.now}))

		got, err := b.store.StepGet(b.ctx, "wfr_S", "wait")
		require.NoError(t, err)
		require.Equal(t, &storage.StepRecord{RunID: "wfr_S", StepName: "wait", Type: models.StepWaitForEvent, EventID: "ev", WaiterID: w.ID, CreatedAt: b.now.Truncate(time.Microsecond)}, got)

		got, err = b.store.StepGet(b.ctx, "wfr_S", "notify")
		require.NoError(t, err)
		require.Equal(t, `{"n":1}`, string(got.Result))
		require.Empty(t, got.WaiterID)
		require.NotNil(t, got.CompletedAt)
		require.Equal(t, done.Truncate(time.Microsecond), *got.CompletedAt)

		_, err = b.store.StepGet(b.ctx, "wfr_S", "missing")
		require.ErrorIs(t, err, storage.ErrNotFound)

		list, err := b.store.StepListByRun(b.ctx, "wfr_S")
		require.NoError(t, err)
		var names []string
		for _, s := range list {
			names = append(names, s.StepName)
		}
		require.Equal(t, []string{"wait", "notify", "Wait"}, names)
		// The wait step comes with its waiter, read in the same statement.
		require.Equal(t, &storage.StepWaiter{State: models.WaiterWaiting, Deadline: b.now.Add(time.Hour).Truncate(time.Microsecond)}, list[0].Waiter)
		require.Nil(t, list[1].Waiter)
		_, err = b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w.ID}, State: models.WaiterCanceled, EndedAt: done})
		require.NoError(t, err)
		list, err = b.store.StepListByRun(b.ctx, "wfr_S")
		require.NoError(t, err)
		require.Equal(t, models.WaiterCanceled, list[0].Waiter.State)
		require.Equal(t, done.Truncate(time.Microsecond), *list[0].Waiter.EndedAt)
	})

	t.Run("Purge", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		old, recent := b.now.Add(-40*24*time.Hour), b.now.Add(-24*time.Hour)
		cutoff := b.now.Add(-30 * 24 * time.Hour)
		ended := func(id string, at time.Time) {
			insertRun(t, b, id, func(r *models.WorkflowRun) { r.State, r.CreatedAt, r.UpdatedAt = models.RunSuccess, at, at })
		}
		endWaiters := func(ids []string, state models.WaiterState, at time.Time, msg string) {
			p := &storage.WaiterEndParams{WaiterIDs: ids, State: state, EndedAt: at}
			if msg != "" {
				p.MessageID, p.EventData = &msg, []byte(`{"m":"`+msg+`"}`)
			}
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				got, err := tx.WaiterEnd(b.ctx, p)
				require.Len(t, got, len(ids))
				return err
			}))
		}
		waiter := func(ev string, run *string, created time.Time) *models.Waiter {
			w := &models.Waiter{EventID: ev, WorkflowRunID: run, State: models.WaiterWaiting, Deadline: b.now.Add(time.Hour), CreatedAt: created}
			require.NoError(t, b.store.WaiterInsert(b.ctx, w))
			return w
		}

		// Runs to purge: ended long ago, with waiters, steps, lookback events.
		insertRun(t, b, "wfr_old", func(r *models.WorkflowRun) { r.CreatedAt, r.UpdatedAt = old, old })
		oldShared := waiter("ev", ptr("wfr_old"), old)
		oldCanceled := waiter("ev", ptr("wfr_old"), old)
		require.NoError(t, b.store.StepInsert(b.ctx, &storage.StepRecord{RunID: "wfr_old", StepName: "wait", Type: models.StepWaitForEvent, EventID: "ev", WaiterID: oldCanceled.ID, CreatedAt: old}))
		require.NoError(t, b.store.StepInsert(b.ctx, &storage.StepRecord{RunID: "wfr_old", StepName: "tell", Type: models.StepNotify, EventID: "ev", Result: []byte(`{}`), CreatedAt: old, CompletedAt: &old}))
		require.NoError(t, b.store.LookbackEventInsert(b.ctx, &models.LookbackEvent{WorkflowRunID: "wfr_old", EventID: "lb", MessageID: "msg_lb", CreatedAt: old, ExpiresAt: old.Add(time.Hour)}))
		require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: "wfr_old", State: models.RunCanceled, UpdatedAt: old}))
		ended("wfr_old2", old)
		old2 := waiter("ev2", ptr("wfr_old2"), old)
		endWaiters([]string{old2.ID}, models.WaiterNotified, old, "msg_only_old2")

		// A notification shared with a waiter of a started run stays.
		insertRun(t, b, "wfr_started", func(r *models.WorkflowRun) {
			r.CreatedAt, r.UpdatedAt = old.Add(-300*24*time.Hour), old.Add(-300*24*time.Hour)
		})
		startedEnded := waiter("ev", ptr("wfr_started"), old)
		endWaiters([]string{oldShared.ID, startedEnded.ID}, models.WaiterNotified, old, "msg_shared")
		endWaiters([]string{oldCanceled.ID}, models.WaiterCanceled, old, "")
		require.NoError(t, b.store.StepInsert(b.ctx, &storage.StepRecord{RunID: "wfr_started", StepName: "s", Type: models.StepNotify, EventID: "ev", CreatedAt: old}))
		startedWaiting := waiter("ev", ptr("wfr_started"), old)

		// Kept: ended too recently; ended long ago but something live left
		// (which ending a run forbids, but if it happens the run stays).
		ended("wfr_recent", recent)
		recentW := waiter("ev", ptr("wfr_recent"), recent)
		endWaiters([]string{recentW.ID}, models.WaiterCanceled, recent, "")
		ended("wfr_stuck", old)
		stuck := waiter("ev", ptr("wfr_stuck"), old)
		ended("wfr_pending", old)
		require.NoError(t, b.store.LookbackEventInsert(b.ctx, &models.LookbackEvent{WorkflowRunID: "wfr_pending", EventID: "lb", MessageID: "msg_p", CreatedAt: old, ExpiresAt: b.now.Add(time.Hour)}))

		// Waiters without a run.
		runlessOld := waiter("free", nil, old)
		endWaiters([]string{runlessOld.ID}, models.WaiterNotified, old, "msg_runless")
		runlessWaiting := waiter("free", nil, old)
		runlessRecent := waiter("free", nil, old)
		endWaiters([]string{runlessRecent.ID}, models.WaiterTimedOut, b.now.Add(-time.Minute), "")

		// Small batches: each call stays within its limit.
		const limit = 2
		var total storage.PurgeResult
		for calls := 0; ; calls++ {
			require.Less(t, calls, 50, "purge does not finish")
			var res storage.PurgeResult
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				var err error
				res, err = tx.RunPurge(b.ctx, &storage.PurgeParams{EndedBefore: cutoff, Now: b.now, Limit: limit})
				return err
			}))
			require.LessOrEqual(t, res.Waiters+res.Steps+res.LookbackEvents, int64(limit))
			total = total.Add(res)
			if !res.More {
				break
			}
		}
		total.More = false
		require.Equal(t, storage.PurgeResult{Runs: 2, Waiters: 3, Steps: 2, LookbackEvents: 1, Notifications: 1}, total)
		for {
			var res storage.PurgeResult
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				var err error
				res, err = tx.WaiterPurgeRunless(b.ctx, &storage.PurgeParams{EndedBefore: b.now.Add(-time.Hour), Now: b.now, Limit: 1})
				return err
			}))
			require.LessOrEqual(t, res.Waiters, int64(1))
			total = total.Add(res)
			if !res.More {
				break
			}
		}
		total.More = false
		require.Equal(t, storage.PurgeResult{Runs: 2, Waiters: 4, Steps: 2, LookbackEvents: 1, Notifications: 2}, total)

		for _, id := range []string{"wfr_old", "wfr_old2"} {
			_, err := b.store.RunGet(b.ctx, id, false)
			require.ErrorIs(t, err, storage.ErrNotFound, id)
			steps, err := b.store.StepListByRun(b.ctx, id)
			require.NoError(t, err)
			require.Empty(t, steps)
			ws, err := b.store.WaiterListByRun(b.ctx, id)
			require.NoError(t, err)
			require.Empty(t, ws)
		}
		for _, id := range []string{"wfr_started", "wfr_recent", "wfr_stuck", "wfr_pending"} {
			_, err := b.store.RunGet(b.ctx, id, false)
			require.NoError(t, err, id)
		}
		for _, w := range []*models.Waiter{oldShared, oldCanceled, old2, runlessOld} {
			_, err := b.store.WaiterGet(b.ctx, w.ID)
			require.ErrorIs(t, err, storage.ErrNotFound, w.ID)
		}
		for _, w := range []*models.Waiter{startedEnded, startedWaiting, recentW, stuck, runlessWaiting, runlessRecent} {
			_, err := b.store.WaiterGet(b.ctx, w.ID)
			require.NoError(t, err, w.ID)
		}
		// The shared notification still gives its waiter its data.
		got, err := b.store.WaiterGet(b.ctx, startedEnded.ID)
		require.NoError(t, err)
		require.JSONEq(t, `{"m":"msg_shared"}`, string(got.EventData))
		steps, err := b.store.StepListByRun(b.ctx, "wfr_started")
		require.NoError(t, err)
		require.Len(t, steps, 1)
		pending, err := b.store.LookbackEventListByRun(b.ctx, "wfr_pending", b.now)
		require.NoError(t, err)
		require.Len(t, pending, 1)
		var notifications []string
		rows, err := rawDB(t, b.url).QueryContext(b.ctx, `SELECT message_id FROM notifications ORDER BY message_id`)
		require.NoError(t, err)
		for rows.Next() {
			var m string
			require.NoError(t, rows.Scan(&m))
			notifications = append(notifications, m)
		}
		require.NoError(t, rows.Err())
		rows.Close()
		require.Equal(t, []string{"msg_shared"}, notifications)

		// Nothing more to do: a second pass deletes nothing.
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			res, err := tx.RunPurge(b.ctx, &storage.PurgeParams{EndedBefore: cutoff, Now: b.now, Limit: 100})
			require.Zero(t, res.Rows())
			return err
		}))
	})

	t.Run("PurgeLargeRunInBoundedBatches", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		old := b.now.Add(-40 * 24 * time.Hour)
		insertRun(t, b, "wfr_big", func(r *models.WorkflowRun) { r.CreatedAt, r.UpdatedAt = old, old })
		var ids []string
		for range 25 {
			w := &models.Waiter{EventID: "ev", WorkflowRunID: ptr("wfr_big"), State: models.WaiterWaiting, Deadline: b.now, CreatedAt: old}
			require.NoError(t, b.store.WaiterInsert(b.ctx, w))
			ids = append(ids, w.ID)
		}
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			_, err := tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: ids, State: models.WaiterNotified, EndedAt: old, MessageID: ptr("msg_big"), EventData: []byte(`1`)})
			return err
		}))
		require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: "wfr_big", State: models.RunSuccess, UpdatedAt: old}))
		var calls int
		for ; ; calls++ {
			var res storage.PurgeResult
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				var err error
				res, err = tx.RunPurge(b.ctx, &storage.PurgeParams{EndedBefore: b.now.Add(-time.Hour), Now: b.now, Limit: 10})
				return err
			}))
			require.LessOrEqual(t, res.Waiters, int64(10))
			if calls < 2 {
				// The run and the notification its waiters share go last.
				require.Zero(t, res.Runs)
				require.Zero(t, res.Notifications)
				_, err := b.store.RunGet(b.ctx, "wfr_big", false)
				require.NoError(t, err)
			}
			if !res.More {
				require.Equal(t, int64(1), res.Runs)
				require.Equal(t, int64(1), res.Notifications)
				break
			}
		}
		require.Equal(t, 2, calls)
		_, err := b.store.RunGet(b.ctx, "wfr_big", false)
		require.ErrorIs(t, err, storage.ErrNotFound)
	})

	// Two replicas purging at once: every row goes once, and no
	// notification is left behind because each saw the other's waiter still
	// referring to it.
	t.Run("PurgeConcurrent", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		other := openStore(t, b.url)
		old := b.now.Add(-40 * 24 * time.Hour)
		const runs, perMsg = 30, 4
		var all []string
		for i := range runs {
			id := "wfr_c" + strconv.Itoa(i)
			insertRun(t, b, id, func(r *models.WorkflowRun) { r.CreatedAt, r.UpdatedAt = old, old })
			for range 3 {
				var run *string
				if len(all)%2 == 0 {
					run = &id
				}
				w := &models.Waiter{EventID: "ev", WorkflowRunID: run, State: models.WaiterWaiting, Deadline: b.now, CreatedAt: old}
				require.NoError(t, b.store.WaiterInsert(b.ctx, w))
				all = append(all, w.ID)
			}
		}
		// Each notification is shared by perMsg waiters of different runs,
		// with and without a run.
		for i := 0; i < len(all); i += perMsg {
			ids := all[i:min(i+perMsg, len(all))]
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				_, err := tx.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: ids, State: models.WaiterNotified, EndedAt: old,
					MessageID: ptr("msg_c" + strconv.Itoa(i)), EventData: []byte(`1`)})
				return err
			}))
		}
		for i := range runs {
			require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: "wfr_c" + strconv.Itoa(i), State: models.RunSuccess, UpdatedAt: old}))
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		var total storage.PurgeResult
		// One purges runs while the other purges waiters without a run: the
		// two delete different waiters of the same notifications at once.
		purges := []func(storage.Executor, context.Context, *storage.PurgeParams) (storage.PurgeResult, error){
			storage.Executor.RunPurge, storage.Executor.WaiterPurgeRunless,
		}
		for i, s := range []storage.Store{b.store, other} {
			wg.Go(func() {
				p := &storage.PurgeParams{EndedBefore: b.now.Add(-time.Hour), Now: b.now, Limit: 5}
				for _, purge := range []func(storage.Executor, context.Context, *storage.PurgeParams) (storage.PurgeResult, error){
					purges[i], purges[1-i],
				} {
					for {
						var res storage.PurgeResult
						err := s.InTx(b.ctx, func(tx storage.Executor) error {
							var err error
							res, err = purge(tx, b.ctx, p)
							return err
						})
						if !assert.NoError(t, err) {
							return
						}
						mu.Lock()
						total = total.Add(res)
						mu.Unlock()
						if !res.More {
							break
						}
					}
				}
			})
		}
		wg.Wait()
		db := rawDB(t, b.url)
		for _, table := range []string{"runs", "waiters", "notifications"} {
			var n int
			require.NoError(t, db.QueryRowContext(b.ctx, `SELECT COUNT(*) FROM `+table).Scan(&n))
			require.Zero(t, n, table)
		}
		require.Equal(t, int64(runs), total.Runs)
		require.Equal(t, int64(len(all)), total.Waiters)
		require.Equal(t, int64((len(all)+perMsg-1)/perMsg), total.Notifications)
	})

	// Runs kept because something of theirs is still live (here a waiter
	// still WAITING) sit at the head of runs_ended, more of them than one
	// call reads: calls with the same params move past them and purge the
	// runs behind, and a purge that deleted nothing still says there is more.
	t.Run("PurgeMovesPastKeptRuns", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		old := b.now.Add(-40 * 24 * time.Hour)
		const kept = 230 // > purgeScanRuns
		for i := range kept {
			id := "wfr_kept" + strconv.Itoa(i)
			insertRun(t, b, id)
			insertWaiter(t, b, "k", ptr(id), b.now.Add(time.Hour))
			require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: id, State: models.RunSuccess, UpdatedAt: old}))
		}
		for i := range 3 {
			id := "wfr_behind" + strconv.Itoa(i)
			insertRun(t, b, id)
			require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: id, State: models.RunSuccess, UpdatedAt: old.Add(time.Minute)}))
		}
		p := &storage.PurgeParams{EndedBefore: b.now.Add(-time.Hour), Now: b.now, Limit: 10}
		var total storage.PurgeResult
		var calls, empty int
		for ; ; calls++ {
			require.Less(t, calls, 10, "purge does not finish")
			var res storage.PurgeResult
			require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
				var err error
				res, err = tx.RunPurge(b.ctx, p)
				return err
			}))
			if res.Rows() == 0 && res.More {
				empty++
			}
			total = total.Add(res)
			if !res.More {
				break
			}
		}
		require.Equal(t, int64(3), total.Runs)
		require.GreaterOrEqual(t, empty, 1, "a call that only read kept runs says there is more")
		for i := range 3 {
			_, err := b.store.RunGet(b.ctx, "wfr_behind"+strconv.Itoa(i), false)
			require.ErrorIs(t, err, storage.ErrNotFound)
		}
		var n int
		require.NoError(t, rawDB(t, b.url).QueryRowContext(b.ctx, `SELECT COUNT(*) FROM runs`).Scan(&n))
		require.Equal(t, kept, n, "every kept run is still there")
	})

	// During a rolling upgrade, replicas on the binary before ended_at end
	// runs without it: the purge still finds them, by updated_at.
	t.Run("PurgeRunEndedByOlderBinary", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		old := b.now.Add(-40 * 24 * time.Hour)
		insertRun(t, b, "wfr_legacy")
		insertRun(t, b, "wfr_legacy_recent")
		insertRun(t, b, "wfr_started")
		db := rawDB(t, b.url)
		for id, at := range map[string]time.Time{"wfr_legacy": old, "wfr_legacy_recent": b.now} {
			_, err := db.ExecContext(b.ctx, `UPDATE runs SET state = 'RUN_FAILED', updated_at = ? WHERE id = ?`, at.UTC().Format("2006-01-02 15:04:05.000000"), id)
			require.NoError(t, err)
		}
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			res, err := tx.RunPurge(b.ctx, &storage.PurgeParams{EndedBefore: b.now.Add(-30 * 24 * time.Hour), Now: b.now, Limit: 10})
			require.Equal(t, int64(1), res.Runs)
			return err
		}))
		_, err := b.store.RunGet(b.ctx, "wfr_legacy", false)
		require.ErrorIs(t, err, storage.ErrNotFound)
		for _, id := range []string{"wfr_legacy_recent", "wfr_started"} {
			_, err := b.store.RunGet(b.ctx, id, false)
			require.NoError(t, err, id)
		}
	})

	t.Run("WaiterListWaitingByRun", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		insertRun(t, b, "wfr_L")
		live := insertWaiter(t, b, "a", ptr("wfr_L"), b.now.Add(time.Hour))
		overdue := insertWaiter(t, b, "b", ptr("wfr_L"), b.now.Add(-time.Hour))
		ended := insertWaiter(t, b, "a", ptr("wfr_L"), b.now.Add(time.Hour))
		insertWaiter(t, b, "a", ptr("wfr_other"), b.now.Add(time.Hour))
		insertWaiter(t, b, "a", nil, b.now.Add(time.Hour))
		_, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{ended.ID}, State: models.WaiterCanceled, EndedAt: b.now})
		require.NoError(t, err)
		ws, err := b.store.WaiterListWaitingByRun(b.ctx, "wfr_L")
		require.NoError(t, err)
		var ids []string
		for _, w := range ws {
			ids = append(ids, w.ID)
		}
		require.Equal(t, []string{live.ID, overdue.ID}, ids)
	})

	t.Run("InTxRollsBack", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		boom := errors.New("boom")
		calls := 0
		err := b.store.InTx(b.ctx, func(tx storage.Executor) error {
			calls++
			if err := tx.RunInsert(b.ctx, &models.WorkflowRun{WorkflowRunID: "wfr_rolled", State: models.RunStarted, CreatedAt: b.now, UpdatedAt: b.now}); err != nil {
				return err
			}
			if err := tx.WaiterInsert(b.ctx, &models.Waiter{EventID: "ev", WorkflowRunID: ptr("wfr_rolled"), State: models.WaiterWaiting, Deadline: b.now.Add(time.Hour), CreatedAt: b.now}); err != nil {
				return err
			}
			if err := tx.LookbackEventInsert(b.ctx, &models.LookbackEvent{WorkflowRunID: "wfr_rolled", EventID: "ev", MessageID: "m", CreatedAt: b.now, ExpiresAt: b.now.Add(time.Hour)}); err != nil {
				return err
			}
			// Seen inside the transaction…
			if _, err := tx.RunGet(b.ctx, "wfr_rolled", true); err != nil {
				return err
			}
			return fmt.Errorf("step failed: %w", boom)
		})
		require.ErrorIs(t, err, boom)
		require.Equal(t, 1, calls, "an ordinary error is not retried")

		// …gone after.
		_, err = b.store.RunGet(b.ctx, "wfr_rolled", false)
		require.ErrorIs(t, err, storage.ErrNotFound)
		ws, err := b.store.WaiterListByRun(b.ctx, "wfr_rolled")
		require.NoError(t, err)
		require.Empty(t, ws)
		ls, err := b.store.LookbackEventListByRun(b.ctx, "wfr_rolled", b.now)
		require.NoError(t, err)
		require.Empty(t, ls)

		// And a nil return commits.
		require.NoError(t, b.store.InTx(b.ctx, func(tx storage.Executor) error {
			return tx.RunInsert(b.ctx, &models.WorkflowRun{WorkflowRunID: "wfr_kept", State: models.RunStarted, CreatedAt: b.now, UpdatedAt: b.now})
		}))
		_, err = b.store.RunGet(b.ctx, "wfr_kept", false)
		require.NoError(t, err)
	})

	t.Run("InTxCanceledContext", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		ctx, cancel := context.WithCancel(b.ctx)
		cancel()
		err := b.store.InTx(ctx, func(tx storage.Executor) error {
			return tx.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: "wfr_never", State: models.RunStarted, CreatedAt: b.now, UpdatedAt: b.now})
		})
		require.ErrorIs(t, err, context.Canceled)
		_, err = b.store.RunGet(b.ctx, "wfr_never", false)
		require.ErrorIs(t, err, storage.ErrNotFound)
	})

	t.Run("TimesRoundTripInUTCWithMicroseconds", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		zone := time.FixedZone("UTC+5:30", 5*3600+1800)
		created := time.Date(2031, 12, 31, 23, 59, 59, 999999999, zone) // nanoseconds are dropped, not rounded up
		updated := time.Date(2032, 1, 1, 4, 0, 0, 1000, zone)           // the previous day and year in UTC
		insertRun(t, b, "wfr_T", func(r *models.WorkflowRun) {
			r.CreatedAt = created
			r.UpdatedAt = updated
		})
		got, err := b.store.RunGet(b.ctx, "wfr_T", false)
		require.NoError(t, err)
		require.Equal(t, time.UTC, got.CreatedAt.Location())
		require.Equal(t, time.UTC, got.UpdatedAt.Location())
		require.Equal(t, created.UTC().Truncate(time.Microsecond), got.CreatedAt)
		require.Equal(t, 999999000, got.CreatedAt.Nanosecond())
		require.Equal(t, updated.UTC().Truncate(time.Microsecond), got.UpdatedAt)
		require.Equal(t, time.Date(2031, 12, 31, 22, 30, 0, 1000, time.UTC), got.UpdatedAt)

		deadline := time.Date(2031, 6, 1, 12, 0, 0, 1000, zone)
		w := insertWaiter(t, b, "ev", nil, deadline)
		gw, err := b.store.WaiterGet(b.ctx, w.ID)
		require.NoError(t, err)
		require.Equal(t, time.UTC, gw.Deadline.Location())
		require.Equal(t, deadline.UTC(), gw.Deadline)

		// Deadline comparisons are in instants, whatever the zone of the argument.
		ws, err := b.store.WaiterListWaiting(b.ctx, &storage.WaiterListWaitingParams{EventID: "ev", Now: deadline.Add(-time.Microsecond).In(time.FixedZone("UTC-8", -8*3600))})
		require.NoError(t, err)
		require.Len(t, ws, 1)
		ws, err = b.store.WaiterListWaiting(b.ctx, &storage.WaiterListWaitingParams{EventID: "ev", Now: deadline.In(time.FixedZone("UTC-8", -8*3600))})
		require.NoError(t, err)
		require.Empty(t, ws)
		exp, err := b.store.WaiterListExpired(b.ctx, deadline.In(zone), 10)
		require.NoError(t, err)
		require.Len(t, exp, 1)

		// Same instant, different zones: the stored values are equal.
		a := insertWaiter(t, b, "zones", nil, deadline)
		c := insertWaiter(t, b, "zones", nil, deadline.In(time.FixedZone("UTC-8", -8*3600)))
		ga, err := b.store.WaiterGet(b.ctx, a.ID)
		require.NoError(t, err)
		gc, err := b.store.WaiterGet(b.ctx, c.ID)
		require.NoError(t, err)
		require.Equal(t, ga.Deadline, gc.Deadline)
	})

	t.Run("EventDataRoundTripsExactly", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		big := bigJSON(t, 1<<20)
		values := [][]byte{
			[]byte(`null`),
			[]byte(`true`),
			[]byte(`0`),
			[]byte(`-12.5e-7`),
			[]byte(`12345678901234567890123456789`),
			[]byte(`""`),
			[]byte(`"plain"`),
			[]byte(`{"b":1,"a":[1,2,{"c":null}],"z":{}}`),
			[]byte(`{ "spaced" :  [ 1 , 2 ] }`),
			[]byte(`"héllo wörld – ünïcödé ✓ 日本語 𝄞 😀 \u00e9 \ud83d\ude00"`),
			[]byte(`"quotes \" backslash \\ slash \/ ctl \n\t\u0000 html <>&' percent %s"`),
			[]byte("\"raw\u2028line\u2029sep\""),
			big,
		}
		insertRun(t, b, "wfr_data")
		for i, v := range values {
			require.True(t, json.Valid(v), "value %d", i)
			check := func(what string, got []byte) {
				t.Helper()
				if !bytes.Equal(v, got) {
					t.Fatalf("%s %d: got %d bytes, want %d bytes (%.80q…)", what, i, len(got), len(v), got)
				}
			}

			runID := "wfr_body_" + strconv.Itoa(i)
			insertRun(t, b, runID, func(r *models.WorkflowRun) { r.Body = v })
			r, err := b.store.RunGet(b.ctx, runID, false)
			require.NoError(t, err)
			check("run body", r.Body)

			require.NoError(t, b.store.RunEnd(b.ctx, &storage.RunEndParams{RunID: runID, State: models.RunSuccess, Result: v, UpdatedAt: b.now}))
			r, err = b.store.RunGet(b.ctx, runID, false)
			require.NoError(t, err)
			check("run result", r.Result)

			w := insertWaiter(t, b, "data", nil, b.now.Add(time.Hour))
			moved, err := b.store.WaiterEnd(b.ctx, &storage.WaiterEndParams{WaiterIDs: []string{w.ID}, State: models.WaiterNotified, EndedAt: b.now, MessageID: ptr("msg_data_" + strconv.Itoa(i)), EventID: "data", EventData: v})
			require.NoError(t, err)
			require.Len(t, moved, 1)
			gw, err := b.store.WaiterGet(b.ctx, w.ID)
			require.NoError(t, err)
			check("waiter event data", gw.EventData)

			eventID := "data-" + strconv.Itoa(i)
			insertLookback(t, b, "wfr_data", eventID, string(v), b.now.Add(time.Hour))
			e, err := b.store.LookbackEventConsume(b.ctx, "wfr_data", eventID, b.now)
			require.NoError(t, err)
			require.NotNil(t, e)
			check("lookback event data", e.EventData)

			require.NoError(t, b.store.StepInsert(b.ctx, &storage.StepRecord{RunID: "wfr_data", StepName: eventID, Type: models.StepNotify, EventID: eventID, Result: v, CreatedAt: b.now}))
			s, err := b.store.StepGet(b.ctx, "wfr_data", eventID)
			require.NoError(t, err)
			check("step result", s.Result)
		}
	})

	t.Run("UnicodeIDs", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		runID := "wfr_заказ-😀-𝄞"
		eventID := "order-✓-日本語-😀"
		insertRun(t, b, runID)
		w := insertWaiter(t, b, eventID, &runID, b.now.Add(time.Hour))
		ws, err := b.store.WaiterListWaiting(b.ctx, &storage.WaiterListWaitingParams{EventID: eventID, RunID: &runID, Now: b.now})
		require.NoError(t, err)
		require.Equal(t, []string{w.ID}, ids(ws))
		require.Equal(t, eventID, ws[0].EventID)
		require.Equal(t, runID, *ws[0].WorkflowRunID)
	})

	t.Run("RunLockSerializes", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		insertRun(t, b, "wfr_counter", func(r *models.WorkflowRun) { r.Result = []byte(`0`) })
		const workers, rounds = 16, 5
		var wg sync.WaitGroup
		errs := make(chan error, workers*rounds)
		for range workers {
			wg.Go(func() {
				for range rounds {
					errs <- incrementCounter(b.ctx, b.store, "wfr_counter")
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		require.Equal(t, workers*rounds, readCounter(t, b.store, "wfr_counter"))
	})
}

// incrementCounter adds one to the counter kept in the run's result, holding
// the run's row lock: lost updates would show as a short final count.
func incrementCounter(ctx context.Context, s storage.Store, runIDs ...string) error {
	return s.InTx(ctx, func(tx storage.Executor) error {
		for _, id := range runIDs {
			if err := incrementLocked(ctx, tx, id); err != nil {
				return err
			}
		}
		return nil
	})
}

func incrementLocked(ctx context.Context, tx storage.Executor, runID string) error {
	run, err := tx.RunGet(ctx, runID, true)
	if err != nil {
		return fmt.Errorf("lock %s: %w", runID, err)
	}
	n, err := strconv.Atoi(string(run.Result))
	if err != nil {
		return fmt.Errorf("counter of %s: %w", runID, err)
	}
	return tx.RunEnd(ctx, &storage.RunEndParams{RunID: runID, State: models.RunStarted, Result: []byte(strconv.Itoa(n + 1)), UpdatedAt: time.Now()})
}

func readCounter(t *testing.T, s storage.Store, runID string) int {
	t.Helper()
	run, err := s.RunGet(t.Context(), runID, false)
	require.NoError(t, err)
	n, err := strconv.Atoi(string(run.Result))
	require.NoError(t, err)
	return n
}

// bigJSON is a JSON string of about size bytes mixing ASCII, multi-byte
// characters and escapes.
func bigJSON(t *testing.T, size int) []byte {
	t.Helper()
	var sb strings.Builder
	sb.WriteByte('"')
	chunk := `abc ✓ 日本 😀 \" \\ \n <&> `
	for sb.Len() < size-len(chunk)-1 {
		sb.WriteString(chunk)
	}
	sb.WriteByte('"')
	v := []byte(sb.String())
	require.True(t, json.Valid(v))
	return v
}

// ---- MySQL concurrency: the run lock, deadlocks and lock-wait timeouts

// TestRunLockContentionMySQL: many transactions take the same run's row lock
// and increment a counter kept in the run, with the store's default options.
// The final count proves they were serialised; no error may surface.
func TestRunLockContentionMySQL(t *testing.T) {
	t.Parallel()
	store := openStore(t, testdb.MySQL(t))
	ctx := t.Context()
	now := time.Now().UTC()
	require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: "wfr_hot", State: models.RunStarted, Result: []byte(`0`), CreatedAt: now, UpdatedAt: now}))

	const workers, rounds = 30, 10
	var (
		wg       sync.WaitGroup
		inside   atomic.Int64
		overlaps atomic.Int64
		errs     = make(chan error, workers*rounds)
	)
	for range workers {
		wg.Go(func() {
			for range rounds {
				errs <- store.InTx(ctx, func(tx storage.Executor) error {
					if _, err := tx.RunGet(ctx, "wfr_hot", true); err != nil {
						return err
					}
					// Holding the lock: nobody else may be here.
					if inside.Add(1) != 1 {
						overlaps.Add(1)
					}
					defer inside.Add(-1)
					return incrementLocked(ctx, tx, "wfr_hot")
				})
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Zero(t, overlaps.Load(), "two transactions held the run lock at once")
	require.Equal(t, workers*rounds, readCounter(t, store, "wfr_hot"))
}

func TestDeadlockStressMySQL(t *testing.T) {
	t.Parallel()
	databaseURL := testdb.MySQL(t)
	s, err := storage.Open(t.Context(), databaseURL, storage.Options{MaxTxAttempts: 100})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	store := s
	ctx := t.Context()
	now := time.Now().UTC()
	for _, id := range []string{"wfr_A", "wfr_B"} {
		require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, Result: []byte(`0`), CreatedAt: now, UpdatedAt: now}))
	}

	// Half the workers lock A then B, the other half B then A: deadlocks
	// happen, InnoDB rolls one transaction back, InTx runs it again. The
	// workload is deliberately worse than anything the engine does (it locks
	// one run per transaction), so the attempt bound is raised: the point
	// here is that re-run transactions lose no update and count none twice.
	const workers, rounds = 24, 8
	var (
		wg       sync.WaitGroup
		attempts atomic.Int64
		errs     = make(chan error, workers*rounds)
	)
	for i := range workers {
		order := []string{"wfr_A", "wfr_B"}
		if i%2 == 1 {
			order = []string{"wfr_B", "wfr_A"}
		}
		wg.Go(func() {
			for range rounds {
				errs <- store.InTx(ctx, func(tx storage.Executor) error {
					attempts.Add(1)
					for _, id := range order {
						if err := incrementLocked(ctx, tx, id); err != nil {
							return err
						}
					}
					return nil
				})
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, workers*rounds, readCounter(t, store, "wfr_A"))
	require.Equal(t, workers*rounds, readCounter(t, store, "wfr_B"))
	t.Logf("%d transactions took %d attempts", workers*rounds, attempts.Load())
}

// retryLog is an Observer that remembers what it heard.
type retryLog struct {
	mu     sync.Mutex
	causes map[string]int
}

func (r *retryLog) DBRetry(cause string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.causes == nil {
		r.causes = map[string]int{}
	}
	r.causes[cause]++
}

func (r *retryLog) count(cause string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.causes[cause]
}

// A statement that cannot reach the database is reported as a connection
// error, once.
func TestConnectionErrorsAreObserved(t *testing.T) {
	t.Parallel()
	retries := &retryLog{}
	store, err := storage.Open(t.Context(), testdb.SQLite(t), storage.Options{Observer: retries})
	require.NoError(t, err)
	require.NoError(t, store.Close())
	_, err = store.RunGet(t.Context(), "wfr_x", false)
	require.ErrorIs(t, err, storage.ErrUnavailable)
	err = store.InTx(t.Context(), func(tx storage.Executor) error { return nil })
	require.ErrorIs(t, err, storage.ErrUnavailable)
	require.Equal(t, 2, retries.count(storage.CauseConnection), "%v", retries.causes)
	require.Zero(t, retries.count(storage.CauseDeadlock))
}

func TestDeadlockIsRetriedMySQL(t *testing.T) {
	t.Parallel()
	retries := &retryLog{}
	store, err := storage.Open(t.Context(), testdb.MySQL(t), storage.Options{Observer: retries})
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	ctx := t.Context()
	now := time.Now().UTC()
	for _, id := range []string{"wfr_A", "wfr_B"} {
		require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, Result: []byte(`0`), CreatedAt: now, UpdatedAt: now}))
	}

	// Each first attempt locks its first run, waits until the other holds
	// its own, then reaches for the other's: a certain deadlock.
	var (
		bothHold sync.WaitGroup
		attempts atomic.Int64
		wg       sync.WaitGroup
		errs     [2]error
	)
	bothHold.Add(2)
	for i, order := range [][]string{{"wfr_A", "wfr_B"}, {"wfr_B", "wfr_A"}} {
		wg.Go(func() {
			first := true
			errs[i] = store.InTx(ctx, func(tx storage.Executor) error {
				attempts.Add(1)
				if err := incrementLocked(ctx, tx, order[0]); err != nil {
					return err
				}
				if first {
					first = false
					bothHold.Done()
					bothHold.Wait()
				}
				return incrementLocked(ctx, tx, order[1])
			})
		})
	}
	wg.Wait()
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	require.EqualValues(t, 3, attempts.Load(), "exactly one transaction was the deadlock victim and ran again")
	require.Equal(t, 1, retries.count(storage.CauseDeadlock), "the observer heard of the retry: %v", retries.causes)
	require.Equal(t, 2, readCounter(t, store, "wfr_A"))
	require.Equal(t, 2, readCounter(t, store, "wfr_B"))
}

func TestLockWaitTimeoutIsRetriedMySQL(t *testing.T) {
	t.Parallel()
	databaseURL := testdb.MySQL(t)
	// A one-second lock wait, so the test does not sit out the default 50s.
	retries := &retryLog{}
	store, err := storage.Open(t.Context(), databaseURL+"?innodb_lock_wait_timeout=1", storage.Options{Observer: retries})
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	ctx := t.Context()
	now := time.Now().UTC()
	require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: "wfr_held", State: models.RunStarted, Result: []byte(`0`), CreatedAt: now, UpdatedAt: now}))

	// Another connection holds the row lock until the store's transaction
	// has timed out once and started again.
	holder := rawDB(t, databaseURL)
	hold, err := holder.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer hold.Rollback()
	var id string
	require.NoError(t, hold.QueryRowContext(ctx, `SELECT id FROM runs WHERE id = 'wfr_held' FOR UPDATE`).Scan(&id))

	retried := make(chan struct{})
	var attempts atomic.Int64
	done := make(chan error, 1)
	go func() {
		done <- store.InTx(ctx, func(tx storage.Executor) error {
			if attempts.Add(1) == 2 {
				close(retried)
			}
			return incrementLocked(ctx, tx, "wfr_held")
		})
	}()

	select {
	case <-retried:
	case err := <-done:
		t.Fatalf("transaction finished before the lock was released: %v", err)
	}
	require.NoError(t, hold.Rollback())
	require.NoError(t, <-done)
	require.GreaterOrEqual(t, attempts.Load(), int64(2))
	require.EqualValues(t, attempts.Load()-1, retries.count(storage.CauseLockWait), "every retry was heard: %v", retries.causes)
	require.Equal(t, 1, readCounter(t, store, "wfr_held"))
}

func TestRetriesAreBoundedMySQL(t *testing.T) {
	t.Parallel()
	databaseURL := testdb.MySQL(t)
	s, err := storage.Open(t.Context(), databaseURL+"?innodb_lock_wait_timeout=1", storage.Options{MaxTxAttempts: 2})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	ctx := t.Context()
	now := time.Now().UTC()
	require.NoError(t, s.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: "wfr_held", State: models.RunStarted, Result: []byte(`0`), CreatedAt: now, UpdatedAt: now}))

	hold, err := rawDB(t, databaseURL).BeginTx(ctx, nil)
	require.NoError(t, err)
	defer hold.Rollback()
	_, err = hold.ExecContext(ctx, `SELECT id FROM runs WHERE id = 'wfr_held' FOR UPDATE`)
	require.NoError(t, err)

	var attempts atomic.Int64
	err = s.InTx(ctx, func(tx storage.Executor) error {
		attempts.Add(1)
		return incrementLocked(ctx, tx, "wfr_held")
	})
	require.ErrorIs(t, err, storage.ErrUnavailable)
	require.EqualValues(t, 2, attempts.Load())
}

// The statements that keep a replica's lease (reading the database's clock,
// renewing the lease) do not wait behind a full pool: with every connection
// of the pool held by a transaction, both still answer at once. Before, a
// flood of registrations held them back for seconds, and a renewal that
// waits past its bound for the whole lease lets other replicas take a live
// replica for dead.
func TestLeaseStatementsSkipAFullPoolMySQL(t *testing.T) {
	t.Parallel()
	store, err := storage.Open(t.Context(), testdb.MySQL(t), storage.Options{MaxOpenConns: 2})
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	release := make(chan struct{})
	var held, wg sync.WaitGroup
	for range 2 {
		held.Add(1)
		wg.Go(func() {
			assert.NoError(t, store.InTx(t.Context(), func(tx storage.Executor) error {
				if _, err := tx.RunGet(t.Context(), "wfr_none", false); !errors.Is(err, storage.ErrNotFound) {
					return err
				}
				held.Done() // this transaction holds one of the pool's two connections
				<-release
				return nil
			}))
		})
	}
	held.Wait()
	defer wg.Wait()
	defer close(release)

	// The pool is full: a statement on it waits out its deadline.
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	_, err = store.RunGet(ctx, "wfr_none", false)
	cancel()
	require.Error(t, err, "the pool should be full")
	require.NotErrorIs(t, err, storage.ErrNotFound)

	ctx, cancel = context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	now, err := store.DBNow(ctx)
	require.NoError(t, err, "the clock read waited for the full pool")
	require.WithinDuration(t, time.Now(), now, time.Minute)
	require.NoError(t, store.ReplicaRenew(ctx, "rep_full_pool", now.Add(time.Minute)), "the renewal waited for the full pool")
}

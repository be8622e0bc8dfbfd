package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/engine"
	"rendezvous/hub"
	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/storage"
)

// gatedStore holds every group of targeted notifies at its locking read
// until open is closed, so that notifies queue up behind them, and can make
// groups of several fail at their last statement.
type gatedStore struct {
	storage.Store
	open    chan struct{}
	held    atomic.Int64 // groups waiting at the gate
	sizes   chan int     // the size of every group
	failErr error        // returned by the last statement of groups of several
	failed  atomic.Int64
}

func (s *gatedStore) InTx(ctx context.Context, fn func(tx storage.Executor) error) error {
	return s.Store.InTx(ctx, func(tx storage.Executor) error { return fn(&gatedTx{Executor: tx, s: s}) })
}

type gatedTx struct {
	storage.Executor
	s *gatedStore
}

func (t *gatedTx) RunLockListWaitingMany(ctx context.Context, ps []storage.RunLockListWaitingParams) ([]storage.RunLockListed, error) {
	t.s.sizes <- len(ps)
	t.s.held.Add(1)
	<-t.s.open
	t.s.held.Add(-1)
	return t.Executor.RunLockListWaitingMany(ctx, ps)
}

func (t *gatedTx) LookbackEventInsertManyCommit(ctx context.Context, evs []*models.LookbackEvent) error {
	if t.s.failErr != nil && len(evs) > 1 && t.s.failed.Add(1) == 1 {
		return t.s.failErr
	}
	return t.Executor.LookbackEventInsertManyCommit(ctx, evs)
}

// groupCase is one notify of TestNotifyGroup and what it must get.
type groupCase struct {
	run  string
	want string // "lookback", "resolved", or an error code
}

// Concurrent targeted notifies are committed in groups, and each gets the
// answer it would get alone: lookback events stored once each, a waiting
// waiter resolved by exactly one notify, refusals for missing and ended
// runs, several notifies of one run one after the other. A group that
// fails before COMMIT answers nobody with its failure: its notifies run
// again alone; one whose COMMIT is unknown says so to the notifies that
// wrote.
func TestNotifyGroup(t *testing.T) {
	for _, mode := range []string{"commits", "fails", "unknown"} {
		t.Run(mode, func(t *testing.T) {
			testdb.Dialects(t, func(t *testing.T, db string) { testNotifyGroup(t, db, mode) })
		})
	}
}

func testNotifyGroup(t *testing.T, db, mode string) {
	ctx := context.Background()
	store, err := storage.Open(ctx, db, storage.Options{})
	require.NoError(t, err)
	defer store.Close()
	gated := &gatedStore{Store: store, open: make(chan struct{}), sizes: make(chan int, 1000)}
	switch mode {
	case "fails":
		gated.failErr = errors.New("injected statement failure")
	case "unknown":
		gated.failErr = fmt.Errorf("%w: injected", storage.ErrCommitUnknown)
	}
	e := engine.New(gated, hub.New(), nil, engine.Config{})
	defer e.Stop()
	require.NoError(t, e.SyncClock(ctx))

	trigger := func(id string) {
		_, err := e.Trigger(ctx, engine.TriggerParams{RunID: &id})
		require.NoError(t, err)
	}
	var cases []groupCase
	for i := range 20 {
		id := fmt.Sprintf("wfr_quiet%d", i)
		trigger(id)
		cases = append(cases, groupCase{run: id, want: "lookback"})
	}
	trigger("wfr_busy") // three notifies: each stores its own event
	for range 3 {
		cases = append(cases, groupCase{run: "wfr_busy", want: "lookback"})
	}
	trigger("wfr_ended")
	_, err = e.Cancel(ctx, "wfr_ended")
	require.NoError(t, err)
	cases = append(cases, groupCase{run: "wfr_ended", want: string(engine.CodeRunNotActive)},
		groupCase{run: "wfr_missing", want: string(engine.CodeNotFound)})
	// A run with a subscriber: one of two notifies resolves it, the other
	// stores a lookback event.
	trigger("wfr_waiting")
	wctx, cancel := context.WithCancel(ctx)
	w, err := e.Wait(wctx, engine.WaitParams{EventID: "ev", RunID: ptr("wfr_waiting")})
	require.NoError(t, err)
	type outcome struct {
		r   *models.WaitResult
		err error
	}
	delivered := make(chan outcome, 1)
	w.Watch(wctx, func(r *models.WaitResult, err error) { delivered <- outcome{r, err} })
	waitDone := false
	defer func() {
		// The wait ends (by the notify, or now by its context) before the
		// store closes.
		cancel()
		if !waitDone {
			<-delivered
		}
	}()
	cases = append(cases, groupCase{run: "wfr_waiting", want: "resolved-or-lookback"}, groupCase{run: "wfr_waiting", want: "resolved-or-lookback"})

	// The first notify's group waits at the gate, and one more group
	// beside it; the rest queue up behind them.
	type answer struct {
		res *models.NotifyResult
		err error
	}
	answers := make([]answer, len(cases))
	var wg sync.WaitGroup
	notify := func(i int) {
		defer wg.Done()
		run := cases[i].run
		answers[i].res, answers[i].err = e.Notify(ctx, engine.NotifyParams{EventID: "ev", EventData: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i)), RunID: &run})
	}
	wg.Add(1)
	go notify(0)
	require.Eventually(t, func() bool { return gated.held.Load() == 1 }, 10*time.Second, time.Millisecond)
	for i := 1; i < len(cases); i++ {
		wg.Add(1)
		go notify(i)
	}
	// A second group took its one notify too (on SQLite it waits for the
	// one connection, which the first holds).
	require.Eventually(t, func() bool { return e.QueuedNotifies() == len(cases)-2 }, 10*time.Second, time.Millisecond)
	close(gated.open)
	wg.Wait()

	grouped := 0
	close(gated.sizes)
	for n := range gated.sizes {
		grouped = max(grouped, n)
	}
	require.Greater(t, grouped, 1, "notifies were committed in groups")

	var resolved, stored int
	for i, c := range cases {
		a := answers[i]
		if mode == "unknown" && a.res == nil {
			var ee *engine.Error
			if errors.As(a.err, &ee) && ee.Code == engine.CodeOutcomeUnknown {
				continue // it wrote in the group whose COMMIT failed: fine
			}
		}
		switch c.want {
		case "lookback", "resolved-or-lookback":
			require.NoError(t, a.err, "notify %d of %s", i, c.run)
			if a.res.Lookback != nil {
				require.Empty(t, a.res.NotifyResponse)
				require.Equal(t, c.run, a.res.Lookback.WorkflowRunID)
				require.NotEmpty(t, a.res.Lookback.ID)
				stored++
				break
			}
			require.Equal(t, "resolved-or-lookback", c.want, "notify %d of %s resolved a waiter", i, c.run)
			require.Len(t, a.res.NotifyResponse, 1)
			resolved++
		default:
			var ee *engine.Error
			require.ErrorAs(t, a.err, &ee, "notify %d of %s", i, c.run)
			require.Equal(t, c.want, string(ee.Code), "notify %d of %s", i, c.run)
		}
	}
	if mode == "unknown" {
		return // what landed is unknown; the rest was checked
	}
	require.Equal(t, 1, resolved, "the waiting waiter was resolved once")
	select {
	case o := <-delivered:
		waitDone = true
		require.NoError(t, o.err)
		require.Equal(t, "ev", o.r.EventID)
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting subscriber got nothing")
	}
	// Every lookback event answered is stored once, and no other.
	total := 0
	for _, run := range []string{"wfr_busy", "wfr_waiting"} {
		evs, err := store.LookbackEventListByRun(ctx, run, time.Now().Add(-time.Hour))
		require.NoError(t, err)
		total += len(evs)
	}
	for i := range 20 {
		evs, err := store.LookbackEventListByRun(ctx, fmt.Sprintf("wfr_quiet%d", i), time.Now().Add(-time.Hour))
		require.NoError(t, err)
		require.Len(t, evs, 1)
		total++
	}
	require.Equal(t, stored, total)
	if mode == "fails" {
		// The first group to store several lookback events failed; others
		// may form after it (two groups are allowed in flight) and counted
		// here too without failing.
		require.GreaterOrEqual(t, gated.failed.Load(), int64(1), "the injected failure happened")
	}
}

func ptr[T any](v T) *T { return &v }

package storage_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/storage"
)

// Claimers racing on one table never claim one outbox row twice, nor hand
// one run to two workers, on either dialect (SKIP LOCKED and the compare
// and set on MySQL, the compare and set alone on SQLite).
func TestConcurrentClaimsAreExclusive(t *testing.T) {
	t.Parallel()
	testdb.Dialects(t, func(t *testing.T, databaseURL string) {
		s := openStore(t, databaseURL)
		ctx := context.Background()
		now := time.Now().UTC()
		const n, claimers = 120, 4
		label := "jobs"
		for i := range n {
			id := fmt.Sprintf("wfr_claim-%d", i)
			require.NoError(t, s.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: id, State: models.RunStarted, Label: &label, CreatedAt: now, UpdatedAt: now, StartPending: true}))
			require.NoError(t, s.OutboxInsert(ctx, &storage.OutboxRecord{ID: fmt.Sprintf("dlv_%d", i), RunID: &id, Kind: storage.OutboxKindDispatch,
				URL: "http://127.0.0.1/x", Body: []byte(`{}`), State: models.DispatchPending, MaxAttempts: 4, NextAttemptAt: now, CreatedAt: now}))
		}
		var (
			mu         sync.Mutex
			deliveries = map[string]int{}
			runs       = map[string]int{}
			wg         sync.WaitGroup
		)
		for c := range claimers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for idle := 0; idle < 3; {
					var got []*storage.OutboxRecord
					var handed []*models.WorkflowRun
					err := s.InTx(ctx, func(tx storage.Executor) error {
						var err error
						got, err = tx.OutboxClaim(ctx, &storage.OutboxClaimParams{Now: now.Add(time.Second), LeaseUntil: now.Add(time.Hour), Claim: fmt.Sprintf("c%d-%d", c, idle), Limit: 7})
						return err
					})
					if err != nil {
						t.Errorf("claim deliveries: %v", err)
						return
					}
					err = s.InTx(ctx, func(tx storage.Executor) error {
						var err error
						handed, err = tx.RunClaim(ctx, &storage.RunClaimParams{Label: &label, Worker: fmt.Sprintf("w%d", c), Now: now.Add(time.Second), LeaseUntil: now.Add(time.Hour), Limit: 5})
						return err
					})
					if err != nil {
						t.Errorf("claim runs: %v", err)
						return
					}
					if len(got) == 0 && len(handed) == 0 {
						idle++
					}
					mu.Lock()
					for _, r := range got {
						deliveries[r.ID]++
						if r.Attempts != 1 {
							t.Errorf("%s claimed with attempts %d", r.ID, r.Attempts)
						}
					}
					for _, r := range handed {
						runs[r.WorkflowRunID]++
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		require.Len(t, deliveries, n)
		require.Len(t, runs, n)
		for id, k := range deliveries {
			require.Equal(t, 1, k, id)
		}
		for id, k := range runs {
			require.Equal(t, 1, k, id)
		}
		// Once a claim's lease has passed the row is due again, with its
		// attempt counted; a stale claim can no longer record a result.
		var again []*storage.OutboxRecord
		require.NoError(t, s.InTx(ctx, func(tx storage.Executor) error {
			var err error
			again, err = tx.OutboxClaim(ctx, &storage.OutboxClaimParams{Now: now.Add(2 * time.Hour), LeaseUntil: now.Add(3 * time.Hour), Claim: "late", Limit: 1})
			return err
		}))
		require.Len(t, again, 1)
		require.Equal(t, 2, again[0].Attempts)
		ok, err := s.OutboxRecordAttempt(ctx, &storage.OutboxAttemptParams{ID: again[0].ID, Claim: "c0-0", State: models.DispatchDelivered, Now: now, NextAttemptAt: now})
		require.NoError(t, err)
		require.False(t, ok, "a claim that is no longer the row's records nothing")
		ok, err = s.OutboxRecordAttempt(ctx, &storage.OutboxAttemptParams{ID: again[0].ID, Claim: "late", State: models.DispatchDelivered, Now: now, NextAttemptAt: now})
		require.NoError(t, err)
		require.True(t, ok)
	})
}

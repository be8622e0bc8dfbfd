package engine_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/engine"
	"rendezvous/hub"
	"rendezvous/internal/testdb"
	"rendezvous/storage"
)

// hangingCatchUpStore hangs every catch-up read until its context ends (a
// database too busy to answer it) and counts lease renewals.
type hangingCatchUpStore struct {
	storage.Store
	hung, renewals atomic.Int64
}

func (s *hangingCatchUpStore) WaiterListNotWaiting(ctx context.Context, _ []string) ([]string, error) {
	s.hung.Add(1)
	<-ctx.Done()
	return nil, ctx.Err()
}

func (s *hangingCatchUpStore) ReplicaRenew(ctx context.Context, replicaID string, until time.Time) error {
	s.renewals.Add(1)
	return s.Store.ReplicaRenew(ctx, replicaID, until)
}

// A catch-up tick that hangs until its bound (5 s) must not hold up the
// lease, renewed every quarter TTL: a replica that is alive but whose
// database is slow to answer one kind of query must not let its lease lapse
// (another replica would then reap its waiters). Before, the lease shared
// one loop with the catch-up, the sweep and the gauges.
func TestLeaseRenewedWhileCatchUpHangs(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		ctx := context.Background()
		store, err := storage.Open(ctx, db, storage.Options{})
		require.NoError(t, err)
		defer store.Close()
		s := &hangingCatchUpStore{Store: store}
		h := hub.New()
		l := h.Listen("wtr_busy", func(hub.Wake) {}) // something for the catch-up to check
		defer h.Unlisten(l)
		e := engine.New(s, h, nil, engine.Config{LeaseTTL: 2 * time.Second, CatchUpInterval: 50 * time.Millisecond})
		require.NoError(t, e.SyncClock(ctx))
		e.Start(ctx)
		defer e.Stop()
		deadline := time.Now().Add(10 * time.Second)
		for s.hung.Load() == 0 {
			require.True(t, time.Now().Before(deadline), "the catch-up never ran")
			time.Sleep(10 * time.Millisecond) // polling interval of the condition
		}
		from := s.renewals.Load()
		deadline = time.Now().Add(3 * time.Second) // renewals every 500 ms: about six
		for s.renewals.Load() < from+3 {
			require.True(t, time.Now().Before(deadline), "lease renewed %d times in 3 s while the catch-up hung, want at least 3", s.renewals.Load()-from)
			time.Sleep(10 * time.Millisecond) // polling interval of the condition
		}
	})
}

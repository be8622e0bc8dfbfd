package engine_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"rendezvous/engine"
	"rendezvous/hub"
	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/storage"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// countingStore counts the reads of waiters a replica makes.
type countingStore struct {
	storage.Store
	gets, getMany atomic.Int64
	ids           atomic.Int64 // waiter ids asked for by WaiterGetMany
}

func (s *countingStore) WaiterGet(ctx context.Context, id string) (*models.Waiter, error) {
	s.gets.Add(1)
	return s.Store.WaiterGet(ctx, id)
}

func (s *countingStore) WaiterGetMany(ctx context.Context, ids []string) (map[string]*models.Waiter, error) {
	s.getMany.Add(1)
	s.ids.Add(int64(len(ids)))
	return s.Store.WaiterGetMany(ctx, ids)
}

// hubBus is the bus between two in-process replicas: what Redis does, a
// "look in the database" wake on the other replica's hub per waiter id.
type hubBus struct{ to *hub.Hub }

func (b hubBus) Publish(_ context.Context, ids []string) error {
	for _, id := range ids {
		b.to.Publish(id, hub.Wake{})
	}
	return nil
}

// A broadcast that ends many waiters on one replica wakes their
// subscriptions on another replica, which must read them in a few batched
// reads, not one point read per waiter.
func TestRemoteWakeReadsInBatches(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		ctx := context.Background()
		store, err := storage.Open(ctx, db, storage.Options{})
		require.NoError(t, err)
		defer store.Close()
		counted := &countingStore{Store: store}
		hubB := hub.New()
		cfg := engine.Config{CatchUpInterval: time.Hour} // the bus alone wakes them
		a := engine.New(store, hub.New(), hubBus{to: hubB}, cfg)
		b := engine.New(counted, hubB, nil, cfg)
		require.NoError(t, a.SyncClock(ctx))
		require.NoError(t, b.SyncClock(ctx))

		const n = 1000
		ev := fmt.Sprintf("batch-%d", time.Now().UnixNano())
		var (
			wg  sync.WaitGroup
			mu  sync.Mutex
			got = map[string]int{}
		)
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		wg.Add(n)
		var registered sync.WaitGroup
		regErrs := make(chan error, n)
		for g := range 4 {
			registered.Add(1)
			go func() {
				defer registered.Done()
				for i := g; i < n; i += 4 {
					w, err := b.Wait(wctx, engine.WaitParams{EventID: ev})
					if err != nil {
						regErrs <- err
						wg.Done()
						continue
					}
					w.Watch(wctx, func(r *models.WaitResult, err error) {
						defer wg.Done()
						mu.Lock()
						defer mu.Unlock()
						if err != nil {
							got["error: "+err.Error()]++
							return
						}
						got[string(r.EventData)+" "+*r.MessageID]++
					})
				}
			}()
		}
		registered.Wait()
		close(regErrs)
		for err := range regErrs {
			require.NoError(t, err)
		}
		res, err := a.Notify(ctx, engine.NotifyParams{EventID: ev, EventData: json.RawMessage(`{"all":true}`)})
		require.NoError(t, err)
		require.Len(t, res.NotifyResponse, n)
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatalf("not every wait was delivered: %v", got)
		}
		require.Equal(t, map[string]int{`{"all":true} ` + res.NotifyResponse[0].MessageID: n}, got)
		t.Logf("%d waits woken from another replica: %d point reads, %d batched reads of %d ids", n, counted.gets.Load(), counted.getMany.Load(), counted.ids.Load())
		require.Zero(t, counted.gets.Load(), "no point read per waiter")
		// On MariaDB a read takes longer than waking the rest, so nearly all
		// go in one; SQLite in this process reads faster, in smaller batches.
		require.LessOrEqual(t, counted.getMany.Load(), int64(n/10), "a few batched reads")
		a.Stop()
		b.Stop()
	})
}

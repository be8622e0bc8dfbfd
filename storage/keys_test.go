package storage_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/storage"
)

// Replicas starting at once each offer a key of their own: one is stored,
// and every one of them, and a restart, reads that one back.
func TestServiceKeyGetOrCreate(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		now := time.Now().UTC()
		stores := []storage.Store{openStore(t, db), openStore(t, db), openStore(t, db)}
		const n = 12
		got := make([]string, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s := stores[i%len(stores)]
				errs[i] = s.InTx(t.Context(), func(tx storage.Executor) error {
					var err error
					got[i], err = tx.ServiceKeyGetOrCreate(t.Context(), "hook", fmt.Sprintf("candidate-%02d", i), now)
					return err
				})
			}()
		}
		wg.Wait()
		for i := range n {
			require.NoError(t, errs[i])
			require.Equal(t, got[0], got[i], "every replica reads the same key")
		}
		require.Regexp(t, `^candidate-\d\d$`, got[0])
		again, err := openStore(t, db).ServiceKeyGetOrCreate(t.Context(), "hook", "late", now)
		require.NoError(t, err)
		require.Equal(t, got[0], again, "kept across restarts")
		other, err := stores[0].ServiceKeyGetOrCreate(t.Context(), "other", "x", now)
		require.NoError(t, err)
		require.Equal(t, "x", other, "keys are per name")
	})
}

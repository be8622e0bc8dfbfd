package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
)

// Two services on one SQLite file (what two processes on one machine
// sharing DATABASE_URL=sqlite://… do: each its own connection, WAL, busy
// timeout): rule 5 holds between them, the wait on one and the targeted
// notify on the other, each event delivered exactly once. README
// ("SQLite") rests on this.
func TestSQLiteSharedFileRace(t *testing.T) {
	t.Parallel()
	db := "sqlite://" + filepath.Join(t.TempDir(), "shared.db")
	a := newEnv(t, db)
	b := newEnv(t, db)
	conns := []*gqlclient.Conn{a.dial(gqlclient.TransportWS), a.dial(gqlclient.LegacyWS)}
	const races = 200
	var (
		wg                         sync.WaitGroup
		mu                         sync.Mutex
		resolved, lookback, failed int
	)
	sem := make(chan struct{}, 16)
	for i := range races {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ev := uid("race")
			run := a.trigger()
			data := fmt.Sprintf("race-%d", i)
			var sub *gqlclient.Sub
			var subErr error
			var r *gqlclient.Response
			var notifyErr error
			together(
				func() {
					sub, subErr = conns[i%2].Subscribe(context.Background(), waitSubscription, waitVars(ev, waitOpts{run: run}))
				},
				func() {
					r, notifyErr = gqlclient.Post(context.Background(), b.endpoint, notifyMutation, map[string]any{"ev": ev, "data": data, "run": run})
				},
			)
			require.NoError(t, subErr)
			require.NoError(t, notifyErr)
			if len(r.Errors) > 0 {
				mu.Lock()
				failed++
				mu.Unlock()
				t.Errorf("race %d: notify failed: %+v", i, r.Errors)
				return
			}
			var out struct{ Notify notifyView }
			require.NoError(t, r.Decode(&out))
			n := out.Notify
			res := mustResult(t, sub)
			require.Equal(t, fmt.Sprintf("%q", data), string(res.EventData))
			switch {
			case len(n.NotifyResponse) == 1 && n.Lookback == nil:
				mu.Lock()
				resolved++
				mu.Unlock()
			case len(n.NotifyResponse) == 0 && n.Lookback != nil:
				require.Equal(t, n.Lookback.MessageID, *res.MessageID)
				mu.Lock()
				lookback++
				mu.Unlock()
			default:
				t.Errorf("race %d: notify resolved %d waiters and stored lookback %v", i, len(n.NotifyResponse), n.Lookback != nil)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d races between two services on one SQLite file: %d resolved a waiter, %d went through lookback, %d failed", races, resolved, lookback, failed)
	require.Equal(t, races, resolved+lookback)
}

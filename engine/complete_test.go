package engine_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/engine"
	"rendezvous/hub"
	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/storage"
)

// unknownCommitStore answers every transaction with ErrCommitUnknown (the
// connection failed during COMMIT): after committing it (land), or after
// rolling it back and then running meanwhile.
type unknownCommitStore struct {
	storage.Store
	land      bool
	meanwhile func()
}

func (s *unknownCommitStore) InTx(ctx context.Context, fn func(tx storage.Executor) error) error {
	if s.land {
		if err := s.Store.InTx(ctx, fn); err != nil {
			return err
		}
	} else {
		rollback := errors.New("rolled back")
		err := s.Store.InTx(ctx, func(tx storage.Executor) error {
			if err := fn(tx); err != nil {
				return err
			}
			return rollback
		})
		if !errors.Is(err, rollback) {
			return err
		}
		if s.meanwhile != nil {
			s.meanwhile()
		}
	}
	return fmt.Errorf("commit: connection reset by peer: %w", storage.ErrCommitUnknown)
}

// A completion whose COMMIT outcome is unknown reads its waiter back: its
// own message on the waiter is a win (and wakes the subscribers), another
// message is a replay's answer, and a waiter still waiting leaves the
// outcome unknown (the commit may still land).
func TestCompleteCommitUnknownReadsBack(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		ctx := context.Background()
		store, err := storage.Open(ctx, db, storage.Options{})
		require.NoError(t, err)
		defer store.Close()
		now := time.Now().UTC()
		waiter := func(run string) *models.Waiter {
			require.NoError(t, store.RunInsert(ctx, &models.WorkflowRun{WorkflowRunID: run, State: models.RunStarted, Result: []byte(`0`), CreatedAt: now, UpdatedAt: now}))
			step := "pay"
			w := &models.Waiter{EventID: "paid", WorkflowRunID: &run, StepName: &step, State: models.WaiterWaiting, Deadline: now.Add(time.Hour), CreatedAt: now}
			require.NoError(t, store.WaiterInsert(ctx, w))
			return w
		}
		complete := func(s *unknownCommitStore, h *hub.Hub, w *models.Waiter) (*engine.CompleteResult, error) {
			s.Store = store
			e := engine.New(s, h, nil, engine.Config{})
			return e.Complete(ctx, engine.CompleteParams{
				WaiterID: w.ID, Expires: now.Add(time.Hour), EventData: []byte(`{"ok":true}`),
				Owns: func(*models.Waiter) bool { return true },
			})
		}

		t.Run("landed", func(t *testing.T) {
			w := waiter("wfr_cu_landed")
			h := hub.New()
			woken := make(chan hub.Wake, 1)
			l := h.Listen(w.ID, func(wk hub.Wake) { woken <- wk })
			defer h.Unlisten(l)
			res, err := complete(&unknownCommitStore{land: true}, h, w)
			require.NoError(t, err)
			require.True(t, res.Won, "the commit landed: the win is this call's")
			require.Equal(t, models.WaiterNotified, res.Waiter.State)
			require.NotNil(t, res.Waiter.MessageID)
			select {
			case <-woken:
			case <-time.After(5 * time.Second):
				t.Fatal("the waiter's subscribers were not woken")
			}
		})

		t.Run("ended another way", func(t *testing.T) {
			w := waiter("wfr_cu_other")
			s := &unknownCommitStore{meanwhile: func() {
				require.NoError(t, store.InTx(ctx, func(tx storage.Executor) error {
					other := "msg_other"
					_, err := tx.WaiterEnd(ctx, &storage.WaiterEndParams{WaiterIDs: []string{w.ID}, State: models.WaiterNotified,
						EndedAt: time.Now().UTC(), MessageID: &other, EventID: "paid", EventData: []byte(`1`)})
					return err
				}))
			}}
			res, err := complete(s, hub.New(), w)
			require.NoError(t, err)
			require.False(t, res.Won, "another message ended it: this call's commit did not land")
			require.Equal(t, "msg_other", *res.Waiter.MessageID)
		})

		t.Run("still waiting", func(t *testing.T) {
			w := waiter("wfr_cu_waiting")
			_, err := complete(&unknownCommitStore{}, hub.New(), w)
			require.Equal(t, engine.CodeOutcomeUnknown, engine.ErrorCode(err), "%v", err)
		})
	})
}

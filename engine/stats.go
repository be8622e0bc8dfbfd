package engine

import (
	"context"

	"rendezvous/models"
)

// Stats counts runs and waiters by state and the pending lookback events, and
// finds the nearest deadline of a waiting waiter. Deadlines are applied: a
// waiter WAITING past its deadline counts as timed out. The counts are read
// one after the other, not as one snapshot.
func (e *Engine) Stats(ctx context.Context) (*models.Stats, error) {
	now := e.now()
	runs, err := e.store.RunCountByState(ctx)
	if err != nil {
		return nil, storageErr("count runs", err)
	}
	waiters, err := e.store.WaiterCountByState(ctx, now)
	if err != nil {
		return nil, storageErr("count waiters", err)
	}
	pending, err := e.store.LookbackEventCountPending(ctx, now)
	if err != nil {
		return nil, storageErr("count lookback events", err)
	}
	oldest, err := e.store.WaiterOldestDeadline(ctx, now)
	if err != nil {
		return nil, storageErr("find the oldest deadline", err)
	}
	outbox, err := e.store.OutboxCountByState(ctx)
	if err != nil {
		return nil, storageErr("count deliveries", err)
	}
	return &models.Stats{
		Runs: &models.RunStats{
			Started:  int(runs[models.RunStarted]),
			Success:  int(runs[models.RunSuccess]),
			Failed:   int(runs[models.RunFailed]),
			Canceled: int(runs[models.RunCanceled]),
		},
		Waiters: &models.WaiterStats{
			Waiting:  int(waiters[models.WaiterWaiting]),
			Notified: int(waiters[models.WaiterNotified]),
			TimedOut: int(waiters[models.WaiterTimedOut]),
			Canceled: int(waiters[models.WaiterCanceled]),
		},
		PendingLookbackEvents: int(pending),
		OldestWaitingDeadline: oldest,
		Outbox: &models.OutboxStats{
			Pending:   int(outbox[models.DispatchPending]),
			Delivered: int(outbox[models.DispatchDelivered]),
			Failed:    int(outbox[models.DispatchFailed]),
			Canceled:  int(outbox[models.DispatchCanceled]),
		},
	}, nil
}

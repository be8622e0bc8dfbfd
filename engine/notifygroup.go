package engine

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"rendezvous/hub"
	"rendezvous/models"
	"rendezvous/storage"
)

// Group commit of targeted notifies.
//
// Targeted notifies without a step that arrive while others are being
// committed are committed together, in one transaction: one statement
// locks every run of the group and lists its waiters, each notify then
// resolves its run's waiters (or is refused, its run not started) as it
// would alone, and one INSERT stores the lookback events of those that
// found no waiter, sent with COMMIT. A group of n costs the database about
// what one notify costs, instead of n times as much.
//
// Why it keeps the rules:
//   - Each notify holds its run's lock, read its waiters after the lock was
//     granted and wrote under it, exactly as alone (rule 5); a run appears
//     once in a group, so two notifies of one run still run one after the
//     other, in the order they came.
//   - A notify is answered only after the group's COMMIT returned: its
//     answer is the commit of its own writes (rule 2 and the wake-ups
//     follow the commit, as alone).
//   - A group that fails without committing (a statement error, a deadlock
//     retried too often, the database away) answers nobody with its error:
//     each of its notifies runs again on its own, in its own transaction,
//     and gets its own answer. Only a COMMIT whose outcome is unknown is
//     answered as such, to the notifies that wrote something, as alone.
//   - Locks: a group locks its runs in index order in one statement, so
//     two groups cannot deadlock each other; against other transactions a
//     deadlock reruns the whole group (InTx), as for one notify.
//
// There is no goroutine of its own: the first notify that finds fewer than
// maxNotifyLeaders groups in flight leads one (takes what is queued, commits
// it), and keeps leading until its own notify has been taken; then it hands
// the lead to a notify still queued, if any. A notify that comes alone is a
// group of one: the same statements as without grouping.

const (
	// maxNotifyLeaders bounds the groups in flight at once: while they
	// commit, new notifies queue up and form the next groups.
	maxNotifyLeaders = 2
	// maxNotifyGroup bounds a group.
	maxNotifyGroup = 64
	// notifyGroupTimeout bounds a group's wait for a connection; its
	// statements are bounded by the store.
	notifyGroupTimeout = time.Minute
)

type notifyGroups struct {
	mu      sync.Mutex
	queue   []*groupedNotify
	leaders int
}

// groupedNotify is one targeted notify waiting for, or in, a group.
type groupedNotify struct {
	ctx                       context.Context
	runID, eventID, messageID string
	data                      json.RawMessage
	// signal is sent to (never blocking) when lead or answered is set.
	signal chan struct{}

	// Under notifyGroups.mu.
	lead     bool // asked to lead
	leading  bool
	taken    bool // in a group (or answered before one)
	answered bool

	// Set before answered, by the group's leader.
	result *models.NotifyResult
	err    error
	wakes  map[string]hub.Wake
	// alone: the group failed without committing; run it on its own.
	alone bool
}

func (n *groupedNotify) wake() {
	select {
	case n.signal <- struct{}{}:
	default:
	}
}

// notifyGrouped runs a targeted notify (no step) in a group. alone means
// it was not settled there (its group failed and nothing was committed):
// the caller runs it on its own.
func (e *Engine) notifyGrouped(ctx context.Context, runID, eventID string, data json.RawMessage, messageID string) (res *models.NotifyResult, wakes map[string]hub.Wake, alone bool, err error) {
	g := &e.groups
	n := &groupedNotify{ctx: ctx, runID: runID, eventID: eventID, data: data, messageID: messageID, signal: make(chan struct{}, 1)}
	g.mu.Lock()
	g.queue = append(g.queue, n)
	if g.leaders < maxNotifyLeaders {
		g.leaders++
		n.lead = true
	}
	g.mu.Unlock()
	for {
		g.mu.Lock()
		lead, answered := n.lead, n.answered
		n.lead = false
		n.leading = lead
		g.mu.Unlock()
		if lead {
			e.leadNotifyGroups(ctx, n)
			continue
		}
		if answered {
			return n.result, n.wakes, n.alone, n.err
		}
		<-n.signal
	}
}

// leadNotifyGroups commits groups until n has been taken into one, then
// hands the lead on.
func (e *Engine) leadNotifyGroups(ctx context.Context, n *groupedNotify) {
	g := &e.groups
	for {
		g.mu.Lock()
		if n.taken {
			n.leading = false
			var next *groupedNotify
			for _, q := range g.queue {
				if !q.leading && !q.lead {
					next = q
					break
				}
			}
			if next != nil {
				next.lead = true
				next.wake()
			} else {
				// Nobody left to ask, or only notifies leading already.
				g.leaders--
			}
			g.mu.Unlock()
			return
		}
		group := g.take()
		g.mu.Unlock()
		if len(group) > 0 {
			e.commitNotifyGroup(ctx, group)
		}
	}
}

// take removes the next group from the queue: up to maxNotifyGroup
// notifies, oldest first, one per run (a later one of the same run waits
// for the next group). A notify whose caller has gone is answered with its
// context's error. Call with g.mu held.
func (g *notifyGroups) take() []*groupedNotify {
	var (
		group []*groupedNotify
		runs  = map[string]bool{}
		rest  = g.queue[:0]
	)
	for _, n := range g.queue {
		switch {
		case n.ctx.Err() != nil:
			n.taken, n.answered, n.err = true, true, n.ctx.Err()
			n.wake()
		case len(group) < maxNotifyGroup && !runs[n.runID]:
			runs[n.runID] = true
			n.taken = true
			group = append(group, n)
		default:
			rest = append(rest, n)
		}
	}
	clear(g.queue[len(rest):])
	g.queue = rest
	return group
}

// commitNotifyGroup runs the group's transaction and answers its notifies.
func (e *Engine) commitNotifyGroup(ctx context.Context, group []*groupedNotify) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), notifyGroupTimeout)
	defer cancel()
	ps := make([]storage.RunLockListWaitingParams, len(group))
	lapsed := make([][]string, len(group))
	var stored []*models.LookbackEvent
	err := e.store.InTx(ctx, func(tx storage.Executor) error {
		now := e.now()
		stored = stored[:0]
		for i, n := range group {
			lapsed[i] = nil
			ps[i] = storage.RunLockListWaitingParams{RunID: n.runID, EventID: n.eventID, Self: e.replicaID, Now: now, Lapsed: &lapsed[i]}
			n.result, n.err, n.wakes = nil, nil, nil
		}
		listed, err := tx.RunLockListWaitingMany(ctx, ps)
		if err != nil {
			return err
		}
		for i, n := range group {
			switch l := listed[i]; {
			case l.State == "":
				n.err = errorf(CodeNotFound, "workflow run %s not found", n.runID)
			case l.State != models.RunStarted:
				n.err = errorf(CodeRunNotActive, "workflow run %s is %s", n.runID, l.State)
			case len(l.Waiting) == 0 && len(lapsed[i]) == 0:
				ev := &models.LookbackEvent{
					WorkflowRunID: n.runID, EventID: n.eventID, EventData: n.data, MessageID: n.messageID,
					CreatedAt: now, ExpiresAt: now.Add(e.cfg.LookbackRetention),
				}
				stored = append(stored, ev)
				n.result = &models.NotifyResult{EventID: n.eventID, EventData: n.data, NotifyResponse: []*models.NotifyResponse{}, Lookback: ev}
			default:
				// As Notify does alone: waiters of a lapsed lease go (see
				// there), the others are resolved.
				if len(lapsed[i]) > 0 {
					if _, err := tx.WaiterDeleteWaiting(ctx, lapsed[i]); err != nil {
						return err
					}
				}
				n.wakes = map[string]hub.Wake{}
				if n.result, err = e.resolve(ctx, tx, n.eventID, n.data, n.runID, l.Waiting, false, n.messageID, now, n.wakes); err != nil {
					return err
				}
			}
		}
		// The transaction's last statement: it may take COMMIT along.
		return tx.LookbackEventInsertManyCommit(ctx, stored)
	})
	g := &e.groups
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, n := range group {
		switch {
		case err == nil:
			// Committed: each answer as decided under the lock.
		case errors.Is(err, storage.ErrCommitUnknown) && n.result != nil:
			// It wrote: whether that landed is unknown, as it would be alone.
			n.result, n.wakes, n.err = nil, nil, err
		case errors.Is(err, storage.ErrCommitUnknown) && n.err != nil:
			// Refused under the lock, it wrote nothing: the refusal stands.
		default:
			// Nothing committed: the notify runs again on its own.
			n.result, n.wakes, n.err, n.alone = nil, nil, nil, true
		}
		n.answered = true
		n.wake()
	}
}

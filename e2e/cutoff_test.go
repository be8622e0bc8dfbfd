package e2e

import (
	"errors"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/gqlclient"
	"rendezvous/internal/testdb"
	"rendezvous/models"
	"rendezvous/service"
	"rendezvous/storage"
)

// dbProxy stands between one replica and its database. Blackhole cuts it
// off the way a dead network path does: the connections it has stay open
// and silent (see faultProxy), and new ones are accepted and never
// answered, so the replica learns nothing until its own timeouts. Restore
// forwards new connections again; the black-holed ones stay dead.
type dbProxy struct {
	ln     net.Listener
	target string
	holed  atomic.Bool
	refuse atomic.Bool // drop: new connections are closed at once
	done   chan struct{}

	mu    sync.Mutex
	conns []*faultProxyConn
	held  []net.Conn
}

func newDBProxy(t *testing.T, target string) *dbProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &dbProxy{ln: ln, target: target, done: make(chan struct{})}
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// url is databaseURL with its host replaced by the proxy's.
func (p *dbProxy) url(t *testing.T, databaseURL string) string {
	u, err := url.Parse(databaseURL)
	require.NoError(t, err)
	u.Host = p.ln.Addr().String()
	return u.String()
}

func (p *dbProxy) accept() {
	defer close(p.done)
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if p.refuse.Load() {
			c.Close()
			continue
		}
		if p.holed.Load() {
			p.mu.Lock()
			p.held = append(p.held, c)
			p.mu.Unlock()
			continue
		}
		s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		pc := &faultProxyConn{client: c, server: s}
		pc.pumps.Add(2)
		p.mu.Lock()
		p.conns = append(p.conns, pc)
		p.mu.Unlock()
		go pc.pump(c, s, nil)
		go pc.pump(s, c, nil)
	}
}

func (p *dbProxy) blackhole() {
	p.holed.Store(true)
	p.mu.Lock()
	conns := append([]*faultProxyConn(nil), p.conns...)
	p.mu.Unlock()
	for _, pc := range conns {
		pc.cutOff()
	}
}

// drop closes every connection and refuses new ones, as a server that
// went down does, until restore.
func (p *dbProxy) drop() {
	p.refuse.Store(true)
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, pc := range conns {
		pc.client.Close()
		pc.server.Close()
		pc.pumps.Wait()
	}
}

// restore forwards new connections again. Those accepted while
// black-holed are closed: a real dial into a black hole would have failed
// by now (its SYN unanswered); only established connections stay silent.
func (p *dbProxy) restore() {
	p.holed.Store(false)
	p.refuse.Store(false)
	p.mu.Lock()
	held := p.held
	p.held = nil
	p.mu.Unlock()
	for _, c := range held {
		c.Close()
	}
}

func (p *dbProxy) close() {
	p.ln.Close()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pc := range p.conns {
		pc.client.Close()
		pc.server.Close()
		pc.pumps.Wait()
	}
	for _, c := range p.held {
		c.Close()
	}
	p.conns, p.held = nil, nil
}

// mysqlTarget is the host:port of a mysql:// URL.
func mysqlTarget(t *testing.T, databaseURL string) string {
	u, err := url.Parse(databaseURL)
	require.NoError(t, err)
	if u.Port() == "" {
		return u.Hostname() + ":3306"
	}
	return u.Host
}

// Defect: a replica cut off from the database for longer than its lease,
// while another stays up, has its waiters without a step reaped by the
// other; its subscribers used to wait for ever (the catch-up poll looked
// only for waiters that ended, not for ones that vanished). Now each ends
// with WAITER_LOST soon after the replica is back, and subscribing again
// receives what a targeted notify stored meanwhile.
func TestCutOffReplicaWaitersEnd(t *testing.T) {
	t.Parallel()
	db := testdb.MySQL(t)
	const lease = 2 * time.Second
	short := func(c *service.Config) { c.Engine.LeaseTTL = lease }
	proxy := newDBProxy(t, mysqlTarget(t, db))
	a := newEnv(t, proxy.url(t, db), short)
	b := newEnv(t, db, short)

	run, evRun, evFree := a.trigger(), uid("cut-run"), uid("cut-free")
	durableEv := uid("cut-durable")
	c := a.dial(gqlclient.TransportWS)
	onRun := a.subscribe(c, evRun, waitOpts{run: run})
	free := a.subscribe(c, evFree, waitOpts{timeout: "1h"})
	durable := a.subscribe(c, durableEv, waitOpts{run: run, step: "kept"})
	wRun := b.awaitWaiting(evRun, 1)[0]
	wFree := b.awaitWaiting(evFree, 1)[0]
	b.awaitWaiting(durableEv, 1)

	proxy.blackhole()
	cutAt := time.Now()
	ctx := ctxT(t)
	eventually(t, 10*lease, func() bool {
		_, e1 := b.svc.Store.WaiterGet(ctx, wRun.ID)
		_, e2 := b.svc.Store.WaiterGet(ctx, wFree.ID)
		return errors.Is(e1, storage.ErrNotFound) && errors.Is(e2, storage.ErrNotFound)
	}, "replica b reaps the waiters of the cut-off replica")
	t.Logf("b reaped a's waiters %s after a was cut off", time.Since(cutAt).Round(time.Millisecond))
	// Meanwhile a targeted notify finds no waiter that counts: it is kept.
	n := b.notify(evRun, "while cut off", run)
	require.Empty(t, n.NotifyResponse)
	require.NotNil(t, n.Lookback)
	// A durable step has no owner: it is never reaped, and is resolved.
	nd := b.notify(durableEv, "durable", run)
	require.Len(t, nd.NotifyResponse, 1)

	proxy.restore()
	back := time.Now()
	for _, s := range []*gqlclient.Sub{onRun, free} {
		o := result(t, s, 30*time.Second)
		require.Equal(t, "WAITER_LOST", o.code(), "%+v", o)
		require.Nil(t, o.Result)
		t.Logf("subscription %s ended WAITER_LOST %s after a was back (%s)", s.ID, time.Since(back).Round(time.Millisecond), o.Errors[0].Message)
	}
	r := mustResult(t, durable)
	require.Equal(t, `"durable"`, string(r.EventData))

	// Subscribing again (on a, back now) receives what was kept.
	again := mustResult(t, a.subscribe(a.dial(gqlclient.TransportWS), evRun, waitOpts{run: run}))
	require.Equal(t, n.Lookback.MessageID, *again.MessageID)
	require.Equal(t, `"while cut off"`, string(again.EventData))
}

// A replica cut off just past its lease comes back and renews it before
// anyone reaped its waiters. A targeted notify sent meanwhile skipped its
// waiter (the lease looked dead) and stored a lookback event; the waiter
// must not wait on beside that event (rule 5: neither delivered). The
// notify removes the waiter it skipped, so its subscriber hears WAITER_LOST.
func TestLapsedWaiterSkippedIsRemoved(t *testing.T) {
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ctx := ctxT(t)
		run, ev := e.trigger(), uid("lapsed")
		now := e.svc.Engine.Now()
		require.NoError(t, e.svc.Store.ReplicaRenew(ctx, "rep_lapsed", now.Add(-time.Millisecond)))
		w := &models.Waiter{EventID: ev, WorkflowRunID: &run, State: models.WaiterWaiting,
			Deadline: now.Add(time.Hour), CreatedAt: now, Owner: "rep_lapsed"}
		require.NoError(t, e.svc.Store.WaiterInsert(ctx, w))

		n := e.notify(ev, "kept", run)
		require.Empty(t, n.NotifyResponse)
		require.NotNil(t, n.Lookback)
		// The replica is back and renews before any reaper ran.
		require.NoError(t, e.svc.Store.ReplicaRenew(ctx, "rep_lapsed", now.Add(time.Hour)))
		_, err := e.svc.Store.WaiterGet(ctx, w.ID)
		require.ErrorIs(t, err, storage.ErrNotFound, "the skipped waiter must not wait on beside its lookback event")
		require.Empty(t, e.waiters(ev))
	})
}

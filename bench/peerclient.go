package main

// The peer's clients, in a client process: github.com/centrifugal/centrifuge-go
// clients, one websocket each, holding PerConn channel subscriptions each
// (as our clients hold PerConn waitForEvent subscriptions per websocket).
// A publication is stamped in its OnPublication callback, which the client
// library runs on its callback goroutine right after decoding the frame.

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	cgo "github.com/centrifugal/centrifuge-go"
)

// peerSet is what a subscription set on the peer holds.
type peerSet struct {
	api     string // the peer's publish API
	clients []*cgo.Client
	closing atomic.Bool
}

func (ps *peerSet) close() {
	ps.closing.Store(true)
	parallel(len(ps.clients), 256, func(j int) error {
		if c := ps.clients[j]; c != nil {
			c.Close()
		}
		return nil
	})
}

// peerSubscribe opens N subscriptions on the peer, PerConn per client
// connection, on channels Prefix+i (or all on Prefix when SameEvent), and
// returns once the peer has confirmed every one.
func (p *clientProc) peerSubscribe(ctx context.Context, cmd command) (reply, error) {
	if _, dup := p.sets[cmd.Set]; dup {
		return reply{}, fmt.Errorf("set %q exists", cmd.Set)
	}
	per := max(cmd.PerConn, 1)
	ps := &peerSet{api: cmd.API, clients: make([]*cgo.Client, (cmd.N+per-1)/per)}
	s := &subSet{
		endpoint: cmd.Endpoint,
		n:        cmd.N,
		peer:     ps,
		sent:     make([]atomic.Int64, cmd.N),
		recv:     make([]atomic.Int64, cmd.N),
		event:    func(i int) string { return cmd.Prefix + fmt.Sprint(i) },
	}
	if cmd.SameEvent {
		s.event = func(int) string { return cmd.Prefix }
	}
	p.sets[cmd.Set] = s
	start := time.Now()
	err := parallel(len(ps.clients), 64, func(j int) error {
		c := cgo.NewJsonClient(cmd.Endpoint, cgo.Config{
			NetDialContext:   p.dialer.DialContext,
			HandshakeTimeout: 30 * time.Second,
			ReadTimeout:      30 * time.Second,
			WriteTimeout:     10 * time.Second,
		})
		ps.clients[j] = c
		connected := make(chan struct{})
		var (
			once    sync.Once
			lastErr atomic.Pointer[string]
		)
		c.OnConnected(func(cgo.ConnectedEvent) { once.Do(func() { close(connected) }) })
		c.OnError(func(e cgo.ErrorEvent) {
			msg := e.Error.Error()
			lastErr.Store(&msg)
		})
		c.OnDisconnected(func(e cgo.DisconnectedEvent) {
			if !ps.closing.Load() {
				s.fail(fmt.Sprintf("peer connection %d disconnected: %d %s", j, e.Code, e.Reason))
			}
		})
		if err := c.Connect(); err != nil {
			return fmt.Errorf("peer connection %d: %w", j, err)
		}
		wait := func(ch <-chan struct{}, what string) error {
			t := time.NewTimer(time.Minute)
			defer t.Stop()
			select {
			case <-ch:
				return nil
			case <-t.C:
				why := ""
				if e := lastErr.Load(); e != nil {
					why = ": " + *e
				}
				return fmt.Errorf("peer connection %d: no %s within a minute%s", j, what, why)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if err := wait(connected, "connect"); err != nil {
			return err
		}
		first, last := j*per, min(s.n, (j+1)*per)
		subscribed := make(chan struct{}, last-first)
		for i := first; i < last; i++ {
			sub, err := c.NewSubscription(s.event(i))
			if err != nil {
				return fmt.Errorf("peer subscription %d: %w", i, err)
			}
			sub.OnPublication(func(e cgo.PublicationEvent) {
				at := time.Now()
				if !bytes.Contains(e.Data, []byte(`"order":12345`)) {
					s.fail(fmt.Sprintf("peer subscription %d: unexpected data %.200s", i, e.Data))
					return
				}
				if s.recv[i].CompareAndSwap(0, at.UnixNano()) {
					s.received.Add(1)
				}
			})
			sub.OnSubscribed(func(cgo.SubscribedEvent) {
				select {
				case subscribed <- struct{}{}:
				default: // subscribed again after a reconnect: the disconnect was counted
				}
			})
			sub.OnError(func(e cgo.SubscriptionErrorEvent) {
				s.fail(fmt.Sprintf("peer subscription %d: %v", i, e.Error))
			})
			sub.OnUnsubscribed(func(e cgo.UnsubscribedEvent) {
				if !ps.closing.Load() {
					s.fail(fmt.Sprintf("peer subscription %d unsubscribed: %d %s", i, e.Code, e.Reason))
				}
			})
			if err := sub.Subscribe(); err != nil {
				return fmt.Errorf("peer subscription %d: %w", i, err)
			}
		}
		for range last - first {
			if err := wait(subscribed, "subscribe confirmation"); err != nil {
				return err
			}
		}
		return nil
	})
	r := s.status()
	r.Elapsed = time.Since(start)
	return r, err
}

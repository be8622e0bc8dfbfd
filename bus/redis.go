// Package bus carries "waiter W ended" between replicas, so a subscriber on
// one replica hears within milliseconds of a notify committed on another.
// It carries wake-ups only: a message lost here costs latency (the catch-up
// poll finds the end in the database), never a notification.
package bus

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/redis/go-redis/v9"

	"rendezvous/engine"
	"rendezvous/hub"
)

// Channel is the Redis pub/sub channel all replicas share.
const Channel = "rendezvous:waiter-ends"

// Redis publishes waiter ends on a Redis channel and wakes the local hub for
// ends published by other replicas.
type Redis struct {
	client *redis.Client
	hub    *hub.Hub
	origin string // this replica, so it skips its own messages
	log    *slog.Logger

	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}
}

var _ engine.Bus = (*Redis)(nil)

// NewRedis connects to redis://[:password@]host:port[/db].
func NewRedis(ctx context.Context, url, origin string, h *hub.Hub, log *slog.Logger) (*Redis, error) {
	opts, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("REDIS_URL: %w", err)
	}
	client := redis.NewClient(opts)
	if err := client.Ping(ctx).Err(); err != nil {
		client.Close()
		return nil, fmt.Errorf("connect to Redis at %s: %w", opts.Addr, err)
	}
	return &Redis{client: client, hub: h, origin: origin, log: log}, nil
}

// Publish sends the ids as one message: "origin id1 id2 …". Ids contain no
// spaces (they are wtr_<number>).
func (r *Redis) Publish(ctx context.Context, waiterIDs []string) error {
	if len(waiterIDs) == 0 {
		return nil
	}
	msg := r.origin + " " + strings.Join(waiterIDs, " ")
	return r.client.Publish(ctx, Channel, msg).Err()
}

// Start subscribes and wakes local listeners until Stop. The go-redis pub/sub
// reconnects by itself after a Redis restart; ends published meanwhile are
// picked up by the catch-up poll.
func (r *Redis) Start(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cancel != nil {
		return nil
	}
	ps := r.client.Subscribe(ctx, Channel)
	if _, err := ps.Receive(ctx); err != nil { // the subscription confirmation
		ps.Close()
		return fmt.Errorf("subscribe to %s: %w", Channel, err)
	}
	ctx, r.cancel = context.WithCancel(context.WithoutCancel(ctx))
	r.done = make(chan struct{})
	go func() {
		defer close(r.done)
		defer ps.Close()
		ch := ps.Channel()
		for {
			select {
			case <-ctx.Done():
				return
			case m, ok := <-ch:
				if !ok {
					return
				}
				r.deliver(m.Payload)
			}
		}
	}()
	return nil
}

func (r *Redis) deliver(payload string) {
	fields := strings.Fields(payload)
	if len(fields) < 2 || fields[0] == r.origin {
		return
	}
	for _, id := range fields[1:] {
		r.hub.Publish(id, hub.Wake{})
	}
}

// Stop ends the subscription and closes the client. A second Stop is harmless.
func (r *Redis) Stop() {
	r.mu.Lock()
	cancel, done := r.cancel, r.done
	r.cancel = nil
	r.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
	r.client.Close()
}

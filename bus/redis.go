// Package bus carries "waiter W ended" between replicas, so a subscriber on
// one replica hears within milliseconds of a notify committed on another.
// It carries wake-ups only: a message lost here costs latency (the catch-up
// poll finds the end in the database), never a notification.
package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

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

	// outbox decouples notifies from Redis: a slow or unreachable Redis
	// must not hold up a response (the catch-up poll covers what is dropped).
	outbox chan string

	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}
}

// outboxSize bounds the wake-up messages waiting for Redis; beyond it new
// ones are dropped.
const outboxSize = 4096

// publishTimeout bounds one PUBLISH.
const publishTimeout = time.Second

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
	return &Redis{client: client, hub: h, origin: origin, log: log, outbox: make(chan string, outboxSize)}, nil
}

// Publish queues the ids as one message, "origin id1 id2 …" (ids contain no
// spaces: they are wtr_<number>). It never blocks; a full queue drops the
// message, and the other replicas' catch-up poll finds those ends instead.
func (r *Redis) Publish(_ context.Context, waiterIDs []string) error {
	if len(waiterIDs) == 0 {
		return nil
	}
	select {
	case r.outbox <- r.origin + " " + strings.Join(waiterIDs, " "):
		return nil
	default:
		return errors.New("redis outbox full: wake-up dropped, other replicas will catch up by polling")
	}
}

func (r *Redis) drain(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case msg := <-r.outbox:
			pctx, cancel := context.WithTimeout(ctx, publishTimeout)
			if err := r.client.Publish(pctx, Channel, msg).Err(); err != nil && ctx.Err() == nil {
				r.log.Warn("publish waiter ends to Redis", "err", err)
			}
			cancel()
		}
	}
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
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		r.drain(ctx)
	}()
	go func() {
		defer close(r.done)
		defer func() { <-drained }()
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

// Package bus carries "waiter W ended" between replicas, so a subscriber on
// one replica hears within milliseconds of a notify committed on another.
// It carries wake-ups only: a message lost here costs latency (the catch-up
// poll finds the end in the database), never a notification.
//
// It must never hold up a notify or the start of the service: Redis being
// slow, unreachable or gone only makes wake-ups between replicas wait for
// the catch-up poll, and the bus keeps reconnecting by itself.
package bus

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"rendezvous/engine"
	"rendezvous/hub"
)

// Options configure a Redis bus. Zero values take the defaults below.
type Options struct {
	// Channel, when set, is the pub/sub channel, as given. Every replica
	// of a deployment must use the same one, and no other deployment on
	// the same Redis may.
	Channel string
	// Deployment names the deployment when Channel is empty: the channel
	// is then derived from it and the Redis database number (see
	// ChannelFor). It must not contain secrets; it is hashed anyway.
	Deployment string
	// Origin names this replica, so it skips its own messages.
	Origin string
	Logger *slog.Logger
	// HealthInterval: a subscription that heard nothing for this long is
	// pinged, and one that stays silent as long again is reconnected.
	HealthInterval time.Duration
	// MinBackoff and MaxBackoff bound the jittered wait between attempts
	// to reconnect.
	MinBackoff, MaxBackoff time.Duration
	// StartWait bounds how long Start waits for the first subscription, so
	// that a healthy Redis is subscribed before the service takes traffic
	// while an unreachable one does not hold the start up.
	StartWait time.Duration
}

// Defaults of Options.
const (
	DefaultHealthInterval = 5 * time.Second
	DefaultMinBackoff     = 100 * time.Millisecond
	DefaultMaxBackoff     = 5 * time.Second
	DefaultStartWait      = 3 * time.Second
)

// ChannelFor is the channel of a deployment on a Redis database. Pub/sub
// ignores the database number, so it is part of the name: deployments kept
// apart by database number stay apart here too.
func ChannelFor(deployment string, redisDB int) string {
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s\x00redis-db=%d", deployment, redisDB)))
	return "rendezvous:" + hex.EncodeToString(sum[:8]) + ":waiter-ends"
}

// Redis publishes waiter ends on a Redis channel and wakes the local hub for
// ends published by other replicas.
type Redis struct {
	client  *redis.Client
	addr    string
	channel string
	hub     *hub.Hub
	opts    Options
	log     *slog.Logger

	// outbox decouples notifies from Redis: a slow Redis must not hold up
	// a response (the catch-up poll covers what is dropped).
	outbox chan string

	state     atomic.Pointer[Status]
	published atomic.Uint64
	batches   atomic.Uint64 // PUBLISH commands that carried them
	received  atomic.Uint64
	dropped   atomic.Uint64

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

// State is where the subscription stands.
type State string

const (
	// StateConnecting: not subscribed yet since the start.
	StateConnecting State = "connecting"
	// StateUp: subscribed; wake-ups cross replicas in milliseconds.
	StateUp State = "ok"
	// StateDown: Redis could not be reached or the subscription broke;
	// replicas hear of each other's ends through the catch-up poll until
	// it is back.
	StateDown State = "down"
)

// Status is the subscription's state, since when, and why it is down.
type Status struct {
	State State
	Since time.Time
	Err   string
}

// Stats counts waiter ids: sent to the other replicas (in Batches
// PUBLISH commands), received from them (and handed to the hub), and
// dropped because Redis was down or slow.
type Stats struct {
	Published, Batches, Received, Dropped uint64
}

// NewRedis prepares a bus on redis://[:password@]host:port[/db]. It does not
// connect: Start does, and keeps doing so. Only a malformed URL is an error.
func NewRedis(url string, h *hub.Hub, opts Options) (*Redis, error) {
	ropts, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("REDIS_URL: %w", err)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&opts.HealthInterval, DefaultHealthInterval)
	def(&opts.MinBackoff, DefaultMinBackoff)
	def(&opts.MaxBackoff, DefaultMaxBackoff)
	def(&opts.StartWait, DefaultStartWait)
	opts.MaxBackoff = max(opts.MaxBackoff, opts.MinBackoff)
	// Deadlines of our contexts bound reads and writes (publishTimeout,
	// the subscription's handshake), not only the client's own timeouts.
	ropts.ContextTimeoutEnabled = true
	channel := opts.Channel
	if channel == "" {
		channel = ChannelFor(opts.Deployment, ropts.DB)
	}
	r := &Redis{client: redis.NewClient(ropts), addr: ropts.Addr, channel: channel, hub: h, opts: opts,
		log: opts.Logger.With("redis", ropts.Addr), outbox: make(chan string, outboxSize)}
	r.state.Store(&Status{State: StateConnecting, Since: time.Now()})
	return r, nil
}

// Channel is the pub/sub channel this bus uses.
func (r *Redis) Channel() string { return r.channel }

// Status says whether the subscription is live.
func (r *Redis) Status() Status { return *r.state.Load() }

// Stats returns the counts of waiter ids so far.
func (r *Redis) Stats() Stats {
	return Stats{Published: r.published.Load(), Batches: r.batches.Load(), Received: r.received.Load(), Dropped: r.dropped.Load()}
}

// Health is the line /readyz shows for Redis.
func (r *Redis) Health() string {
	s := r.Status()
	switch s.State {
	case StateUp:
		return string(StateUp)
	case StateConnecting:
		return fmt.Sprintf("connecting to %s", r.addr)
	default:
		return fmt.Sprintf("down since %s: %s; wake-ups between replicas go through the catch-up poll until it is back",
			s.Since.UTC().Format(time.RFC3339), s.Err)
	}
}

// Publish queues the ids as one message, "origin id1 id2 …" (ids contain no
// spaces: they are wtr_<number>). It never blocks. While the subscription is
// not live, or the queue is full, the message is dropped and counted: the
// other replicas' catch-up poll finds those ends instead. Dropping while
// down is not an error worth a log line per notify: the state says it once.
func (r *Redis) Publish(_ context.Context, waiterIDs []string) error {
	if len(waiterIDs) == 0 {
		return nil
	}
	if r.Status().State != StateUp {
		r.dropped.Add(uint64(len(waiterIDs)))
		return nil
	}
	select {
	case r.outbox <- r.origin() + " " + strings.Join(waiterIDs, " "):
		return nil
	default:
		r.dropped.Add(uint64(len(waiterIDs)))
		return errors.New("redis outbox full: wake-up dropped, other replicas will catch up by polling")
	}
}

func (r *Redis) origin() string { return r.opts.Origin }

// maxBatch bounds one PUBLISH of drain (bytes of the message), so that a
// backlog goes out in few round trips without making one huge message.
const maxBatch = 64 << 10

// drain publishes what notifies queued. Whatever queued while a PUBLISH was
// on its way goes out in the next one, joined ("origin id1 id2 …" of
// several notifies is one message of the same form): under load, one round
// trip to Redis per batch rather than per notify, so a wake-up does not
// wait behind every earlier one's round trip.
func (r *Redis) drain(ctx context.Context) {
	failing := false
	var b strings.Builder
	for {
		var msg string
		select {
		case <-ctx.Done():
			return
		case msg = <-r.outbox:
		}
		b.Reset()
		b.WriteString(msg)
	more:
		for b.Len() < maxBatch {
			select {
			case next := <-r.outbox:
				// Each queued message is "origin ids…": keep the ids.
				_, ids, _ := strings.Cut(next, " ")
				b.WriteByte(' ')
				b.WriteString(ids)
			default:
				break more
			}
		}
		batch := b.String()
		n := uint64(strings.Count(batch, " "))
		pctx, cancel := context.WithTimeout(ctx, publishTimeout)
		err := r.client.Publish(pctx, r.channel, batch).Err()
		cancel()
		switch {
		case err == nil:
			r.published.Add(n)
			r.batches.Add(1)
			failing = false
		case ctx.Err() != nil:
			return
		default:
			r.dropped.Add(n)
			// Once per run of failures: the subscription notices a
			// dead Redis and says so in the state.
			if !failing {
				r.log.Warn("publish waiter ends to Redis failed; other replicas will catch up by polling", "err", err)
			}
			failing = true
		}
	}
}

// Start subscribes and wakes local listeners until Stop, reconnecting and
// subscribing again whenever the subscription breaks. It waits up to
// Options.StartWait for the first subscription (a healthy Redis is then
// live before the service takes traffic) and never fails: an unreachable
// Redis is logged and reported by Status, and retried.
func (r *Redis) Start(ctx context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cancel != nil {
		return
	}
	ctx, r.cancel = context.WithCancel(context.WithoutCancel(ctx))
	r.done = make(chan struct{})
	first := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		r.drain(ctx)
	}()
	go func() {
		defer wg.Done()
		r.subscribeLoop(ctx, first)
	}()
	go func() {
		defer close(r.done)
		wg.Wait()
	}()
	t := time.NewTimer(r.opts.StartWait)
	defer t.Stop()
	select {
	case <-first:
	case <-t.C:
		r.log.Warn("Redis did not answer at start-up; starting without it, still trying", "within", r.opts.StartWait, "channel", r.channel)
	}
}

// subscribeLoop runs one subscription after another until ctx ends, with a
// jittered, growing pause after each failure. first is closed after the
// first attempt, whatever its outcome.
func (r *Redis) subscribeLoop(ctx context.Context, first chan struct{}) {
	firstDone := sync.OnceFunc(func() { close(first) })
	defer firstDone()
	backoff := r.opts.MinBackoff
	for ctx.Err() == nil {
		wasUp, err := r.subscribeOnce(ctx, firstDone)
		if ctx.Err() != nil {
			return
		}
		r.setDown(err)
		firstDone()
		if wasUp {
			backoff = r.opts.MinBackoff
		}
		// Jitter, so replicas do not all knock at once on a Redis coming back.
		pause := backoff/2 + rand.N(backoff/2+1)
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, r.opts.MaxBackoff)
	}
}

// errSilent: Redis kept quiet where it should have answered.
var errSilent = errors.New("no answer from Redis")

// subscribeOnce subscribes on a fresh connection and delivers messages
// until the connection fails or ctx ends. It says whether the subscription
// was confirmed (live) before it failed.
func (r *Redis) subscribeOnce(ctx context.Context, confirmed func()) (wasUp bool, err error) {
	ps := r.client.Subscribe(ctx)
	// A read blocked on a dead connection does not watch ctx: closing the
	// subscription ends it.
	stop := context.AfterFunc(ctx, func() { ps.Close() })
	defer func() {
		stop()
		ps.Close()
	}()
	// Connecting (dial, handshake) and sending SUBSCRIBE: as long as a
	// silent Redis may take before it counts as down.
	sctx, cancel := context.WithTimeout(ctx, r.opts.HealthInterval)
	err = ps.Subscribe(sctx, r.channel)
	cancel()
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			return false, fmt.Errorf("%w while connecting, within %s", errSilent, r.opts.HealthInterval)
		}
		return false, err
	}
	pinged := false
	for {
		msg, err := ps.ReceiveTimeout(ctx, r.opts.HealthInterval)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if !wasUp {
					return false, fmt.Errorf("%w to SUBSCRIBE within %s", errSilent, r.opts.HealthInterval)
				}
				if pinged {
					return true, fmt.Errorf("%w to a ping within %s", errSilent, r.opts.HealthInterval)
				}
				pinged = true
				pctx, cancel := context.WithTimeout(ctx, r.opts.HealthInterval)
				err = ps.Ping(pctx)
				cancel()
				if err == nil {
					continue // the pong is read as a message
				}
			}
			return wasUp, err
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" && m.Channel == r.channel {
				wasUp = true
				r.setUp()
				confirmed()
			}
		case *redis.Message:
			r.deliver(m.Payload)
		}
	}
}

func (r *Redis) setUp() {
	prev := r.state.Swap(&Status{State: StateUp, Since: time.Now()})
	switch prev.State {
	case StateDown:
		r.log.Info("Redis reachable again: wake-ups between replicas are immediate again", "channel", r.channel,
			"down_for", time.Since(prev.Since).Round(time.Millisecond))
	case StateConnecting:
		r.log.Info("bus subscribed on Redis", "channel", r.channel)
	}
}

func (r *Redis) setDown(err error) {
	msg := "connection lost"
	if err != nil {
		msg = err.Error()
	}
	prev := r.state.Load()
	if prev.State == StateDown {
		// Still down: keep when it went down; the latest reason is the
		// one worth showing.
		r.state.Store(&Status{State: StateDown, Since: prev.Since, Err: msg})
		return
	}
	r.state.Store(&Status{State: StateDown, Since: time.Now(), Err: msg})
	r.log.Warn("Redis unreachable: wake-ups between replicas go through the catch-up poll until it is back; reconnecting",
		"err", msg, "channel", r.channel)
}

// deliver wakes local listeners for a message of another replica.
func (r *Redis) deliver(payload string) {
	fields := strings.Fields(payload)
	if len(fields) < 2 || fields[0] == r.origin() {
		return
	}
	r.received.Add(uint64(len(fields) - 1))
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

// Package delivery makes the HTTP calls Rendezvous owes (a run's dispatch):
// it claims due outbox rows through its Source, POSTs them signed, and hands
// each attempt's result back to the Source, which decides what follows
// (retry, delivered, failed). Every cause to look again (a commit that
// wrote a row, a freed slot, the next due time, a jittered poll) feeds one
// wake-up.
//
// It must never know GraphQL or the REST surface, never follow a redirect,
// never read a response body past a small cap, and never log the signing
// secret or a request's headers.
package delivery

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// Delivery is one claimed attempt.
type Delivery struct {
	ID string // Rendezvous-Delivery-Id: the same on every attempt
	// Kind says what it delivers ("dispatch", "callback"), for the
	// Observer.
	Kind    string
	URL     string
	Headers map[string]string // the caller's extra headers
	Body    []byte
	Attempt int // 1 for the first
	// MaxAttempts: attempts allowed in all (retries + 1), for the Source.
	MaxAttempts int
	Claim       string // hand back in Result
}

// Result is what one attempt came to.
type Result struct {
	ID, Claim   string
	Attempt     int
	MaxAttempts int
	Delivered   bool // a 2xx
	// Refused: the attempt was not made and never will be (the URL is no
	// longer allowed); the delivery fails without retries.
	Refused bool
	// Interrupted: this replica stopped during the attempt; it does not
	// count, and the delivery is due again at once (for another replica,
	// or this one after restart).
	Interrupted bool
	Status      int    // 0 when no response came
	Error       string // why it failed; "" when delivered
	Duration    time.Duration
}

// Source is where deliveries come from and results go (the engine).
type Source interface {
	// ClaimDeliveries claims up to limit due deliveries for lease: no other
	// replica sends them until the lease has passed.
	ClaimDeliveries(ctx context.Context, limit int, lease time.Duration) ([]Delivery, error)
	// RecordDeliveries stores attempts' results (in as few transactions
	// as the rules allow: commits are what an outbox pays for).
	RecordDeliveries(ctx context.Context, rs []Result) error
	// NextDeliveryDue is the earliest due time of a pending delivery, on
	// the local clock; ok false when none is pending.
	NextDeliveryDue(ctx context.Context) (due time.Time, ok bool, err error)
}

// Signer makes the Rendezvous-Signature header for a body.
type Signer func(body []byte, now time.Time) string

// Observer hears each attempt, for metrics. It must not block.
type Observer interface {
	DeliveryAttempt(kind, result string, d time.Duration)
}

// Config tunes the deliverer. Zero fields take the defaults.
type Config struct {
	Allow *AllowList
	Sign  Signer
	// ConnectTimeout bounds the TCP (and TLS) connection; HeaderTimeout
	// the wait for the response's headers; Timeout the whole attempt.
	ConnectTimeout, HeaderTimeout, Timeout time.Duration
	// MaxResponseBytes: a response body longer than this fails the attempt.
	MaxResponseBytes int64
	// Concurrency bounds the attempts in flight on this replica.
	Concurrency int
	// Poll is the longest sleep between looks at the outbox (jittered), for
	// rows other replicas wrote and wake-ups that were lost.
	Poll     time.Duration
	Observer Observer
	Logger   *slog.Logger
	// Transport, when set, replaces the HTTP transport (tests).
	Transport http.RoundTripper
}

// Defaults.
const (
	DefaultConnectTimeout   = 5 * time.Second
	DefaultHeaderTimeout    = 15 * time.Second
	DefaultTimeout          = 30 * time.Second
	DefaultMaxResponseBytes = 64 << 10
	DefaultConcurrency      = 16
	DefaultPoll             = time.Second
)

func (c Config) withDefaults() Config {
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.HeaderTimeout <= 0 {
		c.HeaderTimeout = min(DefaultHeaderTimeout, c.Timeout)
	}
	if c.MaxResponseBytes <= 0 {
		c.MaxResponseBytes = DefaultMaxResponseBytes
	}
	if c.Concurrency <= 0 {
		c.Concurrency = DefaultConcurrency
	}
	if c.Poll <= 0 {
		c.Poll = DefaultPoll
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// Lease is how long a claim lasts: longer than an attempt can take, with
// room to record its result, so that no two replicas send one attempt at
// once.
func (c Config) Lease() time.Duration { return c.withDefaults().Timeout*2 + time.Second }

// Deliverer runs the delivery loop. Start it, Wake it after a commit that
// wrote a row, Stop it.
type Deliverer struct {
	src    Source
	cfg    Config
	client *http.Client
	wake   chan struct{}

	mu      sync.Mutex
	cancel  context.CancelFunc
	stopped chan struct{}
}

// New returns a deliverer over src.
func New(src Source, cfg Config) *Deliverer {
	cfg = cfg.withDefaults()
	tr := cfg.Transport
	if tr == nil {
		dialer := &net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}
		tr = &http.Transport{
			// No proxy from the environment: the allow-list names where
			// calls go.
			Proxy:                 nil,
			DialContext:           dialer.DialContext,
			TLSHandshakeTimeout:   cfg.ConnectTimeout,
			ResponseHeaderTimeout: cfg.HeaderTimeout,
			MaxIdleConnsPerHost:   cfg.Concurrency,
			IdleConnTimeout:       60 * time.Second,
			ForceAttemptHTTP2:     true,
		}
	}
	return &Deliverer{
		src: src, cfg: cfg, wake: make(chan struct{}, 1),
		client: &http.Client{
			Transport: tr,
			Timeout:   cfg.Timeout,
			// A redirect is answered, not followed: it fails the attempt.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
}

// Wake makes the loop look at the outbox now. It never blocks.
func (d *Deliverer) Wake() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Start runs the loop until Stop. Starting twice does nothing.
func (d *Deliverer) Start(ctx context.Context) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cancel != nil {
		return
	}
	ctx, d.cancel = context.WithCancel(context.WithoutCancel(ctx))
	d.stopped = make(chan struct{})
	go func() {
		defer close(d.stopped)
		d.run(ctx)
	}()
}

// Stop ends the loop and waits for the attempts in flight (their results
// are recorded if the database answers; a lost one is retried after the
// claim's lease). A second Stop is harmless.
func (d *Deliverer) Stop() {
	d.mu.Lock()
	cancel, stopped := d.cancel, d.stopped
	d.cancel = nil
	d.mu.Unlock()
	if cancel != nil {
		cancel()
		<-stopped
	}
	if t, ok := d.client.Transport.(*http.Transport); ok {
		t.CloseIdleConnections()
	}
}

func (d *Deliverer) run(ctx context.Context) {
	var wg sync.WaitGroup
	results := make(chan Result, d.cfg.Concurrency)
	recorded := make(chan struct{})
	go func() {
		defer close(recorded)
		d.record(ctx, results)
	}()
	defer func() {
		wg.Wait()
		close(results)
		<-recorded
	}()
	slots := make(chan struct{}, d.cfg.Concurrency)
	freed := make(chan struct{}, 1)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.wake:
		case <-freed:
		case <-timer.C:
		}
		free := d.cfg.Concurrency - len(slots)
		sleep := d.jitteredPoll()
		if free > 0 {
			ds, err := d.src.ClaimDeliveries(ctx, free, d.cfg.Lease())
			if err != nil && ctx.Err() == nil {
				d.cfg.Logger.Warn("claim deliveries", "err", err)
			}
			for _, dl := range ds {
				slots <- struct{}{}
				wg.Add(1)
				go func() {
					defer wg.Done()
					results <- d.attempt(ctx, dl)
					<-slots
					select {
					case freed <- struct{}{}:
					default:
					}
				}()
			}
			if len(ds) == free {
				sleep = 0 // there may be more due
			} else if due, ok, err := d.src.NextDeliveryDue(ctx); err == nil && ok {
				sleep = min(sleep, max(0, time.Until(due)))
			}
		}
		timer.Reset(sleep)
	}
}

// record hands results to the Source as they come, those that came
// together in one call. It runs until results is closed, so that every
// attempt made is recorded even while the loop stops (with a few seconds'
// bound): an attempt made is not made again for want of its result.
func (d *Deliverer) record(ctx context.Context, results <-chan Result) {
	for r := range results {
		batch := []Result{r}
	more:
		for len(batch) < 64 {
			select {
			case r, ok := <-results:
				if !ok {
					break more
				}
				batch = append(batch, r)
			default:
				break more
			}
		}
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		err := d.src.RecordDeliveries(rctx, batch)
		cancel()
		for _, r := range batch {
			if err != nil {
				d.cfg.Logger.Warn("record delivery attempts", "delivery_id", r.ID, "attempt", r.Attempt, "err", err)
				continue
			}
			d.cfg.Logger.Info("delivery attempt", "delivery_id", r.ID, "attempt", r.Attempt, "result", outcome(r), "status", r.Status, "duration_ms", r.Duration.Milliseconds())
		}
	}
}

func outcome(r Result) string {
	switch {
	case r.Refused:
		return "refused"
	case r.Interrupted:
		return "interrupted"
	case !r.Delivered:
		return "failed"
	}
	return "delivered"
}

func (d *Deliverer) jitteredPoll() time.Duration {
	return time.Duration(float64(d.cfg.Poll) * (0.5 + rand.Float64()/2))
}

// attempt makes one call and returns its result, for record.
func (d *Deliverer) attempt(ctx context.Context, dl Delivery) Result {
	res := d.send(ctx, dl)
	if d.cfg.Observer != nil {
		d.cfg.Observer.DeliveryAttempt(dl.Kind, outcome(res), res.Duration)
	}
	return res
}

// send makes the HTTP call. It never returns an error: every failure is a
// Result.
func (d *Deliverer) send(ctx context.Context, dl Delivery) Result {
	res := Result{ID: dl.ID, Claim: dl.Claim, Attempt: dl.Attempt, MaxAttempts: dl.MaxAttempts}
	start := time.Now()
	defer func() { res.Duration = time.Since(start) }()
	// Checked again at send time: the list may have changed since the row
	// was written, and what cannot be checked is not called.
	if err := d.cfg.Allow.Check(dl.URL); err != nil {
		res.Refused, res.Error = true, err.Error()
		return res
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, dl.URL, bytes.NewReader(dl.Body))
	if err != nil {
		res.Refused, res.Error = true, "url does not make a request"
		return res
	}
	for k, v := range dl.Headers {
		req.Header.Set(k, v)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "Rendezvous-Delivery/1")
	req.Header.Set("Rendezvous-Delivery-Id", dl.ID)
	req.Header.Set("Rendezvous-Attempt", strconv.Itoa(dl.Attempt))
	if d.cfg.Sign != nil {
		req.Header.Set("Rendezvous-Signature", d.cfg.Sign(dl.Body, time.Now()))
	}
	resp, err := d.client.Do(req)
	if err != nil {
		res.Error = describe(err)
		res.Interrupted = ctx.Err() != nil
		return res
	}
	defer resp.Body.Close()
	res.Status = resp.StatusCode
	// Read up to the cap and one byte more, to tell a body over the cap.
	body, err := io.ReadAll(io.LimitReader(resp.Body, d.cfg.MaxResponseBytes+1))
	switch {
	case err != nil:
		res.Error = "reading the response: " + describe(err)
	case int64(len(body)) > d.cfg.MaxResponseBytes:
		res.Error = fmt.Sprintf("response body over %d bytes", d.cfg.MaxResponseBytes)
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		res.Error = fmt.Sprintf("HTTP %d: redirects are not followed", resp.StatusCode)
	case resp.StatusCode < 200 || resp.StatusCode >= 300:
		res.Error = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, snippet(body))
	default:
		res.Delivered = true
	}
	return res
}

// describe says why a call failed without the URL's query or anything the
// caller sent.
func describe(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timed out"
	case errors.Is(err, context.Canceled):
		return "canceled (the replica is stopping)"
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		return fmt.Sprintf("%s: %v", oe.Op, oe.Err)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "connection closed before a response"
	}
	return "request failed"
}

// snippet is the start of a response body for last_error: at most 200
// bytes of valid UTF-8.
func snippet(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	for len(b) > 0 && !utf8.Valid(b) {
		b = b[:len(b)-1]
	}
	return string(b)
}

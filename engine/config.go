package engine

import (
	"log/slog"
	"time"
)

// Config holds the engine's limits and intervals. Zero fields take the defaults.
type Config struct {
	// DefaultTimeout is a waiter's timeout when the caller gives none.
	DefaultTimeout time.Duration
	// MaxTimeout is the largest timeout a caller may ask for.
	MaxTimeout time.Duration
	// LookbackRetention is how long a stored lookback event can be consumed.
	LookbackRetention time.Duration
	// RunRetention is how long an ended run is kept, counted from its end,
	// with its waiters, steps, lookback events and the notifications they
	// alone refer to; then it is purged.
	RunRetention time.Duration
	// RunlessWaiterRetention is how long a waiter without a run is kept
	// after it ended. Such a waiter belongs to one subscription, which reads
	// its end within moments (a wake-up, or the catch-up poll); nobody can
	// ask for it afterwards (waiters lists only WAITING ones, and it is in
	// no run), so it need not stay as long as a run. Capped at RunRetention.
	RunlessWaiterRetention time.Duration
	// PurgeInterval is how often the retention purge looks for what has
	// passed its retention. A pass goes on, batch after batch, until
	// nothing is left to purge.
	PurgeInterval time.Duration
	// MaxPayloadBytes caps eventData, body and result (compact JSON bytes).
	MaxPayloadBytes int
	// MaxIDBytes caps event ids, caller-chosen run ids, step names and labels.
	MaxIDBytes int

	// SweepInterval is how often waiters past their deadline are ended
	// TIMED_OUT and expired lookback events purged.
	SweepInterval time.Duration
	// CatchUpInterval is how often live subscriptions are checked against
	// the database, for wake-ups lost between replicas.
	CatchUpInterval time.Duration

	// LeaseTTL is how long this replica's hold on its waiters without a
	// step lasts without renewal. If the replica dies, such waiters stop
	// counting (notifies skip them, so a targeted notify stores a lookback
	// instead) once the lease runs out. It is renewed every LeaseTTL/4.
	LeaseTTL time.Duration

	// GaugeInterval is how often the backlog (waiters waiting, lookback
	// events pending) is counted in the database for the Recorder.
	GaugeInterval time.Duration
	// Recorder hears what the engine did, for metrics; nil: nobody.
	Recorder Recorder

	// Outbound: HTTP dispatch through the outbox (outbox.go).
	Outbound OutboundConfig

	// Now is this machine's clock; tests may replace it (and move it on to
	// make deadlines pass without sleeping).
	Now func() time.Time
	// ClockSkew is added to Now: it stands for this machine's clock being
	// off, so that tests can run replicas whose clocks disagree.
	ClockSkew time.Duration
	Logger    *slog.Logger
}

// Defaults.
const (
	DefaultTimeout           = 7 * 24 * time.Hour
	DefaultMaxTimeout        = 365 * 24 * time.Hour
	DefaultLookbackRetention = 7 * 24 * time.Hour
	DefaultRunRetention      = 30 * 24 * time.Hour
	DefaultRunlessRetention  = time.Hour
	DefaultPurgeInterval     = time.Minute
	DefaultMaxPayloadBytes   = 1 << 20
	DefaultMaxIDBytes        = 256
	DefaultSweepInterval     = time.Second
	DefaultCatchUpInterval   = 2 * time.Second
	DefaultLeaseTTL          = 20 * time.Second
	DefaultGaugeInterval     = 15 * time.Second
)

func (c Config) withDefaults() Config {
	if c.DefaultTimeout <= 0 {
		c.DefaultTimeout = DefaultTimeout
	}
	if c.MaxTimeout <= 0 {
		c.MaxTimeout = DefaultMaxTimeout
	}
	if c.DefaultTimeout > c.MaxTimeout {
		c.DefaultTimeout = c.MaxTimeout
	}
	if c.LookbackRetention <= 0 {
		c.LookbackRetention = DefaultLookbackRetention
	}
	if c.RunRetention <= 0 {
		c.RunRetention = DefaultRunRetention
	}
	if c.RunlessWaiterRetention <= 0 {
		c.RunlessWaiterRetention = DefaultRunlessRetention
	}
	c.RunlessWaiterRetention = min(c.RunlessWaiterRetention, c.RunRetention)
	if c.PurgeInterval <= 0 {
		c.PurgeInterval = DefaultPurgeInterval
	}
	if c.MaxPayloadBytes <= 0 {
		c.MaxPayloadBytes = DefaultMaxPayloadBytes
	}
	if c.MaxIDBytes <= 0 {
		c.MaxIDBytes = DefaultMaxIDBytes
	}
	if c.MaxIDBytes > 256 {
		c.MaxIDBytes = 256 // the columns hold 256 characters
	}
	if c.SweepInterval <= 0 {
		c.SweepInterval = DefaultSweepInterval
	}
	if c.CatchUpInterval <= 0 {
		c.CatchUpInterval = DefaultCatchUpInterval
	}
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = DefaultLeaseTTL
	}
	if c.GaugeInterval <= 0 {
		c.GaugeInterval = DefaultGaugeInterval
	}
	c.Outbound = c.Outbound.withDefaults()
	if c.Recorder == nil {
		c.Recorder = NopRecorder{}
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

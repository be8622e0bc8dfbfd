package metrics

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"rendezvous/delivery"
)

var _ delivery.Observer = (*Metrics)(nil)

type outboxMetrics struct {
	attempts *prometheus.CounterVec
	duration prometheus.Histogram
}

var (
	deliveryResults = []string{"delivered", "failed", "refused", "interrupted"}
	deliveryKinds   = []string{"dispatch", "callback"}
)

func newOutboxMetrics(reg *prometheus.Registry) outboxMetrics {
	o := outboxMetrics{
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rendezvous_outbox_attempts_total",
			Help: "HTTP delivery attempts made by this replica, by kind (dispatch: a run's start; callback: a waiter's result) and result: delivered (2xx), failed (anything else, a timeout, a refused connection; retried until its retries are used up), refused (the URL is no longer allowed), interrupted (this replica stopped during it; it does not count).",
		}, []string{"kind", "result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "rendezvous_outbox_attempt_duration_seconds",
			Help:    "Time of one HTTP delivery attempt, from the request to the end of the (capped) response.",
			Buckets: latencyBuckets,
		}),
	}
	reg.MustRegister(o.attempts, o.duration)
	for _, k := range deliveryKinds {
		for _, r := range deliveryResults {
			o.attempts.WithLabelValues(k, r)
		}
	}
	return o
}

// DeliveryAttempt implements delivery.Observer.
func (m *Metrics) DeliveryAttempt(kind, result string, d time.Duration) {
	if !slices.Contains(deliveryResults, result) {
		result = other
	}
	if !slices.Contains(deliveryKinds, kind) {
		kind = other
	}
	m.outbox.attempts.WithLabelValues(kind, result).Inc()
	m.outbox.duration.Observe(d.Seconds())
}

// ObserveOutboxPending exports the deliveries pending in the whole
// database, read at scrape time through count (at most every 5s; a failed
// read keeps the last value).
func (m *Metrics) ObserveOutboxPending(count func(ctx context.Context) (int64, error)) {
	var (
		mu   sync.Mutex
		last float64
		at   time.Time
	)
	g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "rendezvous_outbox_pending",
		Help: "HTTP deliveries (dispatches and callbacks) PENDING in the whole database: not yet delivered, failed or canceled.",
	}, func() float64 {
		mu.Lock()
		defer mu.Unlock()
		if time.Since(at) < 5*time.Second {
			return last
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if n, err := count(ctx); err == nil {
			last, at = float64(n), time.Now()
		}
		return last
	})
	var already prometheus.AlreadyRegisteredError
	if err := m.reg.Register(g); err != nil && !errors.As(err, &already) {
		panic(err)
	}
}

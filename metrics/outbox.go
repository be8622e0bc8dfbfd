package metrics

import (
	"context"
	"errors"
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

var deliveryResults = []string{"delivered", "failed", "refused", "interrupted"}

func newOutboxMetrics(reg *prometheus.Registry) outboxMetrics {
	o := outboxMetrics{
		attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rendezvous_outbox_attempts_total",
			Help: "HTTP delivery attempts (dispatches) made by this replica, by result: delivered (2xx), failed (anything else, a timeout, a refused connection; retried until its retries are used up), refused (the URL is no longer allowed), interrupted (this replica stopped during it; it does not count).",
		}, []string{"result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "rendezvous_outbox_attempt_duration_seconds",
			Help:    "Time of one HTTP delivery attempt, from the request to the end of the (capped) response.",
			Buckets: latencyBuckets,
		}),
	}
	reg.MustRegister(o.attempts, o.duration)
	for _, r := range deliveryResults {
		o.attempts.WithLabelValues(r)
	}
	return o
}

// DeliveryAttempt implements delivery.Observer.
func (m *Metrics) DeliveryAttempt(result string, d time.Duration) {
	known := false
	for _, r := range deliveryResults {
		known = known || r == result
	}
	if !known {
		result = other
	}
	m.outbox.attempts.WithLabelValues(result).Inc()
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
		Help: "HTTP deliveries (dispatches) PENDING in the whole database: not yet delivered, failed or canceled.",
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

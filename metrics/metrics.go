// Package metrics keeps Rendezvous' Prometheus metrics: one Metrics per
// service, on a registry of its own (never the global one, so that tests can
// run many services in one process), served in the Prometheus text format by
// Handler. It implements the small recorder interfaces the engine, the
// storage and the GraphQL layer call; they never see a Prometheus type.
//
// No label may take a value chosen by a caller (ids, event ids, names):
// every label value here comes from a fixed set, so the number of series is
// bounded whatever traffic arrives.
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"rendezvous/engine"
	"rendezvous/storage"
)

// Metrics holds every metric of one service.
type Metrics struct {
	reg *prometheus.Registry
	// outbox: HTTP dispatch (outbox.go).
	outbox outboxMetrics

	triggers         *prometheus.CounterVec
	notifies         *prometheus.CounterVec
	notifyDuration   *prometheus.HistogramVec
	waitersEnded     *prometheus.CounterVec
	lookbackEvents   *prometheus.CounterVec
	dbRetries        *prometheus.CounterVec
	graphqlErrors    *prometheus.CounterVec
	operationTime    *prometheus.HistogramVec
	openConnections  *prometheus.GaugeVec
	liveSubs         prometheus.Gauge
	deliveryDuration prometheus.Histogram
	waitersWaiting   prometheus.Gauge
	lookbackPending  prometheus.Gauge
}

var (
	_ engine.Recorder  = (*Metrics)(nil)
	_ storage.Observer = (*Metrics)(nil)
)

// Label values. Anything else a caller passes is folded into "other".
var (
	triggerCreated = []string{"true", "false"}
	notifyKinds    = []string{string(engine.NotifyBroadcast), string(engine.NotifyTargeted), string(engine.NotifyStep), string(engine.NotifyCompletionURL)}
	notifyResults  = []string{string(engine.NotifyResolved), string(engine.NotifyLookback), string(engine.NotifyNone), string(engine.NotifyDeduplicated), string(engine.NotifyError)}
	waiterOutcomes = []string{string(engine.WaiterNotified), string(engine.WaiterTimedOut), string(engine.WaiterCanceled), string(engine.WaiterRemoved)}
	lookbackSteps  = []string{string(engine.LookbackStored), string(engine.LookbackConsumed), string(engine.LookbackExpired), string(engine.LookbackDropped)}
	retryCauses    = []string{storage.CauseDeadlock, storage.CauseLockWait, storage.CauseBusy, storage.CauseConnection}
	operationTypes = []string{"query", "mutation", "subscription"}
	transports     = []string{"websocket", "sse"}
	// ErrorCodes are the values of extensions.code the service sends.
	ErrorCodes = []string{
		"BAD_USER_INPUT", "NOT_FOUND", "RUN_NOT_ACTIVE", "PAYLOAD_TOO_LARGE",
		"SERVICE_UNAVAILABLE", "OUTCOME_UNKNOWN", "INTERNAL_SERVER_ERROR",
		"UNAUTHENTICATED", "FORBIDDEN", "RATE_LIMITED", "COMPLEXITY_LIMIT_EXCEEDED",
		"TOO_MANY_SUBSCRIPTIONS", "BAD_REQUEST",
		// Completion URLs: a waiter that had already ended (409), a method other than POST (405).
		"CONFLICT", "METHOD_NOT_ALLOWED",
		"GRAPHQL_PARSE_FAILED", "GRAPHQL_VALIDATION_FAILED",
	}
)

// other is the label value of anything outside the fixed sets.
const other = "other"

// Buckets in seconds: from a millisecond (a notify on a warm database) to
// tens of seconds (a delivery that waited for the catch-up poll after a lost
// wake-up, a transaction retried under contention).
var (
	latencyBuckets  = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	deliveryBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
)

// New returns the metrics on a fresh registry, with the Go runtime and
// process collectors. Every labelled series starts at zero, so a rate is
// defined from the first scrape on.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	f := func(c prometheus.Collector) { reg.MustRegister(c) }
	m := &Metrics{
		reg: reg,
		triggers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rendezvous_triggers_total",
			Help: "trigger calls that returned a run; created=\"false\" when the id existed already.",
		}, []string{"created"}),
		notifies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rendezvous_notifies_total",
			Help: "notify calls by kind (broadcast, targeted, step) and result (resolved, lookback, none, deduplicated, error).",
		}, []string{"kind", "result"}),
		notifyDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rendezvous_notify_duration_seconds",
			Help:    "Time of a notify call in the engine, transaction retries included.",
			Buckets: latencyBuckets,
		}, []string{"kind"}),
		waitersEnded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rendezvous_waiters_ended_total",
			Help: "Waiters that left WAITING, by outcome (notified, timed_out, canceled; removed: a waiter without a step deleted because its subscriber left or its replica died).",
		}, []string{"outcome"}),
		lookbackEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rendezvous_lookback_events_total",
			Help: "Lookback events by step of their life: stored, consumed, expired (purged unconsumed), dropped (their run ended).",
		}, []string{"event"}),
		dbRetries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rendezvous_db_retries_total",
			Help: "Transactions run again after a conflict (deadlock, lock_wait, busy), and statements that failed because the database could not be reached (connection).",
		}, []string{"cause"}),
		graphqlErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rendezvous_graphql_errors_total",
			Help: "Errors sent to clients, by extensions.code.",
		}, []string{"code"}),
		operationTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rendezvous_graphql_operation_duration_seconds",
			Help:    "Time to answer a query or mutation, or to set up a subscription (register its waiter), by type.",
			Buckets: latencyBuckets,
		}, []string{"type"}),
		openConnections: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "rendezvous_open_connections",
			Help: "Open websocket connections and SSE streams.",
		}, []string{"transport"}),
		liveSubs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rendezvous_live_subscriptions",
			Help: "waitForEvent subscriptions on this replica whose waiter is registered and whose result has not been handed over yet.",
		}),
		deliveryDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "rendezvous_delivery_duration_seconds",
			Help:    "From a waiter's end (notified, timed out, canceled) to its subscription's result being handed to the transport.",
			Buckets: deliveryBuckets,
		}),
		waitersWaiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rendezvous_waiters_waiting",
			Help: "Waiters WAITING before their deadline, in the whole database (sampled).",
		}),
		lookbackPending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rendezvous_lookback_events_pending",
			Help: "Lookback events neither consumed nor expired, in the whole database (sampled).",
		}),
	}
	for _, c := range []prometheus.Collector{
		m.triggers, m.notifies, m.notifyDuration, m.waitersEnded, m.lookbackEvents, m.dbRetries,
		m.graphqlErrors, m.operationTime, m.openConnections, m.liveSubs, m.deliveryDuration,
		m.waitersWaiting, m.lookbackPending,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		f(c)
	}
	for _, v := range triggerCreated {
		m.triggers.WithLabelValues(v)
	}
	for _, k := range notifyKinds {
		m.notifyDuration.WithLabelValues(k)
		for _, r := range notifyResults {
			m.notifies.WithLabelValues(k, r)
		}
	}
	for _, o := range waiterOutcomes {
		m.waitersEnded.WithLabelValues(o)
	}
	for _, s := range lookbackSteps {
		m.lookbackEvents.WithLabelValues(s)
	}
	for _, c := range retryCauses {
		m.dbRetries.WithLabelValues(c)
	}
	for _, c := range ErrorCodes {
		m.graphqlErrors.WithLabelValues(c)
	}
	for _, t := range operationTypes {
		m.operationTime.WithLabelValues(t)
	}
	for _, t := range transports {
		m.openConnections.WithLabelValues(t)
	}
	m.outbox = newOutboxMetrics(reg)
	return m
}

// Registry is the registry the metrics live on (for tests and for adding
// collectors).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// bounded returns v if it is one of the allowed values, else "other".
func bounded(v string, allowed []string) string {
	for _, a := range allowed {
		if v == a {
			return v
		}
	}
	return other
}

// ---- engine.Recorder

func (m *Metrics) RunTriggered(created bool) {
	if created {
		m.triggers.WithLabelValues("true").Inc()
	} else {
		m.triggers.WithLabelValues("false").Inc()
	}
}

func (m *Metrics) NotifyDone(kind engine.NotifyKind, result engine.NotifyOutcome, d time.Duration) {
	k := bounded(string(kind), notifyKinds)
	m.notifies.WithLabelValues(k, bounded(string(result), notifyResults)).Inc()
	m.notifyDuration.WithLabelValues(k).Observe(d.Seconds())
}

func (m *Metrics) WaitersEnded(outcome engine.WaiterOutcome, n int) {
	if n > 0 {
		m.waitersEnded.WithLabelValues(bounded(string(outcome), waiterOutcomes)).Add(float64(n))
	}
}

func (m *Metrics) LookbackEvents(step engine.LookbackStep, n int) {
	if n > 0 {
		m.lookbackEvents.WithLabelValues(bounded(string(step), lookbackSteps)).Add(float64(n))
	}
}

func (m *Metrics) Backlog(waiting, pendingLookbackEvents int64) {
	m.waitersWaiting.Set(float64(waiting))
	m.lookbackPending.Set(float64(pendingLookbackEvents))
}

// ---- storage.Observer

func (m *Metrics) DBRetry(cause string) {
	m.dbRetries.WithLabelValues(bounded(cause, retryCauses)).Inc()
}

// ---- graph.Recorder

func (m *Metrics) GraphQLError(code string) {
	m.graphqlErrors.WithLabelValues(bounded(code, ErrorCodes)).Inc()
}

func (m *Metrics) OperationDone(operation string, d time.Duration) {
	m.operationTime.WithLabelValues(bounded(operation, operationTypes)).Observe(d.Seconds())
}

func (m *Metrics) ConnectionOpened(transport string) {
	m.openConnections.WithLabelValues(bounded(transport, transports)).Inc()
}

func (m *Metrics) ConnectionClosed(transport string) {
	m.openConnections.WithLabelValues(bounded(transport, transports)).Dec()
}

func (m *Metrics) SubscriptionStarted() { m.liveSubs.Inc() }
func (m *Metrics) SubscriptionEnded()   { m.liveSubs.Dec() }

func (m *Metrics) Delivered(d time.Duration) { m.deliveryDuration.Observe(d.Seconds()) }

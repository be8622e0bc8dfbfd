package metrics

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"rendezvous/bus"
)

// BusSource is the bus between replicas, read at each scrape.
type BusSource interface {
	Status() bus.Status
	Stats() bus.Stats
}

var (
	busUpDesc = prometheus.NewDesc("rendezvous_bus_up",
		"1 while the Redis subscription between replicas is live; 0 while Redis is unreachable (wake-ups between replicas then wait for the catch-up poll).",
		nil, nil)
	busWakeupsDesc = prometheus.NewDesc("rendezvous_bus_wakeups_total",
		"Waiter ends through Redis, by direction: published to the other replicas, received from them, dropped (Redis down or slow; the catch-up poll covers them).",
		[]string{"direction"}, nil)
)

type busCollector struct{ src BusSource }

func (c busCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- busUpDesc
	ch <- busWakeupsDesc
}

func (c busCollector) Collect(ch chan<- prometheus.Metric) {
	up := 0.0
	if c.src.Status().State == bus.StateUp {
		up = 1
	}
	ch <- prometheus.MustNewConstMetric(busUpDesc, prometheus.GaugeValue, up)
	s := c.src.Stats()
	for _, d := range []struct {
		name string
		n    uint64
	}{{"published", s.Published}, {"received", s.Received}, {"dropped", s.Dropped}} {
		ch <- prometheus.MustNewConstMetric(busWakeupsDesc, prometheus.CounterValue, float64(d.n), d.name)
	}
}

// ObserveBus exports the bus's state and counts. Metrics shared by several
// services (tests) export the first bus they were given.
func (m *Metrics) ObserveBus(src BusSource) {
	var already prometheus.AlreadyRegisteredError
	if err := m.reg.Register(busCollector{src}); err != nil && !errors.As(err, &already) {
		panic(err) // a programming error: the descriptors above are fixed
	}
}

package main

// Garbage-collection figures of a server process over a measured window,
// from runtime/metrics: read in this process for Rendezvous, and through
// the peer process's bench-only endpoint for the peer. Both use this code.

import (
	"fmt"
	"math"
	"runtime/metrics"
	"time"
)

// gcSample is a cumulative reading of the runtime's GC metrics.
type gcSample struct {
	// Pauses is /sched/pauses/total/gc:seconds: the stop-the-world
	// pauses of the GC (stopping and stopped), as counts per bucket;
	// Bounds[i] is the upper bound of bucket i (MaxFloat64 for +Inf).
	Pauses []uint64  `json:"pauses"`
	Bounds []float64 `json:"bounds"`
	// The /cpu/classes metrics, in seconds. The runtime updates them at
	// the end of each GC cycle, so a window's deltas cover the cycles
	// that ended in it.
	Assist  float64 `json:"assist"`  // /cpu/classes/gc/mark/assist
	GCTotal float64 `json:"gcTotal"` // /cpu/classes/gc/total
	Total   float64 `json:"total"`   // /cpu/classes/total (GOMAXPROCS × wall)
	Idle    float64 `json:"idle"`    // /cpu/classes/idle
	Cycles  uint64  `json:"cycles"`  // /gc/cycles/total
	// HeapGoal is /gc/heap/goal:bytes at the time of the reading.
	HeapGoal uint64 `json:"heapGoal"`
	// GOGC and MemLimit are the process's GC settings (/gc/gogc:percent,
	// /gc/gomemlimit:bytes).
	GOGC     uint64 `json:"gogc"`
	MemLimit uint64 `json:"memLimit"`
}

var gcMetricNames = []string{
	"/sched/pauses/total/gc:seconds",
	"/cpu/classes/gc/mark/assist:cpu-seconds",
	"/cpu/classes/gc/total:cpu-seconds",
	"/cpu/classes/total:cpu-seconds",
	"/cpu/classes/idle:cpu-seconds",
	"/gc/cycles/total:gc-cycles",
	"/gc/heap/goal:bytes",
	"/gc/gogc:percent",
	"/gc/gomemlimit:bytes",
}

// readGC reads the GC metrics of this process.
func readGC() gcSample {
	ss := make([]metrics.Sample, len(gcMetricNames))
	for i, n := range gcMetricNames {
		ss[i].Name = n
	}
	metrics.Read(ss)
	var g gcSample
	if ss[0].Value.Kind() == metrics.KindFloat64Histogram {
		h := ss[0].Value.Float64Histogram()
		g.Pauses = append([]uint64(nil), h.Counts...)
		for _, b := range h.Buckets[1:] { // bucket i spans Buckets[i] .. Buckets[i+1]
			if math.IsInf(b, 1) {
				b = math.MaxFloat64
			}
			g.Bounds = append(g.Bounds, b)
		}
	}
	f := func(i int) float64 {
		if ss[i].Value.Kind() == metrics.KindFloat64 {
			return ss[i].Value.Float64()
		}
		return 0
	}
	u := func(i int) uint64 {
		if ss[i].Value.Kind() == metrics.KindUint64 {
			return ss[i].Value.Uint64()
		}
		return 0
	}
	g.Assist, g.GCTotal, g.Total, g.Idle = f(1), f(2), f(3), f(4)
	g.Cycles, g.HeapGoal, g.GOGC, g.MemLimit = u(5), u(6), u(7), u(8)
	return g
}

// gcWindow is what the GC did between two readings.
type gcWindow struct {
	measured  bool
	cycles    uint64
	pauses    uint64
	maxPause  time.Duration // upper bound of the longest pause's histogram bucket
	assist    float64       // share of the CPU the process used (total − idle)
	gcShare   float64       // all GC work, same share
	heapGoal  uint64        // at the end
	settings  string        // GOGC and GOMEMLIMIT
	cpuCovers time.Duration // the span the CPU classes cover (GC cycle to GC cycle)
}

func gcBetween(a, b gcSample) gcWindow {
	w := gcWindow{measured: true, cycles: b.Cycles - a.Cycles, heapGoal: b.HeapGoal, settings: gcSettings(b)}
	if len(a.Pauses) == len(b.Pauses) && len(b.Bounds) == len(b.Pauses) {
		for i := range b.Pauses {
			d := b.Pauses[i] - a.Pauses[i]
			if d == 0 {
				continue
			}
			w.pauses += d
			w.maxPause = time.Duration(b.Bounds[i] * float64(time.Second))
		}
	}
	used := (b.Total - b.Idle) - (a.Total - a.Idle)
	if used > 0 {
		w.assist = (b.Assist - a.Assist) / used
		w.gcShare = (b.GCTotal - a.GCTotal) / used
	}
	w.cpuCovers = time.Duration((b.Total - a.Total) * float64(time.Second))
	return w
}

func (w gcWindow) String() string {
	if !w.measured {
		return "not measured"
	}
	if w.cycles == 0 {
		return fmt.Sprintf("no GC cycle (heap goal %s; %s)", fmtBytes(w.heapGoal), w.settings)
	}
	return fmt.Sprintf("%d GC cycles, longest stop %s (%d stops), mark assist %.1f%% and all GC work %.1f%% of the process's CPU, heap goal %s; %s",
		w.cycles, fmtDur(w.maxPause), w.pauses, 100*w.assist, 100*w.gcShare, fmtBytes(w.heapGoal), w.settings)
}

func gcSettings(g gcSample) string {
	gogc := fmt.Sprint(g.GOGC)
	if g.GOGC == math.MaxUint64 || g.GOGC > 1<<40 {
		gogc = "off"
	}
	limit := "none"
	if g.MemLimit < math.MaxInt64 {
		limit = fmtBytes(g.MemLimit)
	}
	return fmt.Sprintf("GOGC %s, GOMEMLIMIT %s", gogc, limit)
}

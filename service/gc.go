package service

import (
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
)

// Garbage collection for a server that holds many idle subscriptions.
//
// Most of such a server's heap is live and long-lived (the state of every
// open subscription), and a collection marks all of it however little was
// allocated since the last one. With Go's default (GOGC=100) a collection
// starts each time the heap has grown by as much as is live, so the more
// subscriptions are open, the more of the CPU goes to marking the same
// idle state again, and the more often deliveries run beside a mark phase
// (write barriers, mark assists, the mark workers' share of the CPU).
//
// RENDEZVOUS_MEMORY_LIMIT sets the runtime's soft memory limit (as
// GOMEMLIMIT does) to a size or to a share of the container's memory, and
// then, unless GOGC says otherwise, the GC target is raised to
// DefaultGCPercentWithLimit: collections come several times less often,
// and the limit, not the live heap, bounds how far the heap grows. Without
// a limit nothing is changed (a higher GOGC alone could grow the heap past
// what the machine has).

// DefaultGCPercentWithLimit is the GC target (GOGC) set when a memory limit
// is in effect and GOGC is not set.
const DefaultGCPercentWithLimit = 400

// GCConfig is what the environment says about garbage collection.
type GCConfig struct {
	// MemoryLimit in bytes (0: none) from RENDEZVOUS_MEMORY_LIMIT; Source
	// names the setting it came from, for the start-up line.
	MemoryLimit int64
	Source      string
	// GOMEMLIMIT and GOGC as set (the runtime applies them itself).
	GOMEMLIMIT, GOGC string
}

// GCConfigFromEnv reads RENDEZVOUS_MEMORY_LIMIT: a size with a unit as in
// GOMEMLIMIT (B, KiB, MiB, GiB, TiB; KB, MB, GB, TB in powers of 1000) or a
// percentage of the memory this process may use (the cgroup's limit, else
// the machine's memory), such as "80%".
func GCConfigFromEnv(getenv func(string) string) (GCConfig, error) {
	c := GCConfig{GOMEMLIMIT: getenv("GOMEMLIMIT"), GOGC: getenv("GOGC")}
	v := strings.TrimSpace(getenv("RENDEZVOUS_MEMORY_LIMIT"))
	if v == "" {
		return c, nil
	}
	if c.GOMEMLIMIT != "" {
		return c, fmt.Errorf("RENDEZVOUS_MEMORY_LIMIT %q and GOMEMLIMIT %q are both set: set one", v, c.GOMEMLIMIT)
	}
	if pct, ok := strings.CutSuffix(v, "%"); ok {
		p, err := strconv.ParseFloat(strings.TrimSpace(pct), 64)
		if err != nil || p <= 0 || p > 100 {
			return c, fmt.Errorf("RENDEZVOUS_MEMORY_LIMIT %q: want a percentage above 0 and at most 100", v)
		}
		total, from := availableMemory()
		if total <= 0 {
			return c, fmt.Errorf("RENDEZVOUS_MEMORY_LIMIT %q: the memory available could not be read; give a size such as 1500MiB", v)
		}
		c.MemoryLimit = int64(float64(total) * p / 100)
		c.Source = fmt.Sprintf("RENDEZVOUS_MEMORY_LIMIT=%s of %s (%d bytes)", v, from, total)
		return c, nil
	}
	n, err := parseByteSize(v)
	if err != nil || n <= 0 {
		return c, fmt.Errorf("RENDEZVOUS_MEMORY_LIMIT %q: want a size such as 1500MiB or 2GB, or a percentage such as 80%%", v)
	}
	c.MemoryLimit = n
	c.Source = "RENDEZVOUS_MEMORY_LIMIT=" + v
	return c, nil
}

// ApplyGC sets the memory limit and GC target that c calls for, process
// wide, and logs what is in effect. It returns the GC percent it set (0:
// left as the runtime had it).
func ApplyGC(c GCConfig, log *slog.Logger) int {
	if c.MemoryLimit > 0 {
		debug.SetMemoryLimit(c.MemoryLimit)
	}
	limit := debug.SetMemoryLimit(-1) // reads it
	if limit == math.MaxInt64 {
		if c.GOGC == "" {
			log.Info("garbage collection: Go defaults (GOGC=100, no memory limit); with many open subscriptions, set RENDEZVOUS_MEMORY_LIMIT (see README)")
		}
		return 0
	}
	set := 0
	if c.GOGC == "" {
		debug.SetGCPercent(DefaultGCPercentWithLimit)
		set = DefaultGCPercentWithLimit
	}
	source := c.Source
	if source == "" {
		source = "GOMEMLIMIT=" + c.GOMEMLIMIT
	}
	gogc := c.GOGC
	if gogc == "" {
		gogc = strconv.Itoa(set)
	}
	log.Info("garbage collection", "memory_limit_bytes", limit, "from", source, "gogc", gogc)
	return set
}

// parseByteSize parses a size as GOMEMLIMIT does, plus KB, MB, GB and TB.
func parseByteSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   float64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
		{"B", 1},
	}
	mult := 1.0
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(n), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, err
	}
	if f < 0 || f*mult >= math.MaxInt64 || math.IsNaN(f) {
		return 0, fmt.Errorf("out of range")
	}
	return int64(f * mult), nil
}

// availableMemory is the cgroup's memory limit when there is one, else the
// machine's memory; 0 when neither can be read.
func availableMemory() (int64, string) {
	for _, f := range []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		v := strings.TrimSpace(string(b))
		n, err := strconv.ParseInt(v, 10, 64)
		// "max", or v1's "no limit" (a huge number rounded to the page).
		if err == nil && n > 0 && n < 1<<60 {
			return n, "the cgroup's memory limit"
		}
	}
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			f := strings.Fields(rest)
			if len(f) == 2 && f[1] == "kB" {
				if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return n << 10, "the machine's memory"
				}
			}
		}
	}
	return 0, ""
}

package service

import (
	"io"
	"log/slog"
	"math"
	"runtime/debug"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestGCConfigFromEnv(t *testing.T) {
	for _, tc := range []struct {
		v    string
		want int64
	}{
		{"1500MiB", 1500 << 20},
		{"2GiB", 2 << 30},
		{"2GB", 2e9},
		{"750 MB", 750e6},
		{"123456789", 123456789},
		{"64KiB", 64 << 10},
		{"1.5GiB", 3 << 29},
	} {
		c, err := GCConfigFromEnv(envOf(map[string]string{"RENDEZVOUS_MEMORY_LIMIT": tc.v}))
		require.NoError(t, err, tc.v)
		require.Equal(t, tc.want, c.MemoryLimit, tc.v)
	}

	c, err := GCConfigFromEnv(envOf(nil))
	require.NoError(t, err)
	require.Zero(t, c.MemoryLimit, "no limit unless asked")

	c, err = GCConfigFromEnv(envOf(map[string]string{"RENDEZVOUS_MEMORY_LIMIT": "50%"}))
	require.NoError(t, err)
	total, _ := availableMemory()
	require.Positive(t, total)
	require.InDelta(t, float64(total)/2, float64(c.MemoryLimit), 1)

	for _, bad := range []string{"lots", "-1GiB", "0", "0%", "150%", "x%", "12XB", "1e30GiB"} {
		_, err := GCConfigFromEnv(envOf(map[string]string{"RENDEZVOUS_MEMORY_LIMIT": bad}))
		require.Error(t, err, bad)
		require.Contains(t, err.Error(), "RENDEZVOUS_MEMORY_LIMIT", bad)
	}
	_, err = GCConfigFromEnv(envOf(map[string]string{"RENDEZVOUS_MEMORY_LIMIT": "1GiB", "GOMEMLIMIT": "2GiB"}))
	require.ErrorContains(t, err, "set one")
}

// ApplyGC changes process-wide settings: each case puts them back.
func TestApplyGC(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	restore := func() {
		debug.SetMemoryLimit(math.MaxInt64)
		debug.SetGCPercent(100)
	}
	restore()
	t.Cleanup(restore)

	// Nothing asked: Go's defaults stay.
	require.Zero(t, ApplyGC(GCConfig{}, log))
	require.Equal(t, int64(math.MaxInt64), debug.SetMemoryLimit(-1))
	require.Equal(t, 100, debug.SetGCPercent(100))

	// A limit without GOGC: the limit, and the higher GC target.
	require.Equal(t, DefaultGCPercentWithLimit, ApplyGC(GCConfig{MemoryLimit: 3 << 30, Source: "test"}, log))
	require.Equal(t, int64(3<<30), debug.SetMemoryLimit(-1))
	require.Equal(t, DefaultGCPercentWithLimit, debug.SetGCPercent(100))
	restore()

	// GOGC set by the operator: the limit only (the runtime applied GOGC).
	require.Zero(t, ApplyGC(GCConfig{MemoryLimit: 3 << 30, GOGC: "150"}, log))
	require.Equal(t, 100, debug.SetGCPercent(100))
	restore()

	// GOMEMLIMIT applied by the runtime (set here as it would have), no GOGC.
	debug.SetMemoryLimit(1 << 30)
	require.Equal(t, DefaultGCPercentWithLimit, ApplyGC(GCConfig{GOMEMLIMIT: "1GiB"}, log))
	require.Equal(t, DefaultGCPercentWithLimit, debug.SetGCPercent(100))
}

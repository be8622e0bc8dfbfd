package service

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// An ordinary build refuses the test clock's skew; a test build
// (-tags rendezvous_testclock) takes it. Run with and without the tag.
func TestConfigTestClockSkew(t *testing.T) {
	cfg, err := ConfigFromEnv(envOf(map[string]string{testClockSkewEnv: "-60s"}))
	if testClockBuild {
		require.NoError(t, err)
		require.Equal(t, -60*time.Second, cfg.Engine.ClockSkew)
		_, err = ConfigFromEnv(envOf(map[string]string{testClockSkewEnv: "a minute"}))
		require.ErrorContains(t, err, testClockSkewEnv)
		return
	}
	require.ErrorContains(t, err, "rendezvous_testclock")
	require.Zero(t, cfg.Engine.ClockSkew)
}

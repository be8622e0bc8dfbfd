package service

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestConfigFromEnvRateLimits(t *testing.T) {
	cfg, err := ConfigFromEnv(envOf(nil))
	require.NoError(t, err)
	require.Equal(t, float64(DefaultRateLimit), cfg.HTTP.RateLimit, "anonymous callers and run tokens")
	require.Zero(t, cfg.HTTP.ServerRateLimit, "server tokens: no limit by default")
	require.Empty(t, cfg.HTTP.TrustedProxies)

	cfg, err = ConfigFromEnv(envOf(map[string]string{
		"RENDEZVOUS_TOKENS":            "tok-a-0123456789abcdef;rate=1000;burst=2000,tok-b-0123456789abcdef",
		"RENDEZVOUS_SERVER_RATE_LIMIT": "5000",
		"RENDEZVOUS_TRUSTED_PROXIES":   "10.0.0.0/8, 192.168.0.10",
	}))
	require.NoError(t, err)
	require.Equal(t, []string{"tok-a-0123456789abcdef;rate=1000;burst=2000", "tok-b-0123456789abcdef"}, cfg.Auth.ServerTokens)
	require.Equal(t, 5000.0, cfg.HTTP.ServerRateLimit)
	require.Equal(t, 10000, cfg.HTTP.ServerRateBurst)
	require.Equal(t, "[10.0.0.0/8 192.168.0.10/32]", fmt.Sprint(cfg.HTTP.TrustedProxies))

	for k, v := range map[string]string{
		"RENDEZVOUS_SERVER_RATE_LIMIT": "-1",
		"RENDEZVOUS_TRUSTED_PROXIES":   "lb.internal",
	} {
		_, err := ConfigFromEnv(envOf(map[string]string{k: v}))
		require.ErrorContains(t, err, k)
	}
}

package service

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"rendezvous/auth"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestConfigFromEnvDefaults(t *testing.T) {
	cfg, err := ConfigFromEnv(envOf(nil))
	require.NoError(t, err)
	require.Equal(t, "sqlite://rendezvous.db", cfg.DatabaseURL)
	require.Equal(t, ":8080", cfg.Addr)
	require.True(t, cfg.Playground)
	require.Empty(t, cfg.Auth.ServerTokens)
	require.False(t, cfg.Auth.RequireTokens)
	require.Equal(t, float64(DefaultRateLimit), cfg.HTTP.RateLimit)
	require.Equal(t, 2*DefaultRateLimit, cfg.HTTP.RateBurst)
	require.Empty(t, cfg.MetricsAddr, "/metrics on the main port")
	require.Nil(t, cfg.MetricsTokenRequired, "token requirement decided from the tokens")
}

func TestConfigFromEnvSetsEverything(t *testing.T) {
	tokens := filepath.Join(t.TempDir(), "tokens")
	require.NoError(t, os.WriteFile(tokens, []byte("# ops\nfile-token-0123456789\n\n"), 0o600))
	cfg, err := ConfigFromEnv(envOf(map[string]string{
		"DATABASE_URL":                                "mysql://u:p@db:3306/x",
		"PORT":                                        "9090",
		"REDIS_URL":                                   "redis://r:6379/0",
		"RENDEZVOUS_DEFAULT_TIMEOUT":                  "1h",
		"RENDEZVOUS_MAX_TIMEOUT":                      "30d",
		"RENDEZVOUS_LOOKBACK_RETENTION":               "2d",
		"RENDEZVOUS_RUN_RETENTION":                    "90d",
		"RENDEZVOUS_MAX_PAYLOAD_BYTES":                "4096",
		"RENDEZVOUS_MAX_EVENT_ID_BYTES":               "64",
		"RENDEZVOUS_PLAYGROUND":                       "false",
		"RENDEZVOUS_TOKENS":                           "env-token-0123456789, second-token-0123456",
		"RENDEZVOUS_TOKENS_FILE":                      tokens,
		"RENDEZVOUS_REQUIRE_TOKENS":                   "true",
		"RENDEZVOUS_SECRET":                           "new-secret,old-secret",
		"RENDEZVOUS_RUN_TOKEN_TTL":                    "12h",
		"RENDEZVOUS_ALLOWED_ORIGINS":                  "https://a.example, https://b.example",
		"RENDEZVOUS_RATE_LIMIT":                       "0",
		"RENDEZVOUS_MAX_QUERY_DEPTH":                  "7",
		"RENDEZVOUS_MAX_ALIASES":                      "3",
		"RENDEZVOUS_INIT_TIMEOUT":                     "2s",
		"RENDEZVOUS_MAX_BODY_BYTES":                   "10000",
		"RENDEZVOUS_KEEPALIVE":                        "5s",
		"RENDEZVOUS_MAX_COMPLEXITY":                   "100",
		"RENDEZVOUS_MAX_QUERY_TOKENS":                 "900",
		"RENDEZVOUS_CATCHUP_INTERVAL":                 "500ms",
		"RENDEZVOUS_SWEEP_INTERVAL":                   "3s",
		"RENDEZVOUS_PLAYGROUND_ASSETS":                "https://assets.example/npm",
		"RENDEZVOUS_MAX_SUBSCRIPTIONS_PER_CONNECTION": "10",
		"RENDEZVOUS_METRICS_ADDR":                     ":9090",
		"RENDEZVOUS_METRICS_TOKEN_REQUIRED":           "true",
		"RENDEZVOUS_METRICS_INTERVAL":                 "30s",
	}))
	require.NoError(t, err)
	require.Equal(t, ":9090", cfg.Addr)
	require.Equal(t, "redis://r:6379/0", cfg.RedisURL)
	require.Equal(t, time.Hour, cfg.Engine.DefaultTimeout)
	require.Equal(t, 30*24*time.Hour, cfg.Engine.MaxTimeout)
	require.Equal(t, 48*time.Hour, cfg.Engine.LookbackRetention)
	require.Equal(t, 90*24*time.Hour, cfg.Engine.RunRetention)
	require.Equal(t, 4096, cfg.Engine.MaxPayloadBytes)
	require.Equal(t, 64, cfg.Engine.MaxIDBytes)
	require.False(t, cfg.Playground)
	require.Equal(t, []string{"env-token-0123456789", "second-token-0123456", "file-token-0123456789"}, cfg.Auth.ServerTokens)
	require.True(t, cfg.Auth.RequireTokens)
	require.Equal(t, []string{"new-secret", "old-secret"}, cfg.Auth.Secrets)
	require.Equal(t, 12*time.Hour, cfg.Auth.RunTokenTTL)
	require.Equal(t, []string{"https://a.example", "https://b.example"}, cfg.HTTP.AllowedOrigins)
	require.Zero(t, cfg.HTTP.RateLimit)
	require.Equal(t, 7, cfg.HTTP.MaxDepth)
	require.Equal(t, 3, cfg.HTTP.MaxAliases)
	require.Equal(t, 2*time.Second, cfg.HTTP.InitTimeout)
	require.Equal(t, int64(10000), cfg.HTTP.MaxBodyBytes)
	require.Equal(t, 500*time.Millisecond, cfg.Engine.CatchUpInterval)
	require.Equal(t, 10, cfg.HTTP.MaxSubscriptionsPerConnection)
	require.Equal(t, "https://assets.example/npm", cfg.PlaygroundAssets)
	require.Equal(t, ":9090", cfg.MetricsAddr)
	require.NotNil(t, cfg.MetricsTokenRequired)
	require.True(t, *cfg.MetricsTokenRequired)
	require.Equal(t, 30*time.Second, cfg.Engine.GaugeInterval)
}

func TestConfigFromEnvRejectsNonsense(t *testing.T) {
	for name, env := range map[string]map[string]string{
		"port":      {"PORT": "http"},
		"timeout":   {"RENDEZVOUS_MAX_TIMEOUT": "forever"},
		"negative":  {"RENDEZVOUS_LOOKBACK_RETENTION": "-1h"},
		"retention": {"RENDEZVOUS_RUN_RETENTION": "0s"},
		"payload":   {"RENDEZVOUS_MAX_PAYLOAD_BYTES": "-5"},
		"playgound": {"RENDEZVOUS_PLAYGROUND": "maybe"},
		"idbytes":   {"RENDEZVOUS_MAX_EVENT_ID_BYTES": "1000"},
		"rate":      {"RENDEZVOUS_RATE_LIMIT": "fast"},
		"require":   {"RENDEZVOUS_REQUIRE_TOKENS": "yes please"},
		"tokenfile": {"RENDEZVOUS_TOKENS_FILE": "/nonexistent/tokens"},
		"metrics":   {"RENDEZVOUS_METRICS_ADDR": "9090"},
		"mtoken":    {"RENDEZVOUS_METRICS_TOKEN_REQUIRED": "sometimes"},
		"minterval": {"RENDEZVOUS_METRICS_INTERVAL": "often"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ConfigFromEnv(envOf(env))
			require.Error(t, err)
		})
	}
}

func TestNewRefusesToRunOpenWhenTokensRequired(t *testing.T) {
	_, err := New(t.Context(), Config{DatabaseURL: "sqlite://" + filepath.Join(t.TempDir(), "x.db"), Auth: authRequired()})
	require.ErrorContains(t, err, "tokens are required")
}

func authRequired() (c auth.Config) {
	c.RequireTokens = true
	return c
}

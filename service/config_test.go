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
		"RENDEZVOUS_LISTEN":                           "0.0.0.0:9090",
		"RENDEZVOUS_BUS_CHANNEL":                      "prod-eu",
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
	require.Equal(t, "0.0.0.0:9090", cfg.Addr)
	require.Equal(t, "redis://r:6379/0", cfg.RedisURL)
	require.Equal(t, "prod-eu", cfg.Bus.Channel)
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

// Every way of naming the listen addresses, with and without tokens: a
// named host is kept; no host means loopback for an endpoint that needs no
// token, and every interface for one that does.
func TestConfigListenAddresses(t *testing.T) {
	const token = "server-token-0123456789"
	for _, tc := range []struct {
		name         string
		env          map[string]string
		api, metrics string
	}{
		{"defaults open", nil, "127.0.0.1:8080", ""},
		{"defaults with tokens", map[string]string{"RENDEZVOUS_TOKENS": token}, ":8080", ""},
		{"PORT open", map[string]string{"PORT": "9000"}, "127.0.0.1:9000", ""},
		{"PORT with tokens", map[string]string{"PORT": "9000", "RENDEZVOUS_TOKENS": token}, ":9000", ""},
		{"LISTEN all interfaces open", map[string]string{"RENDEZVOUS_LISTEN": "0.0.0.0:8081"}, "0.0.0.0:8081", ""},
		{"LISTEN all interfaces with tokens", map[string]string{"RENDEZVOUS_LISTEN": "0.0.0.0:8081", "RENDEZVOUS_TOKENS": token}, "0.0.0.0:8081", ""},
		{"LISTEN all v6 interfaces open", map[string]string{"RENDEZVOUS_LISTEN": "[::]:8081"}, "[::]:8081", ""},
		{"LISTEN port only open", map[string]string{"RENDEZVOUS_LISTEN": ":8081"}, "127.0.0.1:8081", ""},
		{"LISTEN port only with tokens", map[string]string{"RENDEZVOUS_LISTEN": ":8081", "RENDEZVOUS_TOKENS": token}, ":8081", ""},
		{"LISTEN v6 loopback", map[string]string{"RENDEZVOUS_LISTEN": "[::1]:8081"}, "[::1]:8081", ""},
		{"LISTEN localhost", map[string]string{"RENDEZVOUS_LISTEN": "localhost:8081"}, "localhost:8081", ""},
		{"LISTEN an interface", map[string]string{"RENDEZVOUS_LISTEN": "10.1.2.3:8081"}, "10.1.2.3:8081", ""},
		{"LISTEN and the same PORT", map[string]string{"RENDEZVOUS_LISTEN": "0.0.0.0:8081", "PORT": "8081"}, "0.0.0.0:8081", ""},
		{"port 0 open", map[string]string{"PORT": "0"}, "127.0.0.1:0", ""},
		{"metrics port only open", map[string]string{"RENDEZVOUS_METRICS_ADDR": ":9090"}, "127.0.0.1:8080", "127.0.0.1:9090"},
		// A separate metrics port needs no token by default: loopback
		// even when the API has tokens.
		{"metrics port only with tokens", map[string]string{"RENDEZVOUS_METRICS_ADDR": ":9090", "RENDEZVOUS_TOKENS": token}, ":8080", "127.0.0.1:9090"},
		{"metrics port only, token required", map[string]string{"RENDEZVOUS_METRICS_ADDR": ":9090", "RENDEZVOUS_TOKENS": token, "RENDEZVOUS_METRICS_TOKEN_REQUIRED": "true"}, ":8080", ":9090"},
		{"metrics port only, token not required", map[string]string{"RENDEZVOUS_METRICS_ADDR": ":9090", "RENDEZVOUS_TOKENS": token, "RENDEZVOUS_METRICS_TOKEN_REQUIRED": "false"}, ":8080", "127.0.0.1:9090"},
		{"metrics all interfaces open", map[string]string{"RENDEZVOUS_METRICS_ADDR": "0.0.0.0:9090"}, "127.0.0.1:8080", "0.0.0.0:9090"},
		{"metrics loopback named", map[string]string{"RENDEZVOUS_METRICS_ADDR": "127.0.0.1:9090", "RENDEZVOUS_TOKENS": token}, ":8080", "127.0.0.1:9090"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := ConfigFromEnv(envOf(tc.env))
			require.NoError(t, err)
			api, metrics := cfg.listenAddrs(len(cfg.Auth.ServerTokens) == 0)
			require.Equal(t, tc.api, api)
			require.Equal(t, tc.metrics, metrics)
		})
	}
}

func TestConfigListenRejectsNonsense(t *testing.T) {
	for name, env := range map[string]map[string]string{
		"no port":          {"RENDEZVOUS_LISTEN": "127.0.0.1"},
		"port only":        {"RENDEZVOUS_LISTEN": "8080"},
		"named port":       {"RENDEZVOUS_LISTEN": ":http"},
		"port too large":   {"RENDEZVOUS_LISTEN": "0.0.0.0:70000"},
		"v6 without []":    {"RENDEZVOUS_LISTEN": "::1:8080"},
		"ports disagree":   {"RENDEZVOUS_LISTEN": "0.0.0.0:8081", "PORT": "9000"},
		"bad PORT":         {"PORT": "80 80"},
		"metrics no port":  {"RENDEZVOUS_METRICS_ADDR": "127.0.0.1:"},
		"metrics too high": {"RENDEZVOUS_METRICS_ADDR": ":99999"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ConfigFromEnv(envOf(env))
			require.Error(t, err)
		})
	}
}

func TestConfigBusChannel(t *testing.T) {
	cfg, err := ConfigFromEnv(envOf(map[string]string{"RENDEZVOUS_BUS_CHANNEL": " team-a:prod "}))
	require.NoError(t, err)
	require.Equal(t, "team-a:prod", cfg.Bus.Channel)
	cfg, err = ConfigFromEnv(envOf(nil))
	require.NoError(t, err)
	require.Empty(t, cfg.Bus.Channel, "derived from the database when unset")
}

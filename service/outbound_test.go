package service

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestOutboundConfigFromEnv(t *testing.T) {
	cfg, err := ConfigFromEnv(envOf(map[string]string{
		"RENDEZVOUS_OUTBOUND_ALLOWED":    "https://fn.example.com/wf, http://127.0.0.1:3000/",
		"RENDEZVOUS_SIGNING_SECRET":      "new-secret-0123456789, old-secret-0123456789",
		"RENDEZVOUS_OUTBOUND_RETRY_BASE": "500ms",
		"RENDEZVOUS_OUTBOUND_RETRY_MAX":  "2m",
		"RENDEZVOUS_OUTBOUND_TIMEOUT":    "10s",
	}))
	require.NoError(t, err)
	require.Equal(t, []string{"new-secret-0123456789", "old-secret-0123456789"}, cfg.Outbound.SigningSecrets)
	require.Equal(t, 500*time.Millisecond, cfg.Engine.Outbound.RetryBase)
	require.Equal(t, 2*time.Minute, cfg.Engine.Outbound.RetryMax)
	require.Equal(t, 10*time.Second, cfg.Outbound.Delivery.Timeout)

	for _, bad := range []map[string]string{
		{"RENDEZVOUS_OUTBOUND_RETRY_BASE": "0s"},
		{"RENDEZVOUS_OUTBOUND_RETRY_MAX": "soon"},
		{"RENDEZVOUS_OUTBOUND_TIMEOUT": "-1s"},
	} {
		_, err := ConfigFromEnv(envOf(bad))
		require.Error(t, err, "%v", bad)
	}
}

// An allow-list without a signing secret, or a malformed allow-list,
// refuses to start (fail closed), and the error never shows a secret.
func TestNewRefusesUnsignedOrMalformedOutbound(t *testing.T) {
	for _, c := range []struct {
		allowed string
		secrets []string
	}{
		{"https://fn.example.com/", nil},
		{"https://fn.example.com/", []string{"too-short"}},
		{"ftp://fn.example.com/", []string{"long-enough-secret-0123"}},
		{"https://user:pw@fn.example.com/", []string{"long-enough-secret-0123"}},
	} {
		cfg := Config{DatabaseURL: "sqlite://" + t.TempDir() + "/x.db"}
		cfg.Outbound.Allowed, cfg.Outbound.SigningSecrets = c.allowed, c.secrets
		_, err := New(context.Background(), cfg)
		require.Error(t, err, "%+v", c)
		require.NotContains(t, err.Error(), "too-short")
		require.NotContains(t, err.Error(), "pw@")
	}
}

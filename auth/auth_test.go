package auth

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

var (
	secretA = strings.Repeat("a", 32)
	secretB = strings.Repeat("b", 32)
	token1  = "server-token-0123456789"
)

func TestServerTokens(t *testing.T) {
	a, err := New(Config{ServerTokens: []string{token1, " other-token-0123456789 "}})
	require.NoError(t, err)
	require.False(t, a.Open())
	now := time.Now()
	for _, h := range []string{token1, "Bearer " + token1, "bearer  " + token1 + " ", "other-token-0123456789"} {
		p, err := a.Authenticate(h, now)
		require.NoError(t, err, h)
		require.Equal(t, Server, p.Kind)
		require.True(t, p.FullAccess())
		require.NotContains(t, p.Key, token1, "the rate-limit key must not hold the token")
	}
	for _, h := range []string{"", "Bearer", "Bearer ", token1 + "x", strings.ToUpper(token1), "Basic " + token1, strings.Repeat("x", 10000)} {
		_, err := a.Authenticate(h, now)
		require.ErrorIs(t, err, ErrUnauthenticated, "%q", h)
	}
}

func TestOpenServer(t *testing.T) {
	a, err := New(Config{Secrets: []string{secretA}})
	require.NoError(t, err)
	require.True(t, a.Open())
	p, err := a.Authenticate("", time.Now())
	require.NoError(t, err)
	require.Equal(t, Anonymous, p.Kind)
	// A token that is given must still be valid.
	_, err = a.Authenticate("Bearer nonsense", time.Now())
	require.ErrorIs(t, err, ErrUnauthenticated)
}

func TestConfigValidation(t *testing.T) {
	_, err := New(Config{RequireTokens: true})
	require.ErrorContains(t, err, "required")
	_, err = New(Config{ServerTokens: []string{"short"}})
	require.Error(t, err)
	_, err = New(Config{Secrets: []string{"short"}})
	require.Error(t, err)
}

func TestRunTokens(t *testing.T) {
	a, err := New(Config{ServerTokens: []string{token1}, Secrets: []string{secretA}, RunTokenTTL: time.Hour})
	require.NoError(t, err)
	now := time.Now()
	tok, exp, ok := a.RunToken("wfr_order.1", now)
	require.True(t, ok)
	require.WithinDuration(t, now.Add(time.Hour), exp, time.Second)

	p, err := a.Authenticate("Bearer "+tok, now)
	require.NoError(t, err)
	require.Equal(t, Run, p.Kind)
	require.Equal(t, "wfr_order.1", p.RunID)
	require.False(t, p.FullAccess())
	require.Equal(t, exp, p.Expires)

	// Expired.
	_, err = a.Authenticate(tok, exp)
	require.ErrorIs(t, err, ErrUnauthenticated)

	// Tampered: another run, another expiry, another signature.
	parts := strings.Split(tok, ".")
	forged := []string{
		strings.Join([]string{parts[0], b64.EncodeToString([]byte("wfr_other")), parts[2], parts[3]}, "."),
		strings.Join([]string{parts[0], parts[1], "99999999999", parts[3]}, "."),
		strings.Join([]string{parts[0], parts[1], parts[2], b64.EncodeToString(make([]byte, 32))}, "."),
		tok + "x", "rt1.", "rt1...", "rt1.a.b.c.d",
	}
	for _, f := range forged {
		_, err := a.Authenticate(f, now)
		require.ErrorIs(t, err, ErrUnauthenticated, f)
	}

	// Signed with another secret.
	other, _ := New(Config{Secrets: []string{secretB}})
	tokB, _, _ := other.RunToken("wfr_order.1", now)
	_, err = a.Authenticate(tokB, now)
	require.ErrorIs(t, err, ErrUnauthenticated)
}

func TestRunTokenSecretRotation(t *testing.T) {
	now := time.Now()
	old, _ := New(Config{Secrets: []string{secretA}})
	oldTok, _, _ := old.RunToken("wfr_r", now)

	rotated, err := New(Config{Secrets: []string{secretB, secretA}})
	require.NoError(t, err)
	_, err = rotated.Authenticate(oldTok, now)
	require.NoError(t, err, "the old secret still verifies")
	newTok, _, _ := rotated.RunToken("wfr_r", now)
	_, err = old.Authenticate(newTok, now)
	require.ErrorIs(t, err, ErrUnauthenticated, "the new secret signs")

	dropped, _ := New(Config{Secrets: []string{secretB}})
	_, err = dropped.Authenticate(oldTok, now)
	require.ErrorIs(t, err, ErrUnauthenticated, "dropping the old secret revokes its tokens")
	_, err = dropped.Authenticate(newTok, now)
	require.NoError(t, err)
}

func TestNoSecretNoRunTokens(t *testing.T) {
	a, _ := New(Config{})
	_, _, ok := a.RunToken("wfr_x", time.Now())
	require.False(t, ok)
	require.False(t, a.CanSignRunTokens())
}

func TestServerTokenLimits(t *testing.T) {
	a, err := New(Config{ServerTokens: []string{
		"plain-token-0123456789",
		"limited-token-0123456789;rate=1000;burst=2000",
		" rated-token-0123456789 ; rate=2.5 ",
		"free-token-0123456789;rate=0",
	}})
	require.NoError(t, err)
	now := time.Now()
	for token, want := range map[string]*Limit{
		"plain-token-0123456789":   nil,
		"limited-token-0123456789": {Rate: 1000, Burst: 2000},
		"rated-token-0123456789":   {Rate: 2.5, Burst: 5},
		"free-token-0123456789":    {Rate: 0, Burst: 1},
	} {
		p, err := a.Authenticate("Bearer "+token, now)
		require.NoError(t, err, token)
		require.Equal(t, want, p.Limit, token)
	}
	// The options are not part of the token.
	_, err = a.Authenticate("limited-token-0123456789;rate=1000;burst=2000", now)
	require.ErrorIs(t, err, ErrUnauthenticated)

	for _, bad := range []string{
		"some-token-0123456789;rate=fast",
		"some-token-0123456789;rate=-1",
		"some-token-0123456789;rate=NaN",
		"some-token-0123456789;burst=0",
		"some-token-0123456789;burst=1.5",
		"some-token-0123456789;speed=1",
		"some-token-0123456789;rate",
		"some;token-0123456789", // a token holding ';' is refused, not half read
	} {
		_, err := New(Config{ServerTokens: []string{bad}})
		require.Error(t, err, bad)
		require.NotContains(t, err.Error(), "0123456789", "the error quotes the secret")
	}
}

package auth

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const (
	hookSecretA = "hook-secret-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	hookSecretB = "hook-secret-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

var hookDeadline = time.Date(2026, 12, 7, 10, 0, 0, 123456000, time.UTC)

func mustHookSigner(t testing.TB, secrets ...string) *HookSigner {
	t.Helper()
	s, err := NewHookSigner(secrets)
	require.NoError(t, err)
	return s
}

func TestHookTokenRoundTrip(t *testing.T) {
	s := mustHookSigner(t, hookSecretA)
	tok := s.Sign("wtr_42", "wfr_order-1", "wait-paid", hookDeadline)
	require.True(t, strings.HasPrefix(tok, "wh1.wtr_42."), tok)
	require.Less(t, len(tok), 100, "short enough for a link in an email")
	for _, c := range tok {
		require.True(t, c < 128 && (c == '.' || c == '_' || c == '-' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'),
			"URL-safe without escaping: %q", c)
	}
	c, ok := s.Verify(tok)
	require.True(t, ok)
	require.Equal(t, "wtr_42", c.WaiterID)
	require.Equal(t, hookDeadline.Unix(), c.Expires.Unix())
	require.True(t, c.Binds("wfr_order-1", "wait-paid", hookDeadline))
	// Another waiter's run, step or deadline: not this token's.
	require.False(t, c.Binds("wfr_order-2", "wait-paid", hookDeadline))
	require.False(t, c.Binds("wfr_order-1", "wait-shipped", hookDeadline))
	require.False(t, c.Binds("wfr_order-1", "wait-paid", hookDeadline.Add(time.Second)))
	// Fields are length-prefixed: moving a byte between run and step changes the binding.
	require.False(t, c.Binds("wfr_order-1w", "ait-paid", hookDeadline))
}

func TestHookTokenRotation(t *testing.T) {
	old := mustHookSigner(t, hookSecretA)
	tok := old.Sign("wtr_7", "wfr_r", "s", hookDeadline)
	rotated := mustHookSigner(t, hookSecretB, hookSecretA)
	_, ok := rotated.Verify(tok)
	require.True(t, ok, "a token of the old secret still works while it is listed")
	newTok := rotated.Sign("wtr_7", "wfr_r", "s", hookDeadline)
	require.NotEqual(t, tok, newTok, "the first secret signs")
	_, ok = old.Verify(newTok)
	require.False(t, ok)
	dropped := mustHookSigner(t, hookSecretB)
	_, ok = dropped.Verify(tok)
	require.False(t, ok, "a dropped secret's tokens stop working")
}

func TestHookSignerSecrets(t *testing.T) {
	_, err := NewHookSigner(nil)
	require.Error(t, err)
	_, err = NewHookSigner([]string{"short"})
	require.ErrorContains(t, err, "shorter than 32")
	require.NotContains(t, err.Error(), "short\"", "errors never quote a secret")
	s := mustHookSigner(t, hookSecretA)
	require.NotContains(t, s.String(), hookSecretA)
	// The key is derived: a token is not an HMAC with the bare secret, so a
	// secret shared with another signer (run tokens) signs nothing here.
	tok := s.Sign("wtr_1", "wfr_r", "s", hookDeadline)
	body := tok[:strings.LastIndexByte(tok, '.')]
	require.NotEqual(t, hookB64.EncodeToString(sign([]byte(hookSecretA), body)), tok[len(body)+1:])
}

// Every single-byte change of a valid token, at every position and to every
// byte value (letters, digits, '.', '_', '-', '=', '+', '/', '%', spaces,
// controls, NUL, bytes ≥ 0x80), every truncation and every extension is
// refused.
func TestHookTokenAlteredEveryByte(t *testing.T) {
	s := mustHookSigner(t, hookSecretA)
	tok := s.Sign("wtr_123", "wfr_run", "step", hookDeadline)
	b := []byte(tok)
	for i := range b {
		orig := b[i]
		for v := 0; v < 256; v++ {
			if byte(v) == orig {
				continue
			}
			b[i] = byte(v)
			if _, ok := s.Verify(string(b)); ok {
				t.Fatalf("altered token accepted: byte %d %q → %q", i, orig, byte(v))
			}
		}
		b[i] = orig
	}
	for n := 0; n < len(tok); n++ {
		_, ok := s.Verify(tok[:n])
		require.False(t, ok, "truncated to %d", n)
	}
	for _, suffix := range []string{"A", "=", ".", "%00", " ", "\n", "." + tok} {
		_, ok := s.Verify(tok + suffix)
		require.False(t, ok, "extended with %q", suffix)
	}
	// Parts swapped with another valid token's: refused.
	other := s.Sign("wtr_124", "wfr_run", "step", hookDeadline)
	tp, op := strings.Split(tok, "."), strings.Split(other, ".")
	for i := 1; i < len(tp); i++ {
		mixed := append([]string{}, tp...)
		mixed[i] = op[i]
		if strings.Join(mixed, ".") == tok {
			continue
		}
		_, ok := s.Verify(strings.Join(mixed, "."))
		require.False(t, ok, "part %d taken from another token", i)
	}
	_, ok := s.Verify(tok)
	require.True(t, ok)
}

// FuzzHookTokenVerify: whatever the input, Verify never panics, and it
// accepts only tokens this signer made (the seeds); anything else it
// accepted would be a forgery.
func FuzzHookTokenVerify(f *testing.F) {
	s := mustHookSigner(f, hookSecretA)
	signed := map[string]bool{}
	for i, id := range []string{"wtr_1", "wtr_9223372036854775807", "wtr_42"} {
		tok := s.Sign(id, "wfr_run", "step", hookDeadline.Add(time.Duration(i)*time.Hour))
		signed[tok] = true
		f.Add(tok)
	}
	for _, seed := range []string{"", "wh1.", "wh1....", "wh1.wtr_1.0.AAAAAAAAAAA.", "wh1.wtr_1.-1.x.y", strings.Repeat("wh1.", 100)} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, tok string) {
		c, ok := s.Verify(tok)
		if !ok {
			if c != nil {
				t.Fatal("a refused token returned a claim")
			}
			return
		}
		if !signed[tok] {
			t.Fatalf("accepted a token it did not sign: %q", tok)
		}
		if !strings.HasPrefix(tok, "wh1."+c.WaiterID+".") {
			t.Fatalf("claim names %q, token %q", c.WaiterID, tok)
		}
	})
}

package auth

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Hook tokens: the credential of a completion URL (POST /hooks/<token>),
// which completes one durable waiter. The token is
//
//	wh1.<waiter id>.<unix expiry>.<binding>.<mac>
//
// where the expiry is the waiter's deadline (in whole seconds), binding is
// base64url of the first 8 bytes of SHA-256 over the waiter's run id and step
// name (length-prefixed), and mac is base64url of HMAC-SHA256 over
// everything before the last dot. The MAC is checked before anything else,
// so a forged or altered token never costs a database read; the binding and
// the expiry are then compared with the waiter the id names, so a token
// cannot complete another waiter that later got the same id (a database
// restored or recreated under the same secret).
//
// The key is derived from a secret (HMAC-SHA256(secret, hookKeyLabel)), so
// that a secret shared with another use signs nothing that use could read
// as a hook token, or the other way round.
const (
	hookTokenPrefix = "wh1."
	hookKeyLabel    = "rendezvous completion URL token key v1"
	// maxHookTokenLen bounds what the parser looks at: every token this
	// package signs is far shorter (waiter ids are short, the rest fixed).
	maxHookTokenLen = 256
	bindingLen      = 8
)

// hookB64 is strict: a token whose last character's unused bits differ
// decodes to the same bytes with the lax decoder, and would be an altered
// token that is accepted.
var hookB64 = base64.RawURLEncoding.Strict()

// HookSigner signs and checks hook tokens. Its String never shows the keys.
type HookSigner struct {
	keys [][]byte // derived; the first signs, all verify
}

// MinHookSecretLen is the shortest secret accepted for hook tokens.
const MinHookSecretLen = 32

// NewHookSigner derives keys from the secrets: the first signs, every one
// verifies (rotation: put the new secret first, drop the old one once the
// waiters its URLs were handed out for have ended).
func NewHookSigner(secrets []string) (*HookSigner, error) {
	s := &HookSigner{}
	for i, sec := range secrets {
		sec = strings.TrimSpace(sec)
		if sec == "" {
			continue
		}
		if len(sec) < MinHookSecretLen {
			return nil, fmt.Errorf("completion URL secret %d is shorter than %d characters", i+1, MinHookSecretLen)
		}
		m := hmac.New(sha256.New, []byte(sec))
		m.Write([]byte(hookKeyLabel))
		s.keys = append(s.keys, m.Sum(nil))
	}
	if len(s.keys) == 0 {
		return nil, errors.New("completion URL tokens: no secret")
	}
	return s, nil
}

func (s *HookSigner) String() string { return fmt.Sprintf("HookSigner(%d keys)", len(s.keys)) }

// Sign returns the token for the durable waiter (its id, run id, step name
// and deadline). It expires at the deadline, in whole seconds.
func (s *HookSigner) Sign(waiterID, runID, stepName string, deadline time.Time) string {
	b := hookBinding(runID, stepName)
	body := hookTokenPrefix + waiterID + "." + strconv.FormatInt(deadline.Unix(), 10) + "." + hookB64.EncodeToString(b[:])
	return body + "." + hookB64.EncodeToString(s.mac(s.keys[0], body))
}

func (s *HookSigner) mac(key []byte, body string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(body))
	return m.Sum(nil)
}

// HookClaim is what a verified token says: which waiter, until when, and
// what must hold of the waiter for the token to be its own (Binds).
type HookClaim struct {
	WaiterID string
	Expires  time.Time
	binding  [bindingLen]byte
}

// Binds reports whether the claim was signed for a waiter with this run,
// step and deadline.
func (c *HookClaim) Binds(runID, stepName string, deadline time.Time) bool {
	b := hookBinding(runID, stepName)
	return hmac.Equal(b[:], c.binding[:]) && deadline.Unix() == c.Expires.Unix()
}

// Verify parses the token and checks its MAC against every key (in
// constant time per key, and against all of them whatever matched). It
// says nothing of why a token is refused. It does not look at the expiry:
// the caller compares Expires with its clock.
func (s *HookSigner) Verify(token string) (*HookClaim, bool) {
	if len(token) > maxHookTokenLen || !strings.HasPrefix(token, hookTokenPrefix) {
		return nil, false
	}
	parts := strings.Split(token[len(hookTokenPrefix):], ".")
	if len(parts) != 4 {
		return nil, false
	}
	waiterID, expText, bindText, macText := parts[0], parts[1], parts[2], parts[3]
	if !validHookWaiterID(waiterID) {
		return nil, false
	}
	exp, ok := parseCanonicalInt(expText)
	if !ok {
		return nil, false
	}
	// The decoder skips '\r' and '\n': only the alphabet is let through.
	if !b64Chars(macText, hookB64.EncodedLen(sha256.Size)) || !b64Chars(bindText, hookB64.EncodedLen(bindingLen)) {
		return nil, false
	}
	mac, err := hookB64.DecodeString(macText)
	if err != nil || len(mac) != sha256.Size {
		return nil, false
	}
	bind, err := hookB64.DecodeString(bindText)
	if err != nil || len(bind) != bindingLen {
		return nil, false
	}
	body := token[:len(token)-len(macText)-1]
	valid := 0
	for _, k := range s.keys {
		if hmac.Equal(mac, s.mac(k, body)) {
			valid = 1
		}
	}
	if valid != 1 {
		return nil, false
	}
	c := &HookClaim{WaiterID: waiterID, Expires: time.Unix(exp, 0)}
	copy(c.binding[:], bind)
	return c, true
}

// validHookWaiterID: the ids the store makes (wtr_<digits>), loosely:
// lower-case letters, digits and '_', 1..64 of them.
func validHookWaiterID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// b64Chars reports whether s is n characters of the base64url alphabet.
func b64Chars(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// parseCanonicalInt reads a positive decimal written as FormatInt writes
// it: no sign, no leading zero, no spaces.
func parseCanonicalInt(s string) (int64, bool) {
	if s == "" || len(s) > 19 || s[0] == '0' {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

func hookBinding(runID, stepName string) [bindingLen]byte {
	h := sha256.New()
	var n [8]byte
	for _, f := range []string{runID, stepName} {
		binary.BigEndian.PutUint64(n[:], uint64(len(f)))
		h.Write(n[:])
		h.Write([]byte(f))
	}
	var out [bindingLen]byte
	copy(out[:], h.Sum(nil))
	return out
}

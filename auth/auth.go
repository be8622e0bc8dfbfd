// Package auth decides who is calling: a server token (full access), a run
// token (a signed, expiring token that trigger hands out and that allows only
// waitForEvent, waitForEventCallback and workflowRun on its run), or nobody. It knows nothing of
// GraphQL or HTTP; the graph package asks it and enforces the answer.
package auth

import (
	"bufio"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"
)

// Kind is what a principal may do.
type Kind int

const (
	// Anonymous: no token, on a server running open (no tokens configured).
	Anonymous Kind = iota
	// Server: a server token; everything.
	Server
	// Run: a run token; waitForEvent, waitForEventCallback and workflowRun on RunID only.
	Run
)

// Principal is an authenticated caller.
type Principal struct {
	Kind Kind
	// RunID is the run a run token is for.
	RunID string
	// Expires is when a run token stops working (zero: never).
	Expires time.Time
	// Key identifies the caller for rate limiting without keeping the
	// token itself: a hash of the token ("" for anonymous callers).
	Key string
	// Limit is the server token's own rate limit; nil: the default of its kind.
	Limit *Limit
}

// Limit is a rate limit of mutations per second, up to Burst at once; a
// zero Rate is no limit.
type Limit struct {
	Rate  float64
	Burst int
}

// FullAccess reports whether the principal may do everything.
func (p *Principal) FullAccess() bool { return p.Kind == Server || p.Kind == Anonymous }

// ErrUnauthenticated: a token was required and missing, or one was given and
// is not valid. Deliberately one error for every cause, so that a caller
// cannot probe which part was wrong.
var ErrUnauthenticated = errors.New("unauthenticated")

// Config configures an Authenticator.
type Config struct {
	// ServerTokens grant full access. Empty: the server runs open. A token
	// may carry a rate limit of its own: "<token>;rate=1000;burst=2000"
	// (mutations per second, and at once; rate=0: no limit; burst defaults
	// to twice the rate).
	ServerTokens []string
	// Secrets sign run tokens: the first signs, all verify, so a secret can
	// be rotated by putting the new one first and dropping the old one once
	// the tokens it signed have expired.
	Secrets []string
	// RunTokenTTL is how long a run token is valid.
	RunTokenTTL time.Duration
	// RequireTokens refuses to run open (production).
	RequireTokens bool
}

// Authenticator checks tokens.
type Authenticator struct {
	serverTokens [][32]byte // SHA-256 of each token: compared in constant time
	limits       []*Limit   // of each server token; nil: the default
	secrets      [][]byte
	ttl          time.Duration
}

// DefaultRunTokenTTL matches the default lookback retention: a browser that
// triggered a run can follow it for as long as its events are kept.
const DefaultRunTokenTTL = 7 * 24 * time.Hour

// New validates the configuration.
func New(cfg Config) (*Authenticator, error) {
	a := &Authenticator{ttl: cfg.RunTokenTTL}
	if a.ttl <= 0 {
		a.ttl = DefaultRunTokenTTL
	}
	for _, entry := range cfg.ServerTokens {
		t, limit, err := parseTokenEntry(entry)
		if err != nil {
			return nil, err
		}
		if t == "" {
			continue
		}
		if len(t) < 16 {
			return nil, fmt.Errorf("server tokens must be at least 16 characters")
		}
		a.serverTokens = append(a.serverTokens, sha256.Sum256([]byte(t)))
		a.limits = append(a.limits, limit)
	}
	if cfg.RequireTokens && len(a.serverTokens) == 0 {
		return nil, fmt.Errorf("tokens are required (RENDEZVOUS_REQUIRE_TOKENS) but none is configured (RENDEZVOUS_TOKENS or RENDEZVOUS_TOKENS_FILE)")
	}
	for _, s := range cfg.Secrets {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if len(s) < 32 {
			return nil, fmt.Errorf("run token secrets must be at least 32 characters")
		}
		a.secrets = append(a.secrets, []byte(s))
	}
	return a, nil
}

// Open reports whether the server runs without tokens.
func (a *Authenticator) Open() bool { return len(a.serverTokens) == 0 }

// CanSignRunTokens reports whether a secret is configured.
func (a *Authenticator) CanSignRunTokens() bool { return len(a.secrets) > 0 }

// Authenticate resolves the bearer token (the part after "Bearer ", or the
// whole value) to a principal. No token: anonymous on an open server,
// ErrUnauthenticated otherwise. A token that is given must be valid.
func (a *Authenticator) Authenticate(token string, now time.Time) (*Principal, error) {
	token = strings.TrimSpace(token)
	if v, ok := cutPrefixFold(token, "Bearer "); ok {
		token = strings.TrimSpace(v)
	}
	if token == "" {
		if a.Open() {
			return &Principal{Kind: Anonymous}, nil
		}
		return nil, ErrUnauthenticated
	}
	if len(token) > 4096 {
		return nil, ErrUnauthenticated
	}
	if strings.HasPrefix(token, runTokenPrefix) {
		return a.verifyRunToken(token, now)
	}
	sum := sha256.Sum256([]byte(token))
	found := -1
	for i := range a.serverTokens {
		found = subtle.ConstantTimeSelect(subtle.ConstantTimeCompare(sum[:], a.serverTokens[i][:]), i, found)
	}
	if found >= 0 {
		return &Principal{Kind: Server, Key: "srv:" + hex.EncodeToString(sum[:8]), Limit: a.limits[found]}, nil
	}
	return nil, ErrUnauthenticated
}

// parseTokenEntry splits "<token>[;rate=R][;burst=B]". Options are
// checked strictly, so that a token that happens to hold a ';' is refused
// at start-up rather than half read. Errors never quote the entry: it is a
// secret.
func parseTokenEntry(entry string) (token string, limit *Limit, err error) {
	token, opts, found := strings.Cut(strings.TrimSpace(entry), ";")
	token = strings.TrimSpace(token)
	if !found {
		return token, nil, nil
	}
	limit = &Limit{}
	burstSet := false
	for _, opt := range strings.Split(opts, ";") {
		k, v, ok := strings.Cut(strings.TrimSpace(opt), "=")
		switch {
		case !ok:
			return "", nil, errTokenOptions
		case k == "rate":
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f < 0 || math.IsNaN(f) || math.IsInf(f, 0) {
				return "", nil, errors.New("server token option rate: want mutations per second, 0 for no limit")
			}
			limit.Rate = f
		case k == "burst":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return "", nil, errors.New("server token option burst: want a positive whole number")
			}
			limit.Burst, burstSet = n, true
		default:
			return "", nil, errTokenOptions
		}
	}
	if !burstSet {
		limit.Burst = max(1, int(min(2*limit.Rate, math.MaxInt32)))
	}
	return token, limit, nil
}

var errTokenOptions = errors.New("server token options: want <token>;rate=<n>;burst=<n> (a token may not contain ';')")

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}

// Run tokens: "rt1.<base64url run id>.<unix expiry>.<base64url HMAC-SHA256>".
const runTokenPrefix = "rt1."

// Strict: a last character that differs only in the bits base64 leaves
// unused decodes to the same bytes otherwise, so a token altered there would
// still pass (TestSecurityRunTokenForgery changes exactly that character).
var b64 = base64.RawURLEncoding.Strict()

// RunToken signs a token for the run; ok is false when no secret is configured.
func (a *Authenticator) RunToken(runID string, now time.Time) (token string, expires time.Time, ok bool) {
	if len(a.secrets) == 0 {
		return "", time.Time{}, false
	}
	expires = now.Add(a.ttl).Truncate(time.Second)
	body := runTokenPrefix + b64.EncodeToString([]byte(runID)) + "." + strconv.FormatInt(expires.Unix(), 10)
	return body + "." + b64.EncodeToString(sign(a.secrets[0], body)), expires, true
}

func sign(secret []byte, body string) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(body))
	return m.Sum(nil)
}

func (a *Authenticator) verifyRunToken(token string, now time.Time) (*Principal, error) {
	i := strings.LastIndexByte(token, '.')
	body, sigText := token[:i], token[i+1:]
	sig, err := b64.DecodeString(sigText)
	if err != nil {
		return nil, ErrUnauthenticated
	}
	valid := false
	for _, s := range a.secrets {
		if hmac.Equal(sig, sign(s, body)) {
			valid = true
		}
	}
	if !valid {
		return nil, ErrUnauthenticated
	}
	parts := strings.Split(strings.TrimPrefix(body, runTokenPrefix), ".")
	if len(parts) != 2 {
		return nil, ErrUnauthenticated
	}
	run, err := b64.DecodeString(parts[0])
	if err != nil {
		return nil, ErrUnauthenticated
	}
	exp, err := strconv.ParseInt(parts[1], 10, 64)
	if err != nil {
		return nil, ErrUnauthenticated
	}
	expires := time.Unix(exp, 0)
	if !now.Before(expires) {
		return nil, ErrUnauthenticated
	}
	sum := sha256.Sum256([]byte(token))
	return &Principal{Kind: Run, RunID: string(run), Expires: expires, Key: "run:" + hex.EncodeToString(sum[:8])}, nil
}

// ReadTokenFile reads server tokens, one per line (with options, as in
// Config.ServerTokens); blank lines and lines starting with # are skipped.
func ReadTokenFile(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, line)
	}
	return out, sc.Err()
}

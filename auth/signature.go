package auth

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The signature of outbound calls (Rendezvous-Signature): t=<unix
// seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>, one v1= per signing
// secret, so a receiver can rotate: add the new secret on both sides, then
// remove the old one.

// DeliverySigner signs outbound bodies with the secrets of
// RENDEZVOUS_SIGNING_SECRET. Its String never shows them.
type DeliverySigner struct{ secrets [][]byte }

// NewDeliverySigner takes the secrets (at least one, each 16 bytes or more).
func NewDeliverySigner(secrets []string) (*DeliverySigner, error) {
	if len(secrets) == 0 {
		return nil, errors.New("RENDEZVOUS_SIGNING_SECRET: no secret")
	}
	s := &DeliverySigner{}
	for i, sec := range secrets {
		if len(sec) < 16 {
			return nil, fmt.Errorf("RENDEZVOUS_SIGNING_SECRET: secret %d is shorter than 16 bytes", i+1)
		}
		s.secrets = append(s.secrets, []byte(sec))
	}
	return s, nil
}

func (s *DeliverySigner) String() string {
	return fmt.Sprintf("DeliverySigner(%d secrets)", len(s.secrets))
}

// Sign returns the header value for body at now.
func (s *DeliverySigner) Sign(body []byte, now time.Time) string {
	t := strconv.FormatInt(now.Unix(), 10)
	var b strings.Builder
	b.WriteString("t=" + t)
	for _, sec := range s.secrets {
		b.WriteString(",v1=")
		b.WriteString(hex.EncodeToString(signBody(sec, t, body)))
	}
	return b.String()
}

func signBody(secret []byte, t string, body []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(t))
	m.Write([]byte{'.'})
	m.Write(body)
	return m.Sum(nil)
}

// VerifyDeliverySignature checks a Rendezvous-Signature header against body
// with secret, and that its time is within tolerance of now (replay
// protection; receivers should also deduplicate on Rendezvous-Delivery-Id).
func VerifyDeliverySignature(header string, body []byte, secret string, now time.Time, tolerance time.Duration) error {
	var t string
	var sigs [][]byte
	for _, part := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return errors.New("malformed signature header")
		}
		switch k {
		case "t":
			t = v
		case "v1":
			if sig, err := hex.DecodeString(v); err == nil {
				sigs = append(sigs, sig)
			}
		}
	}
	ts, err := strconv.ParseInt(t, 10, 64)
	if err != nil {
		return errors.New("signature header has no time")
	}
	if d := now.Sub(time.Unix(ts, 0)); d > tolerance || d < -tolerance {
		return errors.New("signature time is outside the tolerance")
	}
	want := signBody([]byte(secret), t, body)
	for _, sig := range sigs {
		if hmac.Equal(sig, want) {
			return nil
		}
	}
	return errors.New("no signature matches")
}

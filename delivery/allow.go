package delivery

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
)

// AllowList is RENDEZVOUS_OUTBOUND_ALLOWED parsed: the URL prefixes outbound
// calls may go to. A URL matches a prefix when scheme, host and port are
// equal (the default port filled in) and the prefix's path is a prefix of
// the URL's on a segment boundary: "https://a.com/hooks" allows
// "https://a.com/hooks" and "https://a.com/hooks/x", never
// "https://a.com/hooksx" nor "https://a.com.evil.net". A URL that cannot be
// fully examined (user info, dot segments, encoded slashes, a fragment) is
// refused.
type AllowList struct {
	prefixes []prefix
}

type prefix struct {
	scheme, host, port string
	segments           []string // the path's segments, without a trailing empty one
}

// ErrEmptyAllowList: no prefix configured, so every outbound call is refused.
var ErrEmptyAllowList = errors.New("outbound calls are refused: RENDEZVOUS_OUTBOUND_ALLOWED is empty (set it to the URL prefixes Rendezvous may call)")

// ParseAllowList parses comma-separated URL prefixes.
func ParseAllowList(v string) (*AllowList, error) {
	a := &AllowList{}
	// Errors name an entry by its position: an entry may carry what must
	// not be logged (user info, by mistake).
	for i, raw := range strings.Split(v, ",") {
		raw = strings.TrimSpace(raw)
		if raw == "" {
			continue
		}
		p, err := parseURL(raw)
		if err != nil {
			return nil, fmt.Errorf("RENDEZVOUS_OUTBOUND_ALLOWED entry %d: %w", i+1, err)
		}
		if p.query {
			return nil, fmt.Errorf("RENDEZVOUS_OUTBOUND_ALLOWED entry %d: a prefix has no query", i+1)
		}
		a.prefixes = append(a.prefixes, p.prefix)
	}
	return a, nil
}

// Empty reports whether no prefix is configured.
func (a *AllowList) Empty() bool { return a == nil || len(a.prefixes) == 0 }

// Check returns nil if the URL is allowed, or an error saying why not.
func (a *AllowList) Check(raw string) error {
	if a.Empty() {
		return ErrEmptyAllowList
	}
	u, err := parseURL(raw)
	if err != nil {
		return err
	}
	for _, p := range a.prefixes {
		if p.scheme == u.scheme && p.host == u.host && p.port == u.port && hasSegments(u.segments, p.segments) {
			return nil
		}
	}
	return fmt.Errorf("url %q is not under any prefix of RENDEZVOUS_OUTBOUND_ALLOWED", raw)
}

func hasSegments(path, pre []string) bool {
	if len(pre) > len(path) {
		return false
	}
	for i := range pre {
		if path[i] != pre[i] {
			return false
		}
	}
	return true
}

type parsed struct {
	prefix
	query bool
}

func parseURL(raw string) (parsed, error) {
	if len(raw) > 2048 {
		return parsed{}, errors.New("url longer than 2048 bytes")
	}
	for _, r := range raw {
		if r <= ' ' || r == 0x7f || r == '\\' {
			return parsed{}, errors.New("url has a space, a control character or a backslash")
		}
	}
	u, err := url.Parse(raw)
	if err != nil {
		return parsed{}, errors.New("url does not parse")
	}
	var p parsed
	p.scheme = strings.ToLower(u.Scheme)
	switch {
	case p.scheme != "http" && p.scheme != "https":
		return parsed{}, errors.New("url scheme must be http or https")
	case u.Opaque != "" || u.Host == "":
		return parsed{}, errors.New("url has no host")
	case u.User != nil:
		return parsed{}, errors.New("url must not carry user info")
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return parsed{}, errors.New("url must not have a fragment")
	}
	p.host = strings.ToLower(u.Hostname())
	if p.host == "" || strings.HasSuffix(p.host, ".") {
		return parsed{}, errors.New("url host is empty or ends with a dot")
	}
	if ip := net.ParseIP(strings.Trim(p.host, "[]")); ip == nil && strings.ContainsAny(p.host, "%[]") {
		return parsed{}, errors.New("url host is malformed")
	}
	p.port = u.Port()
	if p.port == "" {
		p.port = map[string]string{"http": "80", "https": "443"}[p.scheme]
	}
	// Encoded slashes, dots or percent signs in the path could be read by
	// the receiver as other segments than the ones compared here.
	if lower := strings.ToLower(u.EscapedPath()); strings.Contains(lower, "%2f") || strings.Contains(lower, "%2e") || strings.Contains(lower, "%25") || strings.Contains(lower, "%5c") {
		return parsed{}, errors.New("url path has an encoded slash, dot, backslash or percent sign")
	}
	segs := strings.Split(u.Path, "/")
	if len(segs) > 0 && segs[0] == "" {
		segs = segs[1:]
	}
	for i, s := range segs {
		if s == "." || s == ".." {
			return parsed{}, errors.New("url path has a . or .. segment")
		}
		if s == "" && i != len(segs)-1 {
			return parsed{}, errors.New("url path has an empty segment")
		}
	}
	if n := len(segs); n > 0 && segs[n-1] == "" {
		segs = segs[:n-1]
	}
	p.segments = segs
	p.query = u.RawQuery != "" || u.ForceQuery
	return p, nil
}

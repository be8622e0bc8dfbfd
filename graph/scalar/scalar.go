// Package scalar implements the custom GraphQL scalars JSON, Time and
// Duration. It converts between wire values and plain Go types
// (json.RawMessage, time.Time, time.Duration) so that nothing below the
// GraphQL layer depends on gqlgen.
package scalar

import (
	"bytes"
	"encoding/json"

	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/gqlerror"
)

// CodeBadUserInput is the extensions.code of every scalar parse error.
const CodeBadUserInput = "BAD_USER_INPUT"

func badInput(format string, args ...any) error {
	return &gqlerror.Error{
		Message:    fmt.Sprintf(format, args...),
		Extensions: map[string]any{"code": CodeBadUserInput},
	}
}

// MarshalJSON writes raw JSON as it is; nil is null.
func MarshalJSON(v json.RawMessage) graphql.Marshaler {
	return graphql.WriterFunc(func(w io.Writer) {
		if len(v) == 0 {
			io.WriteString(w, "null")
			return
		}
		w.Write(v)
	})
}

// UnmarshalJSON accepts a JSON value. A json.RawMessage is kept byte for
// byte, after compaction: every transport passes JSON-typed variables so,
// and inline literals arrive rendered (LiteralJSON). Anything else (a JSON
// field inside an input-object variable, decoded into Go values) is encoded
// with the HTML escaping turned off; its object keys come out sorted.
func UnmarshalJSON(v any) (json.RawMessage, error) {
	switch raw := v.(type) {
	case json.RawMessage:
		if !json.Valid(raw) {
			return nil, badInput("JSON: invalid JSON value")
		}
		var buf bytes.Buffer
		if err := json.Compact(&buf, raw); err != nil {
			return nil, badInput("JSON: invalid JSON value")
		}
		return buf.Bytes(), nil
	case nil:
		return json.RawMessage("null"), nil
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, badInput("JSON: value cannot be encoded as JSON")
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// TimeLayout is RFC 3339 with a fixed six-digit fraction: the database keeps
// microseconds, so the wire shows exactly what is stored.
const TimeLayout = "2006-01-02T15:04:05.000000Z07:00"

// MarshalTime writes t in UTC with microseconds.
func MarshalTime(t time.Time) graphql.Marshaler {
	return graphql.WriterFunc(func(w io.Writer) {
		io.WriteString(w, strconv.Quote(t.UTC().Format(TimeLayout)))
	})
}

// UnmarshalTime accepts any RFC 3339 timestamp.
func UnmarshalTime(v any) (time.Time, error) {
	s, ok := v.(string)
	if !ok {
		return time.Time{}, badInput("Time must be an RFC 3339 string")
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, badInput("Time must be an RFC 3339 string")
	}
	return t.UTC(), nil
}

// MarshalDuration writes d in the notation UnmarshalDuration reads ("1d2h30m",
// "1s500ms"); below a millisecond it is rounded to one.
func MarshalDuration(d time.Duration) graphql.Marshaler {
	return graphql.WriterFunc(func(w io.Writer) {
		io.WriteString(w, strconv.Quote(FormatDuration(d)))
	})
}

// FormatDuration writes d with the units d, h, m, s and ms.
func FormatDuration(d time.Duration) string {
	d = d.Round(time.Millisecond)
	if d == 0 {
		return "0s"
	}
	var b strings.Builder
	if d < 0 {
		b.WriteByte('-')
		if d == math.MinInt64 {
			d++
		}
		d = -d
	}
	// "ms" is listed first in durationUnits for parsing; here, largest first.
	for _, u := range []struct {
		name string
		size time.Duration
	}{{"d", 24 * time.Hour}, {"h", time.Hour}, {"m", time.Minute}, {"s", time.Second}, {"ms", time.Millisecond}} {
		if n := d / u.size; n > 0 {
			b.WriteString(strconv.FormatInt(int64(n), 10))
			b.WriteString(u.name)
			d -= n * u.size
		}
	}
	return b.String()
}

// UnmarshalDuration accepts "30s", "5m", "2h", "1d", "1h30m", "250ms" (any
// sequence of whole numbers with units d, h, m, s, ms) or an integer number of
// seconds, as a GraphQL Int or a string of digits. Whether the duration is in
// range is the engine's business; here it only has to be well formed.
func UnmarshalDuration(v any) (time.Duration, error) {
	switch n := v.(type) {
	case int:
		return secondsDuration(int64(n))
	case int32:
		return secondsDuration(int64(n))
	case int64:
		return secondsDuration(n)
	case json.Number:
		i, err := n.Int64()
		if err != nil {
			return 0, badInput("Duration: %q is not a whole number of seconds", n.String())
		}
		return secondsDuration(i)
	case float64:
		if n != math.Trunc(n) || math.Abs(n) > math.MaxInt64/float64(time.Second) {
			return 0, badInput("Duration: %v is not a whole number of seconds", n)
		}
		return secondsDuration(int64(n))
	case string:
		return ParseDuration(n)
	}
	return 0, badInput("Duration must be a string such as \"30s\" or an Int of seconds")
}

func secondsDuration(s int64) (time.Duration, error) {
	if s > math.MaxInt64/int64(time.Second) || s < math.MinInt64/int64(time.Second) {
		return 0, badInput("Duration: %d seconds is out of range", s)
	}
	return time.Duration(s) * time.Second, nil
}

var durationUnits = []struct {
	name string
	size time.Duration
}{
	// "ms" before "m", so "5ms" is not read as five minutes and an "s".
	{"ms", time.Millisecond},
	{"d", 24 * time.Hour},
	{"h", time.Hour},
	{"m", time.Minute},
	{"s", time.Second},
}

// ParseDuration parses the string forms of the Duration scalar. A leading
// minus sign is accepted so that the engine, not the parser, reports a
// negative duration as out of range.
func ParseDuration(s string) (time.Duration, error) {
	orig := s
	if !utf8.ValidString(s) || len(s) > 64 {
		return 0, badInput("Duration: malformed value")
	}
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, badInput("Duration: empty value")
	}
	neg := false
	if s[0] == '-' || s[0] == '+' {
		neg = s[0] == '-'
		s = s[1:]
		if s == "" {
			return 0, badInput("Duration: %q is malformed; use e.g. \"30s\", \"5m\", \"2h\", \"1d\" or \"1h30m\"", orig)
		}
	}
	if allDigits(s) { // a bare number is seconds
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, badInput("Duration: %q is out of range", orig)
		}
		if neg {
			n = -n
		}
		return secondsDuration(n)
	}
	var total time.Duration
	for s != "" {
		i := 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
		if i == 0 {
			return 0, badInput("Duration: %q is malformed; use e.g. \"30s\", \"5m\", \"2h\", \"1d\" or \"1h30m\"", orig)
		}
		n, err := strconv.ParseInt(s[:i], 10, 64)
		if err != nil {
			return 0, badInput("Duration: %q is out of range", orig)
		}
		s = s[i:]
		matched := false
		for _, u := range durationUnits {
			if strings.HasPrefix(s, u.name) {
				if n > int64(math.MaxInt64/u.size) {
					return 0, badInput("Duration: %q is out of range", orig)
				}
				part := time.Duration(n) * u.size
				if total > math.MaxInt64-part {
					return 0, badInput("Duration: %q is out of range", orig)
				}
				total += part
				s = s[len(u.name):]
				matched = true
				break
			}
		}
		if !matched {
			return 0, badInput("Duration: %q is malformed; use e.g. \"30s\", \"5m\", \"2h\", \"1d\" or \"1h30m\"", orig)
		}
	}
	if neg {
		total = -total
	}
	return total, nil
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// The built-in scalars String, ID and Int, strictly: gqlgen's own accept a
// number where a String is expected and a string of digits for an Int, which
// the GraphQL spec calls a request error.

// MarshalString writes a GraphQL String.
func MarshalString(s string) graphql.Marshaler { return graphql.MarshalString(s) }

// UnmarshalString accepts only a string.
func UnmarshalString(v any) (string, error) {
	if s, ok := v.(string); ok {
		return s, nil
	}
	return "", badInput("String cannot represent a non-string value: %s", describe(v))
}

// MarshalID writes a GraphQL ID.
func MarshalID(s string) graphql.Marshaler { return graphql.MarshalString(s) }

// UnmarshalID accepts a string, or an integer (the spec allows both).
func UnmarshalID(v any) (string, error) {
	switch x := v.(type) {
	case string:
		return x, nil
	case int64:
		return strconv.FormatInt(x, 10), nil
	case int:
		return strconv.Itoa(x), nil
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return strconv.FormatInt(i, 10), nil
		}
	}
	return "", badInput("ID cannot represent value: %s", describe(v))
}

// MarshalInt writes a GraphQL Int.
func MarshalInt(i int) graphql.Marshaler { return graphql.MarshalInt(i) }

// UnmarshalInt accepts only a whole number within 32 bits.
func UnmarshalInt(v any) (int, error) {
	var i int64
	switch x := v.(type) {
	case int:
		i = int64(x)
	case int32:
		i = int64(x)
	case int64:
		i = x
	case json.Number:
		n, err := x.Int64()
		if err != nil {
			return 0, badInput("Int cannot represent non-integer value: %s", x.String())
		}
		i = n
	case float64:
		if x != math.Trunc(x) {
			return 0, badInput("Int cannot represent non-integer value: %v", x)
		}
		i = int64(x)
	default:
		return 0, badInput("Int cannot represent non-integer value: %s", describe(v))
	}
	if i > math.MaxInt32 || i < math.MinInt32 {
		return 0, badInput("Int cannot represent non 32-bit signed integer value: %d", i)
	}
	return int(i), nil
}

func describe(v any) string {
	switch x := v.(type) {
	case string:
		return strconv.Quote(x)
	case nil:
		return "null"
	case map[string]any:
		return "an object"
	case []any:
		return "a list"
	}
	return fmt.Sprint(v)
}

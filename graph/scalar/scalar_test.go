package scalar_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/99designs/gqlgen/graphql"
	"github.com/stretchr/testify/require"
	"github.com/vektah/gqlparser/v2/gqlerror"

	"rendezvous/graph/scalar"
)

func marshal(m graphql.Marshaler) string {
	var buf bytes.Buffer
	m.MarshalGQL(&buf)
	return buf.String()
}

// requireBadInput checks that err is what a client must see for a malformed
// scalar: a *gqlerror.Error with extensions.code BAD_USER_INPUT.
func requireBadInput(t testing.TB, err error, msgAndArgs ...any) {
	t.Helper()
	require.Error(t, err, msgAndArgs...)
	var gqlErr *gqlerror.Error
	require.True(t, errors.As(err, &gqlErr), "want *gqlerror.Error, got %T: %v", err, err)
	require.Equal(t, scalar.CodeBadUserInput, gqlErr.Extensions["code"], msgAndArgs...)
	require.NotEmpty(t, gqlErr.Message)
}

// ---- Duration

func TestUnmarshalDurationValid(t *testing.T) {
	t.Parallel()
	const day = 24 * time.Hour
	maxSeconds := int64(math.MaxInt64 / int64(time.Second))
	for _, c := range []struct {
		in   any
		want time.Duration
	}{
		{"30s", 30 * time.Second},
		{"5m", 5 * time.Minute},
		{"2h", 2 * time.Hour},
		{"1d", day},
		{"1h30m", 90 * time.Minute},
		{"250ms", 250 * time.Millisecond},
		{"90", 90 * time.Second},
		{"0", 0},
		{"0s", 0},
		{"1d2h3m4s5ms", day + 2*time.Hour + 3*time.Minute + 4*time.Second + 5*time.Millisecond},
		{"7d", 7 * day},
		{"365d", 365 * day},
		{"1m1ms", time.Minute + time.Millisecond}, // "ms" is not read as minutes then "s"
		{"5ms", 5 * time.Millisecond},
		{"1s500ms", 1500 * time.Millisecond},
		{" 30s ", 30 * time.Second}, // surrounding space is trimmed
		{"\t90\n", 90 * time.Second},
		{"+30s", 30 * time.Second},
		{"007", 7 * time.Second},
		{"1h1h", 2 * time.Hour}, // units may repeat: decided by the code, harmless
		{"30s1h", time.Hour + 30*time.Second},
		{"106751d", 106751 * day},         // the largest whole number of days
		{"2562047h", 2562047 * time.Hour}, // the largest whole number of hours
		{strconv.FormatInt(maxSeconds, 10), time.Duration(maxSeconds) * time.Second}, // the largest number of seconds
		{strconv.FormatInt(maxSeconds, 10) + "s", time.Duration(maxSeconds) * time.Second},
		{30, 30 * time.Second},
		{int32(30), 30 * time.Second},
		{int64(30), 30 * time.Second},
		{int64(maxSeconds), time.Duration(maxSeconds) * time.Second},
		{json.Number("30"), 30 * time.Second},
		{json.Number("0"), 0},
		{float64(30), 30 * time.Second}, // a whole float is a whole number of seconds
		{float64(0), 0},
	} {
		got, err := scalar.UnmarshalDuration(c.in)
		require.NoError(t, err, "%#v", c.in)
		require.Equal(t, c.want, got, "%#v", c.in)
	}
}

func TestUnmarshalDurationInvalid(t *testing.T) {
	t.Parallel()
	maxSeconds := int64(math.MaxInt64 / int64(time.Second))
	for _, in := range []any{
		"",
		"   ",
		"abc",
		"5x",
		"5m5", // a bare number is seconds only on its own, not after a unit
		"1.5h",
		"1.5",
		"1h 30m",
		"1 h",
		"5M",
		"5S",
		"1w",
		"1y",
		"1us",
		"1µs",
		"1ns",
		"h",
		"s5",
		"-",
		"+",
		"--5s",
		"+-5s",
		"- 5s",
		"0x10",
		"1e3",
		"1_000s",
		"٣s", // a non-ASCII digit
		"5s\x00",
		"\xff5s",                            // not UTF-8
		strings.Repeat("1s", 33),            // longer than any sensible duration
		"9223372036854775808",               // overflows int64 before units
		"99999999999999999999s",             // overflows int64
		strconv.FormatInt(maxSeconds+1, 10), // seconds overflow time.Duration
		strconv.FormatInt(maxSeconds+1, 10) + "s",
		"-" + strconv.FormatInt(maxSeconds+2, 10),
		"106752d",
		"2562048h",
		"153722868m",
		"9223372036855ms",
		"2562047h48m",           // each part fits, the sum does not
		"106751d23h47m16s855ms", // one millisecond past the largest duration
		1.5,
		-0.5,
		math.NaN(),
		math.Inf(1),
		math.Inf(-1),
		1e300,
		float64(maxSeconds) * 4,
		maxSeconds + 1,
		-maxSeconds - 2,
		int64(math.MaxInt64),
		int64(math.MinInt64),
		json.Number("1.5"),
		json.Number("1e3"),
		json.Number("abc"),
		json.Number(""),
		json.Number("9223372036854775808"),
		json.Number(strconv.FormatInt(maxSeconds+1, 10)),
		true,
		nil,
		[]any{"30s"},
		map[string]any{"seconds": 30},
		time.Second, // a Go duration is not a wire value
	} {
		t.Run(fmt.Sprintf("%#v", in), func(t *testing.T) {
			d, err := scalar.UnmarshalDuration(in)
			requireBadInput(t, err, "%#v parsed as %v", in, d)
		})
	}
}

// The parser accepts a sign so that the engine, which knows the allowed
// range, reports a negative timeout (as BAD_USER_INPUT) rather than "malformed".
func TestUnmarshalDurationNegative(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		in   any
		want time.Duration
	}{
		{"-30s", -30 * time.Second},
		{"-1h30m", -90 * time.Minute},
		{"-90", -90 * time.Second},
		{"-0", 0},
		{-5, -5 * time.Second},
		{int64(-5), -5 * time.Second},
		{json.Number("-5"), -5 * time.Second},
		{float64(-5), -5 * time.Second},
		{"-" + strconv.FormatInt(math.MaxInt64/int64(time.Second), 10), -time.Duration(math.MaxInt64/int64(time.Second)) * time.Second},
	} {
		got, err := scalar.UnmarshalDuration(c.in)
		require.NoError(t, err, "%#v", c.in)
		require.Equal(t, c.want, got, "%#v", c.in)
	}
}

func TestMarshalDurationRoundTrip(t *testing.T) {
	t.Parallel()
	for _, d := range []time.Duration{
		0,
		30 * time.Second,
		5 * time.Minute,
		90 * time.Minute,
		24 * time.Hour,
		7 * 24 * time.Hour,
		250 * time.Millisecond,
		-30 * time.Second,
		time.Hour + time.Second,
		// Durations the parser itself produces ("1s500ms", "1m250ms"), which
		// Go's notation writes with a decimal point.
		1500 * time.Millisecond,
		time.Minute + 250*time.Millisecond,
	} {
		t.Run(d.String(), func(t *testing.T) {
			wire := marshal(scalar.MarshalDuration(d))
			s, err := strconv.Unquote(wire)
			require.NoError(t, err, "MarshalDuration(%v) = %s is not a JSON string", d, wire)
			back, err := scalar.UnmarshalDuration(s)
			require.NoError(t, err, "MarshalDuration(%v) = %s does not parse back", d, wire)
			require.Equal(t, d, back, wire)
		})
	}
}

func FuzzParseDuration(f *testing.F) {
	for _, s := range []string{"30s", "5m", "2h", "1d", "1h30m", "250ms", "90", "-30s", "+5m", " 1d ", "1.5h", "1h 30m", "", "-", "106751d23h47m16s854ms", "9223372036", "1s500ms"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := scalar.ParseDuration(s)
		if err != nil {
			requireBadInput(t, err, "%q", s)
			return
		}
		if !strings.ContainsAny(s, "0123456789") {
			t.Fatalf("ParseDuration(%q) = %v: accepted a value with no number in it", s, d)
		}
		// A valid duration is written in a form that reads back the same.
		wire := marshal(scalar.MarshalDuration(d))
		text, err := strconv.Unquote(wire)
		if err != nil {
			t.Fatalf("ParseDuration(%q) = %v; MarshalDuration wrote %s, not a JSON string", s, d, wire)
		}
		back, err := scalar.ParseDuration(text)
		if err != nil {
			t.Fatalf("ParseDuration(%q) = %v; MarshalDuration wrote %q, which does not parse: %v", s, d, text, err)
		}
		if back != d {
			t.Fatalf("ParseDuration(%q) = %v; its marshalled form %q parses as %v", s, d, text, back)
		}
		// And the string form agrees with UnmarshalDuration.
		via, err := scalar.UnmarshalDuration(s)
		if err != nil || via != d {
			t.Fatalf("UnmarshalDuration(%q) = %v, %v; ParseDuration gave %v", s, via, err, d)
		}
	})
}

// ---- JSON

func TestUnmarshalJSONRawMessage(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ in, want string }{
		{`{"a":1}`, `{"a":1}`},
		{"{ \"a\" : [ 1 , 2 ] ,\n\t\"b\" : null }", `{"a":[1,2],"b":null}`},
		{`  "padded"  `, `"padded"`},
		{`{"z":1,"a":2}`, `{"z":1,"a":2}`},                                 // key order kept
		{`{"a":1,"a":2}`, `{"a":1,"a":2}`},                                 // duplicate keys kept as sent
		{`12345678901234567890123456789`, `12345678901234567890123456789`}, // no float rounding
		{`1.000000000000000000001`, `1.000000000000000000001`},             // no float rounding
		{`1E+2`, `1E+2`}, // number spelling kept
		{`-0`, `-0`},     // number spelling kept
		{`"<b>&amp;</b> \u003c"`, `"<b>&amp;</b> \u003c"`},             // no HTML escaping, escapes kept
		{`"héllo ✓ 😀 \ud83d\ude00 \n"`, `"héllo ✓ 😀 \ud83d\ude00 \n"`}, // unicode kept byte for byte
		{`"in string:  { spaces } "`, `"in string:  { spaces } "`},     // spaces inside strings kept
		{`[true,false,null,{},[]]`, `[true,false,null,{},[]]`},
		{`null`, `null`},
	} {
		got, err := scalar.UnmarshalJSON(json.RawMessage(c.in))
		require.NoError(t, err, c.in)
		require.Equal(t, c.want, string(got), c.in)
	}
}

func TestUnmarshalJSONInvalidRaw(t *testing.T) {
	t.Parallel()
	for _, in := range []string{
		``,
		` `,
		`{`,
		`{"a":}`,
		`{"a":1,}`,
		`[1,2`,
		`'single'`,
		`undefined`,
		`NaN`,
		`01`,
		`1 2`,
		`{"a":1}{"b":2}`,
		`"unterminated`,
		"\"ctl \x01\"",
	} {
		got, err := scalar.UnmarshalJSON(json.RawMessage(in))
		requireBadInput(t, err, "%q gave %q", in, got)
	}
}

func TestUnmarshalJSONGoValues(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		in   any
		want string
	}{
		{"nil", nil, `null`},
		{"map sorted, no HTML escaping", map[string]any{"b": 1, "a": "<a href='x'>&</a>"}, `{"a":"<a href='x'>&</a>","b":1}`},
		{"array", []any{int64(1), "x", true, nil, 2.5}, `[1,"x",true,null,2.5]`},
		{"nested", map[string]any{"o": map[string]any{"l": []any{map[string]any{}}}}, `{"o":{"l":[{}]}}`},
		{"json.Number kept exactly", json.Number("12345678901234567890.000000000000000001"), `12345678901234567890.000000000000000001`},
		{"json.Number in a map", map[string]any{"n": json.Number("1e400")}, `{"n":1e400}`},
		{"string", "héllo <b> & 😀", `"héllo <b> & 😀"`},
		{"string with quotes", `say "hi" \ bye`, `"say \"hi\" \\ bye"`},
		{"bool", true, `true`},
		{"int", 42, `42`},
		{"int64", int64(math.MaxInt64), `9223372036854775807`},
		{"float", 0.1, `0.1`},
		{"raw inside a map", map[string]any{"r": json.RawMessage(`{"x" : 1}`)}, `{"r":{"x":1}}`},
	} {
		got, err := scalar.UnmarshalJSON(c.in)
		require.NoError(t, err, c.name)
		require.Equal(t, c.want, string(got), c.name)
		require.True(t, json.Valid(got), c.name)
	}
}

func TestUnmarshalJSONUnencodable(t *testing.T) {
	t.Parallel()
	for _, in := range []any{
		math.NaN(),
		math.Inf(1),
		func() {},
		make(chan int),
		map[string]any{"f": math.Inf(-1)},
		json.Number("not a number"),
		map[string]any{"raw": json.RawMessage(`{`)},
		complex(1, 2),
	} {
		got, err := scalar.UnmarshalJSON(in)
		requireBadInput(t, err, "%T gave %q", in, got)
	}
}

func TestMarshalJSON(t *testing.T) {
	t.Parallel()
	require.Equal(t, `null`, marshal(scalar.MarshalJSON(nil)))
	require.Equal(t, `null`, marshal(scalar.MarshalJSON(json.RawMessage{})))
	for _, v := range []string{`{"a":[1,2]}`, `"<&>"`, `12345678901234567890123456789`, `"😀"`} {
		require.Equal(t, v, marshal(scalar.MarshalJSON(json.RawMessage(v))))
	}
}

func FuzzUnmarshalJSON(f *testing.F) {
	for _, s := range []string{`{"a":1}`, `[1, 2, {"b": null}]`, `"<&>"`, `12345678901234567890`, `"\ud83d\ude00"`, ``, `{`, `nul`, "\"\xff\"", ` 1 `, `1e999`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// As a variable from our POST transport: raw bytes.
		got, err := scalar.UnmarshalJSON(json.RawMessage(data))
		if err != nil {
			requireBadInput(t, err, "%q", data)
			if json.Valid(data) {
				t.Fatalf("valid JSON %q refused: %v", data, err)
			}
		} else {
			if !json.Valid(got) {
				t.Fatalf("UnmarshalJSON(%q) = %q, not valid JSON", data, got)
			}
			var want bytes.Buffer
			if err := json.Compact(&want, data); err != nil {
				t.Fatalf("accepted %q that json.Compact refuses: %v", data, err)
			}
			if !bytes.Equal(want.Bytes(), got) {
				t.Fatalf("UnmarshalJSON(%q) = %q, want the compacted input %q", data, got, want.Bytes())
			}
			// The marshaller writes it back unchanged.
			if out := marshal(scalar.MarshalJSON(got)); out != string(got) {
				t.Fatalf("MarshalJSON(%q) wrote %q", got, out)
			}
		}

		// As an inline literal or another transport's decoded value.
		var v any
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.UseNumber()
		if dec.Decode(&v) == nil {
			enc, err := scalar.UnmarshalJSON(v)
			if err != nil {
				requireBadInput(t, err, "%#v", v)
			} else if !json.Valid(enc) {
				t.Fatalf("UnmarshalJSON(%#v) = %q, not valid JSON", v, enc)
			}
		}

		// And as a plain string: always encodable.
		enc, err := scalar.UnmarshalJSON(string(data))
		if err != nil {
			t.Fatalf("UnmarshalJSON(string %q): %v", data, err)
		}
		if !json.Valid(enc) {
			t.Fatalf("UnmarshalJSON(string %q) = %q, not valid JSON", data, enc)
		}
	})
}

// ---- Time

var wireTime = regexp.MustCompile(`^"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z"$`)

func TestMarshalTime(t *testing.T) {
	t.Parallel()
	zone := time.FixedZone("UTC+5:30", 5*3600+1800)
	for _, c := range []struct {
		in   time.Time
		want string
	}{
		{time.Date(2031, 3, 4, 5, 6, 7, 123456789, time.UTC), `"2031-03-04T05:06:07.123456Z"`}, // truncated, not rounded
		{time.Date(2031, 3, 4, 5, 6, 7, 0, time.UTC), `"2031-03-04T05:06:07.000000Z"`},         // zeros kept
		{time.Date(2031, 3, 4, 5, 6, 7, 1000, time.UTC), `"2031-03-04T05:06:07.000001Z"`},
		{time.Date(2031, 1, 1, 3, 0, 0, 999999999, zone), `"2030-12-31T21:30:00.999999Z"`}, // converted to UTC
		{time.Date(2031, 3, 4, 5, 6, 7, 500, time.Local), ""},
	} {
		got := marshal(scalar.MarshalTime(c.in))
		require.Regexp(t, wireTime, got, c.in)
		if c.want != "" {
			require.Equal(t, c.want, got)
		}
		// It reads back as the same instant, to the microsecond.
		s, err := strconv.Unquote(got)
		require.NoError(t, err)
		back, err := scalar.UnmarshalTime(s)
		require.NoError(t, err)
		require.True(t, back.Equal(c.in.Truncate(time.Microsecond)), "%s → %s", c.in, back)
		require.Equal(t, time.UTC, back.Location())
	}
}

func TestUnmarshalTime(t *testing.T) {
	t.Parallel()
	got, err := scalar.UnmarshalTime("2031-03-04T10:36:07.123456789+05:30")
	require.NoError(t, err)
	require.Equal(t, time.Date(2031, 3, 4, 5, 6, 7, 123456789, time.UTC), got)
	require.Equal(t, time.UTC, got.Location())

	got, err = scalar.UnmarshalTime("2031-03-04T05:06:07Z")
	require.NoError(t, err)
	require.Equal(t, time.Date(2031, 3, 4, 5, 6, 7, 0, time.UTC), got)

	for _, in := range []any{"", "yesterday", "2031-03-04", "2031-03-04 05:06:07", "2031-03-04T05:06:07", 1700000000, nil, json.Number("1")} {
		_, err := scalar.UnmarshalTime(in)
		requireBadInput(t, err, "%#v", in)
	}
}

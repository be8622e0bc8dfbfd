package graph

import (
	"fmt"
	"net/http"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"rendezvous/auth"
)

func TestParseTrustedProxies(t *testing.T) {
	got, err := ParseTrustedProxies(" 10.0.0.0/8, 192.168.1.7 ,fd00::/8,2001:db8::1 ::ffff:172.16.0.1")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.0/8", "192.168.1.7/32", "fd00::/8", "2001:db8::1/128", "172.16.0.1/32"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if p, _ := ParseTrustedProxies("10.1.2.3/8"); p[0].String() != "10.0.0.0/8" {
		t.Fatalf("host bits not masked: %v", p)
	}
	for _, bad := range []string{"10.0.0.0/33", "proxy.internal", "10.0.0", "1.2.3.4:80"} {
		if _, err := ParseTrustedProxies(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestClientAddr(t *testing.T) {
	trusted, err := ParseTrustedProxies("10.0.0.0/8, 2001:db8::/32")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		what    string
		trusted []netip.Prefix
		peer    string
		xff     []string
		want    string
	}{
		{"no proxies configured: XFF is not believed", nil, "198.51.100.7:4000", []string{"203.0.113.1"}, "198.51.100.7"},
		{"an untrusted peer's XFF is not believed", trusted, "198.51.100.7:4000", []string{"203.0.113.1"}, "198.51.100.7"},
		{"a trusted proxy's client", trusted, "10.1.1.1:4000", []string{"203.0.113.1"}, "203.0.113.1"},
		{"a chain of trusted proxies is skipped from the right", trusted, "10.1.1.1:4000", []string{"203.0.113.1, 10.2.2.2, 10.3.3.3"}, "203.0.113.1"},
		{"what the client wrote left of the first untrusted hop is ignored", trusted, "10.1.1.1:4000", []string{"1.1.1.1, 203.0.113.1, 10.3.3.3"}, "203.0.113.1"},
		{"a spoofed trusted-looking address left of the client is ignored", trusted, "10.1.1.1:4000", []string{"10.9.9.9, 203.0.113.1"}, "203.0.113.1"},
		{"several headers are one list", trusted, "10.1.1.1:4000", []string{"203.0.113.1", "10.2.2.2"}, "203.0.113.1"},
		{"garbage: the peer", trusted, "10.1.1.1:4000", []string{"203.0.113.1, not-an-ip"}, "10.1.1.1"},
		{"an empty hop is garbage", trusted, "10.1.1.1:4000", []string{"203.0.113.1,,10.2.2.2"}, "10.1.1.1"},
		{"no XFF from a trusted proxy: the proxy", trusted, "10.1.1.1:4000", nil, "10.1.1.1"},
		{"every hop trusted: the leftmost", trusted, "10.1.1.1:4000", []string{"10.7.7.7, 10.2.2.2"}, "10.7.7.7"},
		{"hops with ports and brackets", trusted, "10.1.1.1:4000", []string{"[2001:db9::5]:443, 203.0.113.9:80"}, "203.0.113.9"},
		{"a zoned peer address", trusted, "[2001:db8::1%eth0]:4000", []string{"203.0.113.5"}, "203.0.113.5"},
		{"IPv6 proxy and client", trusted, "[2001:db8::1]:4000", []string{"2001:db9::5"}, "2001:db9::5"},
		{"an IPv4-mapped peer is its IPv4 address", trusted, "[::ffff:10.1.1.1]:4000", []string{"::ffff:203.0.113.4"}, "203.0.113.4"},
	} {
		r := &http.Request{RemoteAddr: tc.peer, Header: http.Header{}}
		for _, v := range tc.xff {
			r.Header.Add("X-Forwarded-For", v)
		}
		if got := clientAddr(tc.trusted, r); got != tc.want {
			t.Errorf("%s: got %s, want %s", tc.what, got, tc.want)
		}
	}
}

// fakeClock is a settable clock for the limiter.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func TestRateLimiterKinds(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1_000_000, 0)}
	l := newRateLimiter(callerRate{}, callerRate{Rate: 1, Burst: 2}, 0, clk.now)
	anon := &auth.Principal{Kind: auth.Anonymous}
	server := &auth.Principal{Kind: auth.Server, Key: "srv:a"}
	own := &auth.Principal{Kind: auth.Server, Key: "srv:b", Limit: &auth.Limit{Rate: 0.5, Burst: 3}}
	if got := l.limitOf(server); !got.unlimited() {
		t.Fatalf("server tokens: %+v, want no limit by default", got)
	}
	for i := range 10_000 {
		if ok, _ := l.allow(server.Key, l.limitOf(server), 50); !ok {
			t.Fatalf("a server token was limited after %d mutations", i*50)
		}
	}
	if ok, _ := l.allow("ip:1", l.limitOf(anon), 2); !ok {
		t.Fatal("anonymous burst refused")
	}
	ok, wait := l.allow("ip:1", l.limitOf(anon), 1)
	if ok || wait != time.Second {
		t.Fatalf("past the burst: ok=%v wait=%s, want refused for 1s", ok, wait)
	}
	if ok, _ := l.allow("ip:2", l.limitOf(anon), 2); !ok {
		t.Fatal("another address shares the bucket")
	}
	if ok, wait := l.allow("ip:3", l.limitOf(anon), 5); ok || wait != 5*time.Second {
		t.Fatalf("more than the burst at once: ok=%v wait=%s", ok, wait)
	}
	if ok, _ := l.allow(own.Key, l.limitOf(own), 3); !ok {
		t.Fatal("a token's own burst refused")
	}
	if ok, _ := l.allow(own.Key, l.limitOf(own), 1); ok {
		t.Fatal("a token's own limit not applied")
	}
	clk.t = clk.t.Add(2 * time.Second)
	if ok, _ := l.allow(own.Key, l.limitOf(own), 1); !ok {
		t.Fatal("no refill at 0.5/s after 2s")
	}
}

// A flood of distinct callers must not grow the table without bound: idle
// limiters are dropped, and past the cap the least recently used.
func TestRateLimiterBoundedMemory(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1_000_000, 0)}
	const maxCallers = 1000
	l := newRateLimiter(callerRate{}, callerRate{Rate: 1, Burst: 5}, maxCallers, clk.now)
	lim := l.limitOf(nil)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const flood = 200_000
	for i := range flood {
		l.allow(fmt.Sprintf("ip:%d", i), lim, 1)
		if i%10_000 == 0 {
			clk.t = clk.t.Add(time.Millisecond)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if n := l.size(); n > maxCallers {
		t.Fatalf("%d limiters kept after %d distinct callers; cap %d", n, flood, maxCallers)
	}
	// A limiter with its key and list element is a few hundred bytes:
	// 1000 of them stay well under 1 MB, where 200,000 would be ~40 MB.
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 4<<20 {
		t.Fatalf("heap grew %d bytes for %d distinct callers", grew, flood)
	}

	// Idle limiters are dropped by the minute sweep.
	if ok, _ := l.allow("ip:busy", lim, 5); !ok {
		t.Fatal("burst refused")
	}
	clk.t = clk.t.Add(2 * time.Minute)
	if ok, _ := l.allow("ip:busy", lim, 5); !ok { // refilled
		t.Fatal("burst refused after refill")
	}
	clk.t = clk.t.Add(61 * time.Second)
	l.allow("ip:new", lim, 1) // a sweep: every idle limiter goes
	if n := l.size(); n != 1 {
		t.Fatalf("%d limiters kept after a minute idle, want 1 (the new caller)", n)
	}
	// The busy caller's bucket refilled long ago: dropping it lost nothing.
	if ok, _ := l.allow("ip:busy", lim, 5); !ok {
		t.Fatal("a dropped idle limiter came back with less than a full bucket")
	}
}

func TestRateLimiterLimitChangeTakesEffect(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1_000_000, 0)}
	l := newRateLimiter(callerRate{}, callerRate{}, 0, clk.now)
	if ok, _ := l.allow("k", callerRate{Rate: 1, Burst: 1}, 1); !ok {
		t.Fatal("first refused")
	}
	if ok, _ := l.allow("k", callerRate{Rate: 1, Burst: 1}, 1); ok {
		t.Fatal("second allowed")
	}
	if ok, _ := l.allow("k", callerRate{Rate: 100, Burst: 100}, 50); !ok {
		t.Fatal("a raised limit was not applied")
	}
}

package delivery

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestAllowListMatchesOnHostAndSegments(t *testing.T) {
	a, err := ParseAllowList("https://a.com, http://127.0.0.1:8081/hooks/ , https://b.com/api")
	require.NoError(t, err)
	allowed := []string{
		"https://a.com", "https://a.com/", "https://a.com/x/y?q=1", "https://A.COM/x", "https://a.com:443/x",
		"http://127.0.0.1:8081/hooks", "http://127.0.0.1:8081/hooks/run",
		"https://b.com/api", "https://b.com/api/v1",
	}
	for _, u := range allowed {
		require.NoError(t, a.Check(u), u)
	}
	refused := []string{
		"https://a.com.evil.net", "https://a.com.evil.net/", "https://evil.net/https://a.com",
		"http://a.com", "https://a.com:8443/", "https://user:pw@a.com/", "https://a.com@evil.net/",
		"https://a.com/x#frag", "https://a.com/../x", "https://a.com/x/%2e%2e/y", "https://a.com/x%2fy",
		"http://127.0.0.1:8082/hooks", "http://127.0.0.1:8081/hooksx", "http://127.0.0.1:8081/", "http://127.0.0.1:8081/other/hooks",
		"https://b.com/apix", "https://b.com/ap", "https://b.com//api", "https://b.com/api/../admin",
		"ftp://a.com/", "//a.com/", "a.com", "https://a.com\\@evil.net/", "https://a.com /", "https://a.com./x",
		"javascript:alert(1)", "",
	}
	for _, u := range refused {
		require.Error(t, a.Check(u), u)
	}
	var empty *AllowList
	require.ErrorIs(t, empty.Check("https://a.com"), ErrEmptyAllowList)
	e, err := ParseAllowList(" , ")
	require.NoError(t, err)
	require.True(t, e.Empty())
	require.ErrorIs(t, e.Check("https://a.com"), ErrEmptyAllowList)
	for _, bad := range []string{"a.com", "ftp://a.com", "https://u@a.com", "https://a.com/?x=1"} {
		_, err := ParseAllowList(bad)
		require.Error(t, err, bad)
	}
}

func TestBackoffWithinBounds(t *testing.T) {
	base, maxWait := time.Second, 10*time.Second
	for n := 1; n <= 10; n++ {
		want := base << (n - 1)
		for range 200 {
			d := Backoff(base, maxWait, n)
			require.LessOrEqual(t, d, maxWait)
			if want < maxWait {
				require.GreaterOrEqual(t, d, time.Duration(float64(want)*0.8), "attempt %d", n)
				require.LessOrEqual(t, d, time.Duration(float64(want)*1.2), "attempt %d", n)
			} else {
				require.GreaterOrEqual(t, d, time.Duration(float64(maxWait)*0.8))
			}
		}
	}
}

//go:build !rendezvous_testclock

package service

import "fmt"

// testClockBuild says whether this build honours the test clock.
const testClockBuild = false

// testClockSkew refuses RENDEZVOUS_TEST_CLOCK_SKEW in an ordinary build. A
// clock that lies on purpose is a test's tool, not an operator's setting:
// kept out of the production binary, it cannot be left set by mistake, and
// refusing it (rather than ignoring it) means that a test which built the
// binary without the tag fails at once instead of silently running with
// clocks that agree.
func testClockSkew(getenv func(string) string, _ *Config) error {
	if v := getenv(testClockSkewEnv); v != "" {
		return fmt.Errorf("%s %q: only a test build (go build -tags rendezvous_testclock) honours it", testClockSkewEnv, v)
	}
	return nil
}

//go:build rendezvous_testclock

package service

import (
	"fmt"
	"time"
)

// testClockBuild says whether this build honours the test clock.
const testClockBuild = true

// testClockSkew sets Engine.ClockSkew from RENDEZVOUS_TEST_CLOCK_SKEW (a
// signed duration such as 60s or -60s), so that tests can run server
// processes whose clocks disagree (e2e TestReplicasWithFaults). Only a
// binary built with -tags rendezvous_testclock reads it: see testclock_off.go.
func testClockSkew(getenv func(string) string, cfg *Config) error {
	v := getenv(testClockSkewEnv)
	if v == "" {
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("%s %q: want a signed duration such as 60s or -60s", testClockSkewEnv, v)
	}
	cfg.Engine.ClockSkew = d
	return nil
}

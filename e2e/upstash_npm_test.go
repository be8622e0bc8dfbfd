package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// Upstash's own npm Client (@upstash/workflow, pinned in
// e2e/upstash/package.json) against the server with only baseUrl and token
// set: every Client method this service serves, what a user's code reads
// of their results, errors as QstashError in Upstash's shape, and the
// interplay with GraphQL (e2e/upstash/client.mjs). Needs node and
// `npm install` in e2e/upstash (.ci/run does both and sets
// RENDEZVOUS_REQUIRE_JS=1 so that a missing toolchain fails instead of skipping).
func TestUpstashJavaScriptClient(t *testing.T) {
	node, err := exec.LookPath("node")
	_, modErr := os.Stat(filepath.Join("upstash", "node_modules", "@upstash", "workflow"))
	if err != nil || modErr != nil {
		if os.Getenv("RENDEZVOUS_REQUIRE_JS") == "1" {
			t.Fatalf("node (%v) and e2e/upstash/node_modules (%v) are required", err, modErr)
		}
		t.Skip("Upstash client tests SKIPPED: need node and `cd e2e/upstash && npm install --no-package-lock`")
	}
	testdb.Dialects(t, func(t *testing.T, db string) {
		recv := newHookReceiver(t)
		hook := recv.srv.URL + "/wf"
		e := secEnv(t, db, func(c *service.Config) {
			c.Outbound.Allowed = hook
			c.Outbound.SigningSecrets = []string{signingSecret}
		})
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, node, filepath.Join("upstash", "client.mjs"), e.srv.URL, secAdminToken, hook)
		// The client reads these from the environment when they are set:
		// the test must not depend on the machine's.
		cmd.Env = append(os.Environ(), "QSTASH_DEV=", "QSTASH_URL=", "QSTASH_TOKEN=", "UPSTASH_DISABLE_TELEMETRY=1")
		out, err := cmd.CombinedOutput()
		t.Logf("client.mjs:\n%s", out)
		if err != nil {
			t.Fatalf("Upstash client checks failed: %v", err)
		}
	})
}

package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"rendezvous/internal/testdb"
)

// Real JavaScript clients (graphql-ws as GraphiQL uses it, the legacy
// subscriptions-transport-ws, graphql-sse) against the server: notified,
// canceled and lookback, each on every client. Needs node and
// `npm install` in e2e/jsclient (.ci/run does both and sets
// RENDEZVOUS_REQUIRE_JS=1 so that a missing toolchain fails instead of skipping).
func TestJavaScriptClients(t *testing.T) {
	node, err := exec.LookPath("node")
	_, modErr := os.Stat(filepath.Join("jsclient", "node_modules", "graphql-ws"))
	if err != nil || modErr != nil {
		if os.Getenv("RENDEZVOUS_REQUIRE_JS") == "1" {
			t.Fatalf("node (%v) and e2e/jsclient/node_modules (%v) are required", err, modErr)
		}
		t.Skip("JavaScript client tests SKIPPED: need node and `cd e2e/jsclient && npm install --no-package-lock`")
	}
	testdb.Dialects(t, func(t *testing.T, db string) {
		e := newEnv(t, db)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, node, filepath.Join("jsclient", "clients.mjs"), e.endpoint).CombinedOutput()
		t.Logf("clients.mjs:\n%s", out)
		if err != nil {
			t.Fatalf("JavaScript clients failed: %v", err)
		}
	})
}

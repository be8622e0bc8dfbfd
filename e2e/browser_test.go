package e2e

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// GraphQL Playground in a real browser, as a person uses it: headless
// Chromium driven by e2e/browser/playground.mjs (playwright-core) pastes the
// README's lookback race (trigger, notify, then waitForEvent: the event is
// there at once) and a live wait (waitForEvent first, notify from a second
// request) into GraphiQL and reads the result pane. Playground's scripts are
// the npm files of e2e/browser/node_modules, served by a local server through
// PlaygroundAssets, as on a network without the public CDN. Needs node,
// chromium and `npm install` in e2e/browser (.ci/run does all three and sets
// RENDEZVOUS_REQUIRE_BROWSER=1 so that a missing one fails instead of skipping).
func TestPlaygroundInBrowser(t *testing.T) {
	node, chromium, modules := browserTools(t)

	// The npm packages' files, as the CDN serves them: <base>/graphiql/…,
	// <base>/react/…, <base>/react-dom/…. Playground loads them with
	// crossorigin="anonymous" and integrity hashes, so this other origin
	// must answer with CORS headers.
	var (
		mu     sync.Mutex
		served []string
	)
	assetMux := http.NewServeMux()
	for _, pkg := range []string{"graphiql", "react", "react-dom"} {
		prefix := "/" + pkg + "/"
		assetMux.Handle("GET "+prefix, http.StripPrefix(prefix, http.FileServer(http.Dir(filepath.Join(modules, pkg)))))
	}
	assets := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		served = append(served, r.URL.Path)
		mu.Unlock()
		w.Header().Set("Access-Control-Allow-Origin", "*")
		assetMux.ServeHTTP(w, r)
	}))
	t.Cleanup(assets.Close)

	e := newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.PlaygroundAssets = assets.URL })

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, node, filepath.Join("browser", "playground.mjs"), e.srv.URL+"/")
	cmd.Env = append(os.Environ(), "RENDEZVOUS_CHROMIUM="+chromium)
	// On timeout, SIGINT lets playwright close Chromium before node exits.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("playground.mjs (%s):\n%s", time.Since(start).Round(time.Millisecond), out)
	if err != nil {
		t.Fatalf("Playground in the browser failed: %v", err)
	}

	mu.Lock()
	defer mu.Unlock()
	for _, want := range []string{
		"/graphiql/graphiql.min.js", "/graphiql/graphiql.min.css",
		"/react/umd/react.production.min.js", "/react-dom/umd/react-dom.production.min.js",
	} {
		found := false
		for _, p := range served {
			found = found || p == want
		}
		if !found {
			t.Errorf("the page never loaded %s from the asset server (served: %s)", want, strings.Join(served, ", "))
		}
	}
}

// browserTools returns node, chromium and e2e/browser/node_modules, or
// skips the test (fails it under RENDEZVOUS_REQUIRE_BROWSER=1).
func browserTools(t *testing.T) (node, chromium, modules string) {
	t.Helper()
	modules = filepath.Join("browser", "node_modules")
	node, nodeErr := exec.LookPath("node")
	chromium, chromiumErr := exec.LookPath("chromium")
	var modErr error
	for _, pkg := range []string{"playwright-core", "graphiql", "react", "react-dom"} {
		if _, err := os.Stat(filepath.Join(modules, pkg, "package.json")); err != nil && modErr == nil {
			modErr = err
		}
	}
	if nodeErr != nil || chromiumErr != nil || modErr != nil {
		if os.Getenv("RENDEZVOUS_REQUIRE_BROWSER") == "1" {
			t.Fatalf("node (%v), chromium (%v) and e2e/browser/node_modules (%v) are required", nodeErr, chromiumErr, modErr)
		}
		t.Skip("browser test SKIPPED: needs node, chromium (apt-get install chromium) and `cd e2e/browser && npm install --no-package-lock`")
	}
	return node, chromium, modules
}

// runLoad runs browser/load.mjs on the page in the mode (offline, loads)
// and returns its output. The screenshot goes to the test's temporary
// directory, or to RENDEZVOUS_BROWSER_SCREENSHOT.
func runLoad(t *testing.T, node, chromium, pageURL, mode string) string {
	t.Helper()
	shot := os.Getenv("RENDEZVOUS_BROWSER_SCREENSHOT")
	if shot == "" {
		shot = filepath.Join(t.TempDir(), "playground-"+mode+".png")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, node, filepath.Join("browser", "load.mjs"), pageURL, shot, mode)
	cmd.Env = append(os.Environ(), "RENDEZVOUS_CHROMIUM="+chromium)
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("load.mjs %s (%s):\n%s", mode, time.Since(start).Round(time.Millisecond), out)
	if err != nil {
		t.Fatalf("load.mjs %s: %v", mode, err)
	}
	return string(out)
}

// Playground whose scripts cannot be loaded, in a real browser: the page
// shows what failed and what to do (the setting, the address it tried)
// instead of "Loading…" forever.
func TestPlaygroundOfflineInBrowser(t *testing.T) {
	node, chromium, _ := browserTools(t)
	dead := "http://" + deadAddress(t) + "/npm"
	e := newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.PlaygroundAssets = dead })
	out := runLoad(t, node, chromium, e.srv.URL+"/", "offline")
	for _, want := range []string{"RENDEZVOUS_PLAYGROUND_ASSETS", dead, "This script failed to load: " + dead + "/"} {
		if !strings.Contains(out, want) {
			t.Errorf("the message does not say %q", want)
		}
	}
}

// RENDEZVOUS_PLAYGROUND_ASSETS naming a node_modules directory: the binary
// serves the packages and GraphiQL renders (integrity hashes and all).
func TestPlaygroundAssetsDirectoryInBrowser(t *testing.T) {
	node, chromium, modules := browserTools(t)
	dir, err := filepath.Abs(modules)
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.PlaygroundAssets = dir })
	runLoad(t, node, chromium, e.srv.URL+"/", "loads")
}

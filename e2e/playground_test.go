package e2e

import (
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"rendezvous/internal/testdb"
	"rendezvous/service"
)

// deadAddress is an address nothing listens on: a port that was just
// closed.
func deadAddress(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

// Playground on a machine that cannot reach where its scripts are: the page
// itself says what failed and what to do (name the setting and the host it
// tried) instead of "Loading…" forever. The page carries a handler for
// script load errors and a timeout for scripts that never arrive.
func TestPlaygroundOfflineHint(t *testing.T) {
	dead := "http://" + deadAddress(t) + "/npm"
	e := newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.PlaygroundAssets = dead })
	resp, body := httpGet(t, e.srv.URL+"/")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, dead+"/react/umd/react.production.min.js", "the scripts come from the configured base")
	require.Contains(t, body, "RENDEZVOUS_PLAYGROUND_ASSETS", "the page names the setting")
	require.Contains(t, body, `addEventListener('error'`, "a handler for scripts that fail to load")
	require.Contains(t, body, "setTimeout(", "a timeout for scripts that never arrive")
	head := body[:strings.Index(body, "<script\n")]
	require.Contains(t, head, "rendezvous-playground-error", "the handler is in place before the first script tag")
	require.Contains(t, body, `"`+dead+`"`, "the page names the base it tried")

	// The default: the public CDN, named in the message.
	e2 := newEnv(t, testdb.SQLite(t))
	_, body = httpGet(t, e2.srv.URL+"/")
	require.Contains(t, body, "https://cdn.jsdelivr.net/npm/graphiql@4.1.2/graphiql.min.js")
	require.Contains(t, body, `"https://cdn.jsdelivr.net/npm"`)
	require.Contains(t, body, "RENDEZVOUS_PLAYGROUND_ASSETS")
}

// RENDEZVOUS_PLAYGROUND_ASSETS may name a local directory laid out as
// node_modules (what `npm install graphiql@4.1.2 react@18.2.0
// react-dom@18.2.0` leaves): the binary serves the three packages from it
// at /playground-assets/, and nothing else from it.
func TestPlaygroundAssetsFromDirectory(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"graphiql/graphiql.min.js", "react/umd/react.production.min.js", "other/secret.txt"} {
		require.NoError(t, os.MkdirAll(filepath.Join(dir, filepath.Dir(f)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, f), []byte("// "+f), 0o644))
	}
	e := newEnv(t, testdb.SQLite(t), func(c *service.Config) { c.PlaygroundAssets = dir })
	_, body := httpGet(t, e.srv.URL+"/")
	require.Contains(t, body, `src="/playground-assets/react/umd/react.production.min.js"`)
	require.Contains(t, body, `src="/playground-assets/graphiql/graphiql.min.js"`)

	resp, got := httpGet(t, e.srv.URL+"/playground-assets/graphiql/graphiql.min.js")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "// graphiql/graphiql.min.js", got)
	for _, p := range []string{"/playground-assets/other/secret.txt", "/playground-assets/graphiql/", "/playground-assets/", "/playground-assets/react/../other/secret.txt"} {
		resp, _ = httpGet(t, e.srv.URL+p)
		require.Equal(t, http.StatusNotFound, resp.StatusCode, p)
	}
}

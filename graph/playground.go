package graph

import (
	"bytes"
	"html/template"
	"io/fs"
	"net/http"
	"os"
	"strings"

	"github.com/99designs/gqlgen/graphql/playground"
)

// Playground is gqlgen's GraphiQL page. Its scripts (graphiql, react,
// react-dom) are npm packages that the page loads from the public CDN, from
// a base URL (RENDEZVOUS_PLAYGROUND_ASSETS), or from a local directory that
// the binary serves at /playground-assets/. They are not embedded in the
// binary: GraphiQL's bundle alone is several MB, which would be a blob in
// the repository to update by hand for a page production turns off;
// pointing the setting at `npm install`'s node_modules gives the same
// offline Playground without it.
//
// A browser that cannot fetch them showed "Loading…" forever; the page now
// carries a script, ahead of the others, that replaces it with what failed
// and what to do.

// playgroundCDN is where gqlgen's page loads the packages from by default.
const playgroundCDN = "https://cdn.jsdelivr.net/npm"

// playgroundAssetsPath is where a local asset directory is served.
const playgroundAssetsPath = "/playground-assets/"

// playgroundPackages are the npm packages the page loads.
var playgroundPackages = []string{"graphiql", "react", "react-dom"}

// playgroundTimeoutMS: scripts that have not arrived by then are reported
// (a host that black-holes connections raises no error for a long time).
const playgroundTimeoutMS = 15000

// servePlayground adds Playground at / to mux and, when assets names a
// local directory, the packages' files at /playground-assets/.
func servePlayground(mux *http.ServeMux, assets string) {
	base := assets
	if isLocalDirectory(assets) {
		base = strings.TrimSuffix(playgroundAssetsPath, "/")
		mux.Handle("GET "+playgroundAssetsPath, packageFiles(assets))
	}
	page := playgroundPage(base)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache")
		w.Write(page)
	})
}

// isLocalDirectory: a value without a scheme that names a directory. Any
// other value is a base URL (absolute, or a path on this origin that a
// proxy in front serves).
func isLocalDirectory(assets string) bool {
	if assets == "" || strings.Contains(assets, "://") {
		return false
	}
	fi, err := os.Stat(assets)
	return err == nil && fi.IsDir()
}

// packageFiles serves the regular files of the three packages under dir,
// and nothing else: no listings, no other package, nothing outside.
func packageFiles(dir string) http.Handler {
	fsys := os.DirFS(dir)
	files := http.FileServerFS(fsys)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name := strings.TrimPrefix(r.URL.Path, playgroundAssetsPath)
		pkg, _, _ := strings.Cut(name, "/")
		fi, err := fs.Stat(fsys, name)
		if !fs.ValidPath(name) || !isPlaygroundPackage(pkg) || err != nil || !fi.Mode().IsRegular() {
			http.NotFound(w, r)
			return
		}
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/" + name
		files.ServeHTTP(w, r2)
	})
}

func isPlaygroundPackage(name string) bool {
	for _, p := range playgroundPackages {
		if name == p {
			return true
		}
	}
	return false
}

// playgroundPage renders gqlgen's page for the asset base ("" is the CDN),
// with the load-failure script ahead of the page's own.
func playgroundPage(base string) []byte {
	var opts []playground.GraphiqlConfigOption
	if base != "" {
		opts = playgroundAssets(base)
	} else {
		base = playgroundCDN
	}
	var page pageWriter
	playground.Handler("Rendezvous", "/query", opts...).ServeHTTP(&page, &http.Request{})
	var hint bytes.Buffer
	if err := playgroundHint.Execute(&hint, map[string]any{"Base": base, "TimeoutMS": playgroundTimeoutMS}); err != nil {
		panic(err) // a constant template with constant data
	}
	html := page.body.Bytes()
	// After the charset (which must come within the first 1024 bytes),
	// before the first script.
	at := -1
	for _, mark := range []string{`<meta charset="utf-8">`, "<head>"} {
		if i := bytes.Index(html, []byte(mark)); i >= 0 {
			at = i + len(mark)
			break
		}
	}
	if at < 0 {
		return append(hint.Bytes(), html...)
	}
	return append(append(append([]byte{}, html[:at]...), hint.Bytes()...), html[at:]...)
}

// playgroundAssets points Playground at other copies of its scripts. The
// integrity hashes are those of the published npm files, the same that
// gqlgen pins for the CDN.
func playgroundAssets(base string) []playground.GraphiqlConfigOption {
	base = strings.TrimRight(base, "/")
	return []playground.GraphiqlConfigOption{
		playground.WithGraphiqlVersion(
			base+"/graphiql/graphiql.min.js", base+"/graphiql/graphiql.min.css",
			"sha256-hnImuor1znlJkD/FOTL3jayfS/xsyNoP04abi8bFJWs=", "sha256-MEh+B2NdMSpj9kexQNN3QKc8UzMrCXW/Sx/phcpuyIU="),
		playground.WithGraphiqlReactVersion(
			base+"/react/umd/react.production.min.js", base+"/react-dom/umd/react-dom.production.min.js",
			"sha256-S0lp+k7zWUMk2ixteM6HZvu8L9Eh//OVrt+ZfbCpmgY=", "sha256-IXWO0ITNDjfnNXIu5POVfqlgYoop36bDzhodR6LW5Pc="),
	}
}

// pageWriter captures the page gqlgen's handler writes.
type pageWriter struct {
	header http.Header
	body   bytes.Buffer
}

func (p *pageWriter) Header() http.Header {
	if p.header == nil {
		p.header = http.Header{}
	}
	return p.header
}
func (p *pageWriter) Write(b []byte) (int, error) { return p.body.Write(b) }
func (p *pageWriter) WriteHeader(int)             {}

// playgroundHint runs before the page's scripts: a script that fails to
// load (refused, unreachable, blocked, integrity mismatch) fires an error
// event that only a capturing listener on window sees; one that never
// arrives is caught by the timeout. The message replaces "Loading…".
var playgroundHint = template.Must(template.New("hint").Parse(`
	<script>
	(function () {
		var base = {{.Base}};
		var box = null;
		function show(failed) {
			if (box) return;
			box = document.createElement('div');
			box.id = 'rendezvous-playground-error';
			box.setAttribute('role', 'alert');
			box.style.cssText = 'position:fixed;inset:0;z-index:10;overflow:auto;background:#fff;color:#222;' +
				'font:16px/1.5 system-ui,sans-serif;padding:2rem 3rem;max-width:52rem';
			function add(tag, text) {
				var el = document.createElement(tag);
				el.textContent = text;
				box.appendChild(el);
			}
			add('h1', 'Playground cannot load its scripts');
			add('p', failed ? 'This script failed to load: ' + failed :
				'Its scripts have not arrived after ' + ({{.TimeoutMS}} / 1000) + ' seconds.');
			add('p', 'Playground (GraphiQL) loads the npm packages graphiql@4.1.2, react@18.2.0 and react-dom@18.2.0 from ' +
				base + '. This browser cannot reach that host, or what came back did not match its integrity hash.');
			add('p', 'To fix it, set RENDEZVOUS_PLAYGROUND_ASSETS on the server to a base URL this browser can reach that serves ' +
				'those packages, or to a local directory with them (the node_modules left by ' +
				'"npm install graphiql@4.1.2 react@18.2.0 react-dom@18.2.0"), and restart the server. README: "Playground".');
			add('p', 'The API does not need Playground: POST GraphQL to /query, or subscribe over a websocket or SSE.');
			var loading = document.querySelector('.loading');
			if (loading) loading.remove();
			(document.body || document.documentElement).appendChild(box);
		}
		// A head script fails before <body> is parsed: "Loading…" comes later.
		document.addEventListener('DOMContentLoaded', function () {
			var loading = box && document.querySelector('.loading');
			if (loading) loading.remove();
		});
		window.addEventListener('error', function (e) {
			var t = e.target;
			if (t && t.tagName === 'SCRIPT' && t.src) show(t.src);
		}, true);
		var timer = setTimeout(function () { if (!window.GraphiQL) show(''); }, {{.TimeoutMS}});
		window.addEventListener('load', function () {
			clearTimeout(timer);
			if (!window.GraphiQL) {
				show('');
			} else if (box) {
				box.remove(); // slow, but it came
				box = null;
			}
		});
	})();
	</script>`))

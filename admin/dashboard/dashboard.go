// Package dashboard is the admin listener's live dashboard: one page,
// its script and its style sheet, embedded in the binary (no CDN, no build
// step; it works offline). The page reads GET /status/stream (server-sent
// events of the /status document) and falls back to polling GET /status
// every 500ms when the stream is not available; it renders the
// registration and check, every route with its nodes, the discovery
// watches, the supervised app and pub/sub.
package dashboard

import (
	"embed"
	"net/http"
)

//go:embed index.html app.js app.css
var files embed.FS

// contentSecurityPolicy lets the page load its own script and style sheet
// and read the admin listener, and nothing else.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Register adds GET / (the page) and GET /dashboard/app.js and
// /dashboard/app.css to mux.
func Register(mux *http.ServeMux) {
	mux.Handle("GET /{$}", file("index.html", "text/html; charset=utf-8"))
	mux.Handle("GET /dashboard/app.js", file("app.js", "text/javascript; charset=utf-8"))
	mux.Handle("GET /dashboard/app.css", file("app.css", "text/css; charset=utf-8"))
}

func file(name, contentType string) http.Handler {
	body, err := files.ReadFile(name)
	if err != nil {
		panic("dashboard: " + name + " is not embedded: " + err.Error()) // a build mistake, caught by the tests
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", contentType)
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Content-Security-Policy", contentSecurityPolicy)
		h.Set("Referrer-Policy", "no-referrer")
		if r.Method == http.MethodHead {
			return
		}
		_, _ = w.Write(body)
	})
}

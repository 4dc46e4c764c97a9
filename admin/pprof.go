package admin

import "net/http/pprof"

// EnablePprof serves net/http/pprof's runtime profiles under /debug/pprof/
// on the admin listener: CPU (profile?seconds=N), heap, allocs, goroutine,
// mutex, block and execution traces. Profiles show internals, and a CPU
// profile or a trace costs CPU while it runs, so leave it off unless asked
// for. Call it before the handler serves requests; it is not safe for use
// concurrently with them.
func (h *Handler) EnablePprof() {
	h.mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	h.mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	h.mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	h.mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	h.mux.HandleFunc("POST /debug/pprof/symbol", pprof.Symbol)
	h.mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
}

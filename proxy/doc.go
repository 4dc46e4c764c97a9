// Package proxy carries the app's outbound requests to healthy nodes: one
// listener per configured upstream (Upstream for HTTP, TCPServer for raw
// TCP), and a forward-proxy listener (Forwarder) where the request's host
// names the service. It is the request path; the protocol engines that
// read and write the bytes (HTTP/1.1, HTTP/2, the accept and sniff server)
// sit below it and never import it.
//
// # Where a request goes
//
//		listener → route → pick → attempt loop → engine → node
//		                                 ↓
//		                          errors → status
//
//	 1. Route. Each listener holds a route (route.go) behind an atomic
//	    pointer that a request or TCP connection loads once: the service, its
//	    balancer, its endpoints with their pools, limits and resilience
//	    state, and its retry budget. The forward proxy finds or makes the
//	    route from the request's host (forward.go). A config reload publishes
//	    a new route (Update); requests in flight finish on the one they
//	    started on, and a route that keeps the same endpoints adopts the old
//	    one's pools, breakers and ejections.
//	 2. Serve. Proxy.serve (proxy.go) turns away what the proxy does not
//	    carry, sends upgrades (WebSocket) to serveUpgrade (upgrade.go) and
//	    transcoded requests to serveTranscoded (transcode.go), sets the
//	    request's deadline, rewrites the outbound headers (prepareOutbound,
//	    headers.go) and relays the answer, trailers included.
//	 3. Pick and try: tryLoop (attempt.go). One loop serves requests,
//	    upgrade handshakes and TCP connections alike, in Caddy's shape: the
//	    loop stays in one function and each try is one call. The loop picks
//	    a node with the nodes tried so far excluded, asks the node to take
//	    the try (its breaker; for requests also its max_requests), makes the
//	    try through the protocol's attempt (httpTry in retry.go, upgradeTry in
//	    upgrade.go, tcpTry in tcp.go), and on a failure decides on a retry:
//	    retries.attempts, the retry budget, and internal/backoff's jittered
//	    delay before it. A try never sent to a node (a refused dial, an open
//	    breaker, a local limit) costs nothing from the budget and its first
//	    retry does not wait. The loop owns the per-try timeout and ends with
//	    the request's context. It takes no lock and adds no allocation: the
//	    attempt is chosen by a field, not an interface, so the per-request
//	    state stays on the stack.
//	 4. Engine. An attempt reaches its node through the endpoint's pools
//	    (pool.go): the HTTP/1.1 client pool (internal/h1's Pool), the h2c
//	    client pool (internal/h2's Pool), net/http's Transport for what
//	    neither takes (TLS, large streamed HTTP/1.1 bodies), or a dial for
//	    TCP. Per-node limits (limits.go, Envoy's circuit-breaker thresholds
//	    per node; they are h1.Limits and h2.Limits to the pools) bound
//	    connections, pending and in-flight requests; a refusal is
//	    ErrLocalLimit and the loop tries another node.
//	 5. Feedback. Every try's outcome goes back to the balancer through its
//	    pick's Done (latency, success), and to the node's breaker and outlier
//	    detection (reportTry). Those live in proxy/resilience, which keeps no
//	    clock of its own.
//	 6. Errors → status. classify (errors.go) is the one place an error
//	    becomes a status and an X-Sidecar-Error code: no endpoints or every
//	    breaker open → 503, dial failure → 502, deadline → 504, unknown
//	    service → 404; gRPC requests get the matching grpc-status instead.
//
// # Request bodies
//
// A request body is shared by the tries of one request (internal/replay's
// Body): held in memory when small (64 KiB) and known in size and
// the request may be replayed; otherwise streamed, and retried only while no
// byte of it has reached a node. A try given up while waiting for the
// client's next bytes hands them to the next try, so a retried request
// arrives whole.
//
// # What a request leaves behind (access.go, metrics.go)
//
// Upstream and Forwarder handlers start with observe: a W3C traceparent
// that arrives valid is passed on unchanged with its tracestate (the proxy
// records no span, so it is no parent); with StartTraces one that is
// missing or invalid is replaced by a new one. With the access log on,
// the handler's writer is wrapped in an accessWriter that records the
// status, grpc-status and bytes, and that serve, relay and the attempt
// loop tell the service, node and tries; its line is written when the
// handler returns. Off, nothing is wrapped and the hot path allocates
// nothing more. Answers the sidecar makes itself are logged at Warn
// either way (logRefused), sampled to 10 lines a second and one in 100
// beyond. The metrics count a gRPC call once its trailers are in, by
// grpc_code, and a TCP connection as a connection, never as a request;
// a node that leaves its route takes all its series along
// (routeMetrics.retire).
//
// # Mesh nodes (mesh.go)
//
// With a Mesh set (security.mtls on), a node whose service meta says it
// serves mTLS gets the route's mesh pool config instead of its own: the
// same engines (h1.Pool, and net/http's Transport for h2, since the h2c
// pool dials plaintext), each connection put under TLS in its dial by
// meshHandshake with the TLS config the route asked the identity for once.
// The engines above speak as over plaintext. A handshake the config
// refuses (another service's certificate) is a dial error: the request
// never left, so the try loop moves on to another node. A node whose meta
// changes to or from mTLS is a new endpoint.
//
// # Concurrency
//
// Handlers are safe for concurrent use. The hot path reads immutable
// snapshots (routeState, the balancer's picker) through atomic pointers and
// takes no lock; rebuilds after a discovery change or an ejection hold the
// route's mutex. Goroutines the package starts (relays, the idle sweep of
// node pools, schema fetches) stop with the route or the connection that
// owns them.
package proxy

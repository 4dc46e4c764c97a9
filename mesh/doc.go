// Package mesh gives the sidecar a service-mesh identity from Consul's
// built-in CA, and decides by Consul's intentions who may call the local app.
//
// # Identity
//
// An Identity follows two blocking queries against the local agent: the
// service's leaf certificate (/v1/agent/connect/ca/leaf/NAME) and the CA
// roots (/v1/agent/connect/ca/roots). Each answer is parsed once and swapped
// in atomically (one atomic.Pointer for the leaf, one for the roots). The
// tls.Configs it hands out (ServerTLS, ClientTLS) are built once and never
// rebuilt: they read the current state in GetCertificate,
// GetClientCertificate and VerifyConnection, so a rotated leaf or a new root
// takes effect on the next handshake, and connections already up keep
// going. This is what Consul's own connect package and Envoy's SDS do: the
// certificate is a value looked up per handshake, not a field of the config.
//
// Peers are verified against the roots by hand (InsecureSkipVerify with
// VerifyConnection, as Consul's connect package does), since Go's verifier
// would check a DNS name while mesh identities are SPIFFE URIs in the URI
// SAN: spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<name>. The client side
// refuses a peer whose URI names another service than the one it meant to
// reach (ErrWrongService), and counts it.
//
// # Intentions
//
// An Authorizer asks the agent (/v1/agent/connect/authorize) whether a
// caller's SPIFFE ID may reach this service. The agent answers from its own
// cache of intentions, which a blocking query keeps current, so the call is
// cheap; the Authorizer caches each answer for TTL (1s by default) besides,
// so a deny written through the API applies to new connections within TTL
// plus the agent's propagation (well under a second on a healthy agent). The
// Inbound listener also checks its open connections again every TTL and
// closes those whose caller is now denied, so the same bound holds for
// keep-alive connections. Denials are counted by caller and the last ones
// kept in a ring for /status.
//
// # Inbound
//
// Inbound accepts connections on service.inbound.listen, terminates mTLS
// with the leaf (strict), or also accepts plaintext when the first byte is
// not a TLS handshake record, 0x16 (permissive), authorizes the caller, and
// relays bytes to the app on loopback. A byte relay carries HTTP/1.1, h2,
// gRPC, WebSocket and TCP unchanged. Authorization is per connection: a
// denied HTTP/1.1 caller is answered 403, a denied h2 caller gets 403 (or
// grpc-status 7, PERMISSION_DENIED, for gRPC) on each stream, anything else
// is closed.
//
// Since the bytes are relayed, the listener's ALPN answer is the caller's
// own choice: the one protocol it offers (h2 from gRPC clients and from
// outbound sidecars of http2 and grpc upstreams), else http/1.1 when it
// offers that among others, which every HTTP app speaks. The app behind an
// h2 caller must speak h2c.
//
// # Outbound
//
// An outbound sidecar dials a node whose meta says it serves mTLS
// (NodeMTLS) with Identity.ClientTLS(service, "h2" for http2 and grpc,
// "http/1.1" for http, none for tcp), built once per route: the proxy
// (proxy.Mesh) decides per node from the discovery snapshot and does the
// handshake in its dial, so the handshake is paid once per pooled
// connection. ClientTLS wants the peer to be the service dialled in the
// identity's own namespace and partition; a refused peer fails the dial
// and the proxy tries another node.
//
// # Not yet: per-request intentions
//
// The agent's authorize endpoint is L4 only and denies a caller whose
// matching intention carries HTTP Permissions, so such a caller is refused
// whole (fail closed). Per-request evaluation would need the
// service-intentions config entries followed here and the inbound to parse
// requests (an HTTP/1.1 loop; for h2, HEADERS decoded alongside the relay
// with the app's HPACK state kept), which the byte relay does not do.
package mesh

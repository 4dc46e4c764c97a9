// Package httpwire holds the rules of HTTP's wire syntax that the
// sidecar's HTTP/1.1 and HTTP/2 engines, its request path and its config
// validation share, each written once so that the copies cannot drift:
//
//   - tokens (RFC 9110, 5.6.2): one 256-entry table behind ValidToken,
//     ValidLowerToken (HTTP/2 field names) and HasToken (comma-separated
//     lists such as Connection);
//   - canonical keys: CanonicalKey, the one canonicaliser, equal to
//     textproto.CanonicalMIMEHeaderKey for every input but returning an
//     already canonical key, or a common lower-case HTTP/2 name, without
//     allocating; LowerKey the other way, for HTTP/2;
//   - hop-by-hop fields (RFC 9110, 7.6.1): IsHopHeader, RemoveHopHeaders,
//     and UpgradeType for the one exchange that keeps them;
//   - status lines: StatusCode and StatusLine, precomputed for 0–599.
//
// Everything here is pure: no I/O, no state but tables built at init, and
// every function is safe for concurrent use. It imports nothing of the
// sidecar's, so any package may depend on it.
package httpwire

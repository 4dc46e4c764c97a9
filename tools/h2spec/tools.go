//go:build tools

// Package h2spec pins the version of h2spec, the HTTP/2 conformance suite,
// that `make h2spec` builds into bin/h2spec for the integration tests.
package h2spec

import _ "github.com/summerwind/h2spec/cmd/h2spec"

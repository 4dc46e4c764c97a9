//go:build tools

// Package consul pins the version of the Consul agent that `make consul`
// builds into bin/consul for the demo and the integration tests.
package consul

import _ "github.com/hashicorp/consul"

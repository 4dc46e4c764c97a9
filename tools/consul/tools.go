//go:build tools

// Package consul pins the version of the Consul agent that `make consul`
// builds into bin/consul for the demo and the integration tests: v1.16.3,
// the last MPL-2.0 release the module proxy serves (later ones are under the
// Business Source License).
package consul

import _ "github.com/hashicorp/consul"

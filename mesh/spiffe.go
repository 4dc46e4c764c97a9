package mesh

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// ServiceID is a service identity as Consul's CA writes it into a leaf's
// URI SAN: spiffe://<trust-domain>[/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<name>.
type ServiceID struct {
	TrustDomain string
	Partition   string // empty outside Consul Enterprise
	Namespace   string
	Datacenter  string
	Service     string
}

// URI returns the SPIFFE URI of id.
func (id ServiceID) URI() string {
	ap := ""
	if id.Partition != "" && id.Partition != "default" {
		ap = "/ap/" + id.Partition
	}
	return fmt.Sprintf("spiffe://%s%s/ns/%s/dc/%s/svc/%s", id.TrustDomain, ap, id.Namespace, id.Datacenter, id.Service)
}

// ErrNotServiceID is returned for a URI that is not a Consul service
// identity.
var ErrNotServiceID = errors.New("not a consul service spiffe id")

// ParseServiceID parses a service's SPIFFE URI. It takes exactly the
// segments above (an extra one, an empty one, a trailing slash, an escape,
// a query or a fragment refuse it), each of letters, digits, '-', '_' and
// '.'.
func ParseServiceID(uri string) (ServiceID, error) {
	// Consul writes the URI plainly: no escapes, user, port, query or
	// fragment, which a looser reading would let decode to a service
	// name or be dropped.
	if strings.ContainsAny(uri, "%?#@") {
		return ServiceID{}, fmt.Errorf("%q: %w", uri, ErrNotServiceID)
	}
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "spiffe" || u.Host == "" || u.Opaque != "" {
		return ServiceID{}, fmt.Errorf("%q: %w", uri, ErrNotServiceID)
	}
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	id := ServiceID{TrustDomain: strings.ToLower(u.Host)}
	if len(parts) == 8 && parts[0] == "ap" && validSegment(parts[1]) {
		id.Partition, parts = parts[1], parts[2:]
		if id.Partition == "default" {
			id.Partition = "" // Consul leaves the default partition out
		}
	}
	if len(parts) != 6 || parts[0] != "ns" || parts[2] != "dc" || parts[4] != "svc" ||
		!validSegment(parts[1]) || !validSegment(parts[3]) || !validSegment(parts[5]) || !validSegment(u.Host) {
		return ServiceID{}, fmt.Errorf("%q: %w", uri, ErrNotServiceID)
	}
	id.Namespace, id.Datacenter, id.Service = parts[1], parts[3], parts[5]
	return id, nil
}

// peerID returns the service identity in cert's URI SANs.
func peerID(cert *x509.Certificate) (ServiceID, string, error) {
	for _, u := range cert.URIs {
		if u.Scheme != "spiffe" {
			continue
		}
		id, err := ParseServiceID(u.String())
		if err == nil {
			return id, u.String(), nil
		}
	}
	return ServiceID{}, "", fmt.Errorf("peer certificate %s: %w", cert.Subject, ErrNotServiceID)
}

// validSegment reports whether s is a name as Consul allows in an
// identity: letters, digits, '-', '_' and '.'.
func validSegment(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

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

// ParseServiceID parses a service's SPIFFE URI.
func ParseServiceID(uri string) (ServiceID, error) {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "spiffe" || u.Host == "" {
		return ServiceID{}, fmt.Errorf("%q: %w", uri, ErrNotServiceID)
	}
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	id := ServiceID{TrustDomain: strings.ToLower(u.Host)}
	if len(parts) == 8 && parts[0] == "ap" {
		id.Partition, parts = parts[1], parts[2:]
	}
	if len(parts) != 6 || parts[0] != "ns" || parts[2] != "dc" || parts[4] != "svc" || parts[1] == "" || parts[3] == "" || parts[5] == "" {
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

package proxy

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// serviceFromRequest returns the service a forward-proxy request names: the
// host of an absolute-form URL (HTTP_PROXY style) or the Host header, with
// any port and a ".service.consul" suffix stripped; in Consul's DNS forms
// TAG.NAME.service.consul and NAME.service.DC.consul, the tag the instances
// must carry and the datacenter (in lower case) come back too. IP literals,
// localhost
// and anything that is not a valid service name are refused: the sidecar is
// not an open proxy. The name comes back as the client spelt it; service
// names are case-insensitive, as in DNS and Consul, and the forwarder folds
// it to look it up.
func serviceFromRequest(r *http.Request) (name, tag, dc string, err error) {
	host := r.Host
	if r.URL.Host != "" {
		host = r.URL.Host
	}
	return serviceName(host)
}

// serviceName turns a request host into a service name, tag and
// datacenter. See serviceFromRequest.
func serviceName(host string) (name, tag, dc string, err error) {
	var dns bool
	name, dns, dc, err = hostService(host)
	if err != nil || !dns {
		return name, "", "", err
	}
	// TAG.NAME.service.consul, as Consul DNS: the last label is the name.
	if i := strings.LastIndexByte(name, '.'); i >= 0 {
		name, tag = name[i+1:], name[:i]
		if tag == "" || !validServiceName(name) {
			return "", "", "", fmt.Errorf("%w: %q", ErrBadServiceName, host)
		}
	}
	return name, tag, dc, nil
}

// hostService strips a port and Consul's DNS suffix from host, says
// whether it had the suffix, and returns the datacenter the suffix named.
func hostService(host string) (name string, dns bool, dc string, err error) {
	if host == "" {
		return "", false, "", fmt.Errorf("%w: no host in request", ErrBadServiceName)
	}
	name = host
	if h, _, err := net.SplitHostPort(host); err == nil {
		name = h
	}
	if strings.HasPrefix(name, "[") || strings.Contains(name, ":") {
		return "", false, "", fmt.Errorf("%w: %q is an IP address", ErrBadServiceName, host)
	}
	name = strings.TrimRight(name, ".")
	if i := indexFold(name, ".service."); i >= 0 && hasSuffixFold(name, ".consul") {
		// name.service.consul or name.service.DC.consul, as Consul DNS.
		if from, to := i+len(".service."), len(name)-len(".consul"); from < to {
			rest := name[from:to]
			if !validDatacenter(rest) {
				return "", false, "", fmt.Errorf("%w: %q", ErrBadServiceName, host)
			}
			dc = strings.ToLower(rest)
		}
		name = strings.TrimRight(name[:i], ".")
		dns = true
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return "", false, "", fmt.Errorf("%w: %q is an IP address", ErrBadServiceName, host)
	}
	if strings.EqualFold(name, "localhost") || hasSuffixFold(name, ".localhost") {
		return "", false, "", fmt.Errorf("%w: %q is localhost", ErrBadServiceName, host)
	}
	if !validServiceName(name) {
		return "", false, "", fmt.Errorf("%w: %q", ErrBadServiceName, host)
	}
	return name, dns, dc, nil
}

// validDatacenter reports whether s is one DNS label of the characters
// Consul datacenter names use: letters, digits, '-' and '_'.
func validDatacenter(s string) bool {
	return validServiceName(s) && !strings.Contains(s, ".")
}

// validServiceName reports whether s is made only of the characters Consul
// service names use: letters, digits, '-', '_' and '.'.
func validServiceName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return true
}

// indexFold is strings.Index ignoring case, for a sep whose first byte is
// not a letter.
func indexFold(s, sep string) int {
	for i := 0; i+len(sep) <= len(s); i++ {
		j := strings.IndexByte(s[i:len(s)-len(sep)+1], sep[0])
		if j < 0 {
			return -1
		}
		i += j
		if strings.EqualFold(s[i:i+len(sep)], sep) {
			return i
		}
	}
	return -1
}

// hasSuffixFold is strings.HasSuffix ignoring case.
func hasSuffixFold(s, suffix string) bool {
	return len(s) >= len(suffix) && strings.EqualFold(s[len(s)-len(suffix):], suffix)
}

package rawio

import (
	"encoding/binary"
	"net"
	"net/netip"
)

// PROXY protocol v2, as HAProxy's "The PROXY protocol" specification
// (section 2.2) lays it out: a binary header the sidecar writes first on a
// connection to a node, so the node learns which address the connection
// really comes from.

// proxyV2Signature opens every v2 header.
var proxyV2Signature = [12]byte{'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'}

const (
	proxyV2Local  = 0x20 // version 2, command LOCAL: use the connection's own addresses
	proxyV2Proxy  = 0x21 // version 2, command PROXY: addresses follow
	proxyV2Unspec = 0x00 // family and transport unknown, no addresses
	proxyV2TCP4   = 0x11 // TCP over IPv4: 12 bytes of addresses
	proxyV2TCP6   = 0x21 // TCP over IPv6: 36 bytes of addresses

	// ProxyV2MaxLen is the longest header AppendProxyV2 writes: the
	// 16-byte fixed part and the IPv6 addresses.
	ProxyV2MaxLen = 16 + 36
)

// AppendProxyV2 appends to b the PROXY protocol v2 header of a TCP
// connection from src to dst: a PROXY command carrying both addresses and
// ports when both are TCP addresses of one IP family (IPv4-mapped IPv6
// counts as IPv4), else a LOCAL command with no addresses, which tells the
// node to use the connection's own.
func AppendProxyV2(b []byte, src, dst net.Addr) []byte {
	b = append(b, proxyV2Signature[:]...)
	s, sok := tcpAddrPort(src)
	d, dok := tcpAddrPort(dst)
	switch {
	case sok && dok && s.Addr().Is4() && d.Addr().Is4():
		b = append(b, proxyV2Proxy, proxyV2TCP4, 0, 12)
		sa, da := s.Addr().As4(), d.Addr().As4()
		b = append(b, sa[:]...)
		b = append(b, da[:]...)
	case sok && dok && s.Addr().Is6() && d.Addr().Is6():
		b = append(b, proxyV2Proxy, proxyV2TCP6, 0, 36)
		sa, da := s.Addr().As16(), d.Addr().As16()
		b = append(b, sa[:]...)
		b = append(b, da[:]...)
	default:
		return append(b, proxyV2Local, proxyV2Unspec, 0, 0)
	}
	b = binary.BigEndian.AppendUint16(b, s.Port())
	return binary.BigEndian.AppendUint16(b, d.Port())
}

// tcpAddrPort returns a's IP, unmapped, and port, and whether a is a TCP
// address with an IP.
func tcpAddrPort(a net.Addr) (netip.AddrPort, bool) {
	t, ok := a.(*net.TCPAddr)
	if !ok || t == nil {
		return netip.AddrPort{}, false
	}
	ap := t.AddrPort()
	if !ap.Addr().IsValid() {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
}

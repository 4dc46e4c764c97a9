package rawio

import (
	"bytes"
	"net"
	"testing"
)

// TestAppendProxyV2 checks the header bytes against the layout of HAProxy's
// PROXY protocol specification, section 2.2, written out by hand.
func TestAppendProxyV2(t *testing.T) {
	t.Parallel()
	// 12-byte signature: \r\n\r\n\0\r\nQUIT\n.
	sig := []byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}
	local := []byte{
		0x20,       // version 2, command LOCAL
		0x00,       // AF_UNSPEC, UNSPEC
		0x00, 0x00, // no address block
	}
	tcp := func(ip string, port int) *net.TCPAddr { return &net.TCPAddr{IP: net.ParseIP(ip), Port: port} }
	tests := []struct {
		name     string
		src, dst net.Addr
		want     []byte // after the signature
	}{
		{
			name: "tcp over ipv4",
			src:  tcp("192.0.2.10", 51234),
			dst:  tcp("127.0.0.1", 15002),
			want: []byte{
				0x21,       // version 2, command PROXY
				0x11,       // AF_INET, STREAM
				0x00, 0x0C, // 12 bytes follow
				192, 0, 2, 10, // source address
				127, 0, 0, 1, // destination address
				0xC8, 0x22, // source port 51234
				0x3A, 0x9A, // destination port 15002
			},
		},
		{
			name: "ipv4-mapped ipv6 is ipv4",
			src:  &net.TCPAddr{IP: net.IP{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 10, 1, 2, 3}, Port: 1},
			dst:  &net.TCPAddr{IP: net.IP{10, 9, 8, 7}, Port: 65535},
			want: []byte{
				0x21, 0x11, 0x00, 0x0C,
				10, 1, 2, 3,
				10, 9, 8, 7,
				0x00, 0x01,
				0xFF, 0xFF,
			},
		},
		{
			name: "tcp over ipv6",
			src:  tcp("2001:db8::1", 443),
			dst:  &net.TCPAddr{IP: net.ParseIP("fe80::abcd"), Port: 8080, Zone: "eth0"},
			want: []byte{
				0x21,       // version 2, command PROXY
				0x21,       // AF_INET6, STREAM
				0x00, 0x24, // 36 bytes follow
				0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // source address
				0xFE, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xAB, 0xCD, // destination address
				0x01, 0xBB, // source port 443
				0x1F, 0x90, // destination port 8080
			},
		},
		{
			name: "families differ",
			src:  tcp("192.0.2.10", 51234),
			dst:  tcp("::1", 15002),
			want: local,
		},
		{
			name: "unix socket",
			src:  &net.UnixAddr{Name: "@app", Net: "unix"},
			dst:  &net.UnixAddr{Name: "/run/sidecar.sock", Net: "unix"},
			want: local,
		},
		{
			name: "udp addresses",
			src:  &net.UDPAddr{IP: net.IP{192, 0, 2, 10}, Port: 1},
			dst:  &net.UDPAddr{IP: net.IP{127, 0, 0, 1}, Port: 2},
			want: local,
		},
		{
			name: "tcp address without ip",
			src:  &net.TCPAddr{Port: 1},
			dst:  tcp("127.0.0.1", 2),
			want: local,
		},
		{
			name: "nil tcp address",
			src:  (*net.TCPAddr)(nil),
			dst:  tcp("127.0.0.1", 2),
			want: local,
		},
		{
			name: "no addresses",
			want: local,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			prefix := []byte("kept")
			got := AppendProxyV2(bytes.Clone(prefix), tc.src, tc.dst)
			want := append(append(bytes.Clone(prefix), sig...), tc.want...)
			if !bytes.Equal(got, want) {
				t.Errorf("AppendProxyV2(%v, %v) =\n% x\nwant\n% x", tc.src, tc.dst, got, want)
			}
			if n := len(got) - len(prefix); n > ProxyV2MaxLen {
				t.Errorf("header is %d bytes, more than ProxyV2MaxLen %d", n, ProxyV2MaxLen)
			}
		})
	}
}

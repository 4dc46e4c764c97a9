package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestMeshHandshakeRefusedIsDialError: a peer that the mesh config refuses
// (another service's certificate) fails the dial, so the try loop sends
// the request to another node; a peer it accepts gives a TLS connection.
func TestMeshHandshakeRefusedIsDialError(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	errWrong := errors.New("peer is another service")
	tests := []struct {
		name    string
		verify  func(tls.ConnectionState) error
		wantErr error
	}{
		{name: "accepted", verify: func(tls.ConnectionState) error { return nil }},
		{name: "wrong service", verify: func(tls.ConnectionState) error { return errWrong }, wantErr: errWrong},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conf := &tls.Config{InsecureSkipVerify: true, VerifyConnection: tc.verify} //nolint:gosec // verified by VerifyConnection
			raw, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			c, err := meshHandshake(context.Background(), raw, conf, addr, time.Second)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("meshHandshake() error = %v", err)
				}
				if _, ok := c.(*tls.Conn); !ok {
					t.Errorf("meshHandshake() = %T, want a *tls.Conn", c)
				}
				c.Close()
				return
			}
			if !errors.Is(err, tc.wantErr) || !isDialError(err) {
				t.Errorf("meshHandshake() error = %v; want %v, as a dial error", err, tc.wantErr)
			}
			if _, werr := raw.Write([]byte("x")); werr == nil {
				t.Error("the connection of a refused handshake is still open")
			}
		})
	}
}

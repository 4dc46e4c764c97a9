package proxy

import (
	"strings"
	"testing"

	"go.uber.org/zap"
)

func TestTCPProxyProtocolUnknown(t *testing.T) {
	t.Parallel()
	p := New(nil, nil, zap.NewNop())
	_, err := p.TCP("127.0.0.1:15002", RouteConfig{Service: "echo", Protocol: "tcp", ProxyProtocol: "v1"})
	if err == nil || !strings.Contains(err.Error(), `unknown proxy protocol "v1"`) {
		t.Errorf("TCP() error = %v, want unknown proxy protocol \"v1\"", err)
	}
}

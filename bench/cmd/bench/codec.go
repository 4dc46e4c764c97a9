package main

import "slices"

// The codec scenarios: one gRPC unary call with a 1 KiB payload, made as
// native gRPC (passed through) and as Connect JSON over HTTP/1.1 (turned
// into gRPC by codec.transcode on the sidecar's grpc upstream), in the
// same run: the sidecar's CPU per call in each is the cost of
// transcoding (issue 18's target: at most 60 µs more). Connect JSON is
// the sidecar's alone (a gRPC backend or another proxy does not answer
// it), so both run against the sidecar peers only.
var codecPeers = []string{"sidecar", "sidecar-consul", "sidecar-base"}

func init() {
	scenarios = append(scenarios,
		scenario{Name: "codec-grpc-1k", Title: "gRPC unary, 1 KiB payload each way, 64 streams on one connection (passthrough on the transcoding route)",
			Mode: "grpc", Listener: lnGRPC, Workers: 64, Args: []string{"-size", "1024"}, Counter: "grpc", Unit: "call", Peers: codecPeers},
		scenario{Name: "codec-connect-json-1k", Title: "the same call as Connect unary JSON over HTTP/1.1 keep-alive, 64 connections, transcoded to gRPC",
			Mode: "connect", Listener: lnGRPC, Workers: 64, Args: []string{"-size", "1024"}, Counter: "grpc", Unit: "call", Peers: codecPeers},
	)
}

// peersOf returns the peers sc runs against: those it names, or all.
func (sc scenario) peersOf(peers []*peer) []*peer {
	if len(sc.Peers) == 0 {
		return peers
	}
	return slices.DeleteFunc(slices.Clone(peers), func(p *peer) bool { return !slices.Contains(sc.Peers, p.name) })
}

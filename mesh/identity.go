package mesh

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/backoff"
)

// Agent is the part of *api.Agent an Identity uses; *api.Agent satisfies it.
// Both calls are blocking queries: they take the context through q
// (WithContext) and return once it ends.
type Agent interface {
	ConnectCALeaf(service string, q *api.QueryOptions) (*api.LeafCert, *api.QueryMeta, error)
	ConnectCARoots(q *api.QueryOptions) (*api.CARootList, *api.QueryMeta, error)
}

// leaf is one parsed leaf certificate; never modified once stored.
type leaf struct {
	cert   *tls.Certificate
	id     ServiceID
	uri    string
	serial string
	expiry time.Time
}

// roots is one parsed set of CA roots; never modified once stored.
type roots struct {
	pool        *x509.CertPool
	trustDomain string
	activeID    string
	count       int
	ids         string // the usable roots' IDs, sorted and joined: a changed set is a new one
}

// Identity is the local service's mesh identity: its leaf certificate and
// the CA roots, each followed by a blocking query. Create it with
// NewIdentity and start Run; the TLS configs it returns are valid from the
// start and fail handshakes until Ready is closed. Its methods are safe for
// concurrent use.
type Identity struct {
	agent   Agent
	service string
	wait    time.Duration
	log     *zap.Logger
	metrics *Metrics

	leaf  atomic.Pointer[leaf]
	roots atomic.Pointer[roots]

	readyOnce sync.Once
	ready     chan struct{}
	rotations atomic.Int64 // leaf certificates taken after the first
	rootSets  atomic.Int64 // root sets taken after the first
}

// Options tune an Identity. The zero value is fine.
type Options struct {
	// Wait is the blocking queries' wait; if zero, 5m is used.
	Wait time.Duration
	// Metrics, if set, counts refused peers.
	Metrics *Metrics
}

// ErrNotReady is returned by handshakes before the first leaf and roots.
var ErrNotReady = errors.New("mesh identity not ready: no leaf certificate or ca roots from consul yet")

// NewIdentity returns the identity of service, which Run then follows.
func NewIdentity(agent Agent, service string, opts Options, log *zap.Logger) *Identity {
	if opts.Wait <= 0 {
		opts.Wait = 5 * time.Minute
	}
	return &Identity{agent: agent, service: service, wait: opts.Wait, log: log, metrics: opts.Metrics, ready: make(chan struct{})}
}

// Ready is closed once a leaf certificate and the roots are both in hand.
func (i *Identity) Ready() <-chan struct{} { return i.ready }

// Service is the name the identity is for.
func (i *Identity) Service() string { return i.service }

// Run follows the leaf certificate and the CA roots until ctx ends. It
// blocks; errors are logged and retried with backoff.
func (i *Identity) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); i.follow(ctx, "leaf", i.fetchLeaf) }()
	go func() { defer wg.Done(); i.follow(ctx, "roots", i.fetchRoots) }()
	wg.Wait()
}

// follow runs fetch as a blocking query loop: the index of each answer is
// the next query's, reset to 0 when it goes backwards; errors back off.
func (i *Identity) follow(ctx context.Context, what string, fetch func(q *api.QueryOptions) (uint64, error)) {
	defer func() {
		if r := recover(); r != nil {
			i.log.Error("mesh watch panicked", zap.String("watch", what), zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
		}
	}()
	bo := backoff.Exponential{Base: 100 * time.Millisecond, Max: 10 * time.Second, Jitter: 0.2}
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: i.wait}).WithContext(ctx)
		next, err := fetch(q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			i.log.Warn("mesh watch failed", zap.String("watch", what), zap.Int("attempt", failures), zap.Error(err))
			if !backoff.Wait(ctx, bo.Backoff(failures)) {
				return
			}
			continue
		}
		failures = 0
		if next < index {
			next = 0
		}
		index = next
	}
}

func (i *Identity) fetchLeaf(q *api.QueryOptions) (uint64, error) {
	lc, meta, err := i.agent.ConnectCALeaf(i.service, q)
	if err != nil {
		return 0, fmt.Errorf("get leaf certificate of %q: %w", i.service, err)
	}
	if old := i.leaf.Load(); old != nil && old.serial == lc.SerialNumber {
		return meta.LastIndex, nil
	}
	l, err := parseLeaf(lc)
	if err != nil {
		return 0, err
	}
	if i.leaf.Swap(l) != nil {
		i.rotations.Add(1)
	}
	i.log.Info("mesh leaf certificate", zap.String("uri", l.uri), zap.String("serial", l.serial), zap.Time("expiry", l.expiry))
	i.checkReady()
	return meta.LastIndex, nil
}

func parseLeaf(lc *api.LeafCert) (*leaf, error) {
	cert, err := tls.X509KeyPair([]byte(lc.CertPEM), []byte(lc.PrivateKeyPEM))
	if err != nil {
		return nil, fmt.Errorf("parse leaf certificate of %q: %w", lc.Service, err)
	}
	x, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("parse leaf certificate of %q: %w", lc.Service, err)
	}
	cert.Leaf = x
	id, uri, err := peerID(x)
	if err != nil {
		return nil, fmt.Errorf("leaf certificate of %q: %w", lc.Service, err)
	}
	return &leaf{cert: &cert, id: id, uri: uri, serial: lc.SerialNumber, expiry: x.NotAfter}, nil
}

func (i *Identity) fetchRoots(q *api.QueryOptions) (uint64, error) {
	list, meta, err := i.agent.ConnectCARoots(q)
	if err != nil {
		return 0, fmt.Errorf("get ca roots: %w", err)
	}
	r, err := parseRoots(list)
	if err != nil {
		return 0, err
	}
	if old := i.roots.Load(); old != nil && old.activeID == r.activeID && old.ids == r.ids && old.trustDomain == r.trustDomain {
		return meta.LastIndex, nil
	}
	if i.roots.Swap(r) != nil {
		i.rootSets.Add(1)
	}
	i.log.Info("mesh ca roots", zap.String("trust_domain", r.trustDomain), zap.String("active", r.activeID), zap.Int("roots", r.count))
	i.checkReady()
	return meta.LastIndex, nil
}

func parseRoots(list *api.CARootList) (*roots, error) {
	pool := x509.NewCertPool()
	n := 0
	var ids []string
	for _, root := range list.Roots {
		rest := []byte(root.RootCertPEM)
		certs := 0
		for {
			var b *pem.Block
			b, rest = pem.Decode(rest)
			if b == nil {
				break
			}
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("parse ca root %q: %w", root.ID, err)
			}
			pool.AddCert(c)
			certs++
		}
		if certs > 0 { // a root with no certificate in its PEM trusts nothing
			n++
			ids = append(ids, root.ID)
		}
	}
	if n == 0 {
		return nil, errors.New("consul returned no usable ca roots (is connect enabled on the agent?)")
	}
	slices.Sort(ids)
	return &roots{pool: pool, trustDomain: strings.ToLower(list.TrustDomain), activeID: list.ActiveRootID, count: n, ids: strings.Join(ids, ",")}, nil
}

func (i *Identity) checkReady() {
	if i.leaf.Load() != nil && i.roots.Load() != nil {
		i.readyOnce.Do(func() { close(i.ready) })
	}
}

// current returns the leaf and roots in effect, or ErrNotReady.
func (i *Identity) current() (*leaf, *roots, error) {
	l, r := i.leaf.Load(), i.roots.Load()
	if l == nil || r == nil {
		return nil, nil, ErrNotReady
	}
	return l, r, nil
}

// verifyChain checks that the peer's certificate chains to a current root
// and returns its service identity.
func verifyChain(cs tls.ConnectionState, r *roots, usage x509.ExtKeyUsage) (ServiceID, string, error) {
	if len(cs.PeerCertificates) == 0 {
		return ServiceID{}, "", errors.New("peer sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	peer := cs.PeerCertificates[0]
	if _, err := peer.Verify(x509.VerifyOptions{Roots: r.pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return ServiceID{}, "", fmt.Errorf("peer certificate not signed by the mesh ca: %w", err)
	}
	id, uri, err := peerID(peer)
	if err != nil {
		return ServiceID{}, "", err
	}
	if id.TrustDomain != r.trustDomain {
		return ServiceID{}, "", fmt.Errorf("peer %s: trust domain %q is not ours (%q)", uri, id.TrustDomain, r.trustDomain)
	}
	return id, uri, nil
}

// ServerTLS returns the inbound listener's TLS config: it presents the
// current leaf, requires a client certificate, and verifies it against the
// current roots. The caller's identity is then read with CallerID. The
// config is built once; rotation needs no rebuild.
func (i *Identity) ServerTLS() *tls.Config {
	base := i.serverTLS()
	h1, h2 := base.Clone(), base.Clone()
	h1.NextProtos, h2.NextProtos = []string{"http/1.1"}, []string{"h2"}
	// The bytes are relayed to the app, so the ALPN answer is the
	// caller's: the one protocol it offers (h2 from gRPC clients and
	// outbound sidecars of http2 and grpc upstreams), else http/1.1 when
	// offered, which every HTTP app speaks, else its first.
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		protos := hello.SupportedProtos
		switch {
		case len(protos) == 0:
			return nil, nil
		case len(protos) > 1 && slices.Contains(protos, "http/1.1"), protos[0] == "http/1.1":
			return h1, nil
		case protos[0] == "h2":
			return h2, nil
		}
		c := i.serverTLS()
		c.NextProtos = protos[:1]
		return c, nil
	}
	return base
}

func (i *Identity) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequireAnyClientCert, // verified below against the current roots
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			l, _, err := i.current()
			if err != nil {
				return nil, err
			}
			return l.cert, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, r, err := i.current()
			if err != nil {
				return err
			}
			if _, _, err := verifyChain(cs, r, x509.ExtKeyUsageClientAuth); err != nil {
				i.metrics.refused("inbound", reasonOf(err))
				return err
			}
			return nil
		},
	}
}

// CallerID returns the SPIFFE URI and identity of the peer of a connection
// that ServerTLS verified.
func CallerID(cs tls.ConnectionState) (ServiceID, string, error) {
	if len(cs.PeerCertificates) == 0 {
		return ServiceID{}, "", errors.New("peer sent no certificate")
	}
	return peerID(cs.PeerCertificates[0])
}

// ErrWrongService is returned by a ClientTLS handshake with a peer whose
// certificate names another service than the one dialed.
var ErrWrongService = errors.New("peer is another service")

// ClientTLS returns the TLS config to dial a node of service: it presents
// the current leaf and verifies that the peer's certificate chains to the
// current roots and names service in the identity's own namespace and
// partition (in any datacenter of the trust domain, since failover may
// reach another). nextProtos, if any, is offered by ALPN
// (h2 for http2 and grpc). The config is built once per service; rotation
// needs no rebuild.
func (i *Identity) ClientTLS(service string, nextProtos ...string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		NextProtos:         nextProtos,
		InsecureSkipVerify: true, // verified below against the current roots, by SPIFFE URI
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			l, _, err := i.current()
			if err != nil {
				return nil, err
			}
			return l.cert, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			l, r, err := i.current()
			if err != nil {
				return err
			}
			id, uri, err := verifyChain(cs, r, x509.ExtKeyUsageServerAuth)
			if err != nil {
				i.metrics.refused("outbound", reasonOf(err))
				return err
			}
			if !sameService(id, l.id, service) {
				i.metrics.refused("outbound", "wrong_service")
				return fmt.Errorf("dialed %q in namespace %q, partition %q, peer presented %s: %w",
					service, l.id.Namespace, cmp.Or(l.id.Partition, "default"), uri, ErrWrongService)
			}
			return nil
		},
	}
}

// sameService reports whether peer is service in own's namespace and
// partition: the sidecar's discovery queries (consul.namespace,
// consul.partition) are its identity's, so the node dialed is there too.
// The datacenter may differ, as failover reaches others.
func sameService(peer, own ServiceID, service string) bool {
	return strings.EqualFold(peer.Service, service) && strings.EqualFold(peer.Namespace, own.Namespace) &&
		strings.EqualFold(peer.Partition, own.Partition)
}

func reasonOf(err error) string {
	switch {
	case errors.Is(err, ErrNotServiceID):
		return "not_service_id"
	case errors.Is(err, ErrNotReady):
		return "not_ready"
	}
	return "untrusted"
}

// IdentityStatus is the identity part of /status.
type IdentityStatus struct {
	Service     string    `json:"service"`
	Ready       bool      `json:"ready"`
	URI         string    `json:"uri,omitempty"`
	Serial      string    `json:"serial,omitempty"`
	Expiry      time.Time `json:"expiry,omitzero"`
	ExpiresIn   string    `json:"expires_in,omitempty"`
	TrustDomain string    `json:"trust_domain,omitempty"`
	ActiveRoot  string    `json:"active_root,omitempty"`
	Roots       int       `json:"roots"`
	Rotations   int64     `json:"leaf_rotations"`
	RootChanges int64     `json:"root_changes"`
}

// Status returns a snapshot of the identity. It does not block.
func (i *Identity) Status() IdentityStatus {
	s := IdentityStatus{Service: i.service, Rotations: i.rotations.Load(), RootChanges: i.rootSets.Load()}
	if l := i.leaf.Load(); l != nil {
		s.URI, s.Serial, s.Expiry = l.uri, l.serial, l.expiry
		s.ExpiresIn = time.Until(l.expiry).Round(time.Second).String()
	}
	if r := i.roots.Load(); r != nil {
		s.TrustDomain, s.ActiveRoot, s.Roots = r.trustDomain, r.activeID, r.count
	}
	s.Ready = s.URI != "" && s.Roots > 0
	return s
}

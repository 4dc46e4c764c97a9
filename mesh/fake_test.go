package mesh

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

const testTrustDomain = "11111111-2222-3333-4444-555555555555.consul"

// testCA is a mesh CA made for a test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  string
	id   string
}

var serial int64 = 100

func newTestCA(t *testing.T, id string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "test ca " + id},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		URIs: []*url.URL{{Scheme: "spiffe", Host: testTrustDomain}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{cert: c, key: key, id: id, pem: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))}
}

// leaf issues a leaf for service, as Consul does: URI SAN, server and
// client auth.
func (ca *testCA) leaf(t *testing.T, service string) *api.LeafCert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	uri, _ := url.Parse(ServiceID{TrustDomain: testTrustDomain, Namespace: "default", Datacenter: "dc1", Service: service}.URI())
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: service},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(72 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{uri},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	return &api.LeafCert{
		SerialNumber:  big.NewInt(serial).String(),
		CertPEM:       string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		PrivateKeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})),
		Service:       service, ServiceURI: uri.String(),
	}
}

// fakeAgent serves a leaf and roots that a test replaces; a blocking query
// with the current index waits for a replacement or its context.
type fakeAgent struct {
	mu      sync.Mutex
	changed chan struct{}
	index   uint64
	leaf    *api.LeafCert
	roots   *api.CARootList

	authz    map[string]bool // by caller URI
	authzErr error
	calls    int
}

func newFakeAgent(leaf *api.LeafCert, cas ...*testCA) *fakeAgent {
	f := &fakeAgent{changed: make(chan struct{}), index: 1, authz: map[string]bool{}}
	f.leaf, f.roots = leaf, rootList(cas...)
	return f
}

func rootList(cas ...*testCA) *api.CARootList {
	l := &api.CARootList{TrustDomain: testTrustDomain, ActiveRootID: cas[len(cas)-1].id}
	for _, ca := range cas {
		l.Roots = append(l.Roots, &api.CARoot{ID: ca.id, RootCertPEM: ca.pem, Active: ca.id == l.ActiveRootID})
	}
	return l
}

// set replaces the leaf and/or the roots (nil keeps them) and wakes the
// blocking queries.
func (f *fakeAgent) set(leaf *api.LeafCert, roots *api.CARootList) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if leaf != nil {
		f.leaf = leaf
	}
	if roots != nil {
		f.roots = roots
	}
	f.index++
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeAgent) block(q *api.QueryOptions) (uint64, error) {
	f.mu.Lock()
	idx, ch := f.index, f.changed
	f.mu.Unlock()
	if q.WaitIndex < idx {
		return idx, nil
	}
	select {
	case <-ch:
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.index, nil
	case <-q.Context().Done():
		return 0, q.Context().Err()
	}
}

func (f *fakeAgent) ConnectCALeaf(service string, q *api.QueryOptions) (*api.LeafCert, *api.QueryMeta, error) {
	idx, err := f.block(q)
	if err != nil {
		return nil, nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leaf, &api.QueryMeta{LastIndex: idx}, nil
}

func (f *fakeAgent) ConnectCARoots(q *api.QueryOptions) (*api.CARootList, *api.QueryMeta, error) {
	idx, err := f.block(q)
	if err != nil {
		return nil, nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.roots, &api.QueryMeta{LastIndex: idx}, nil
}

func (f *fakeAgent) ConnectAuthorize(p *api.AgentAuthorizeParams) (*api.AgentAuthorize, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.authzErr != nil {
		return nil, f.authzErr
	}
	ok := f.authz[p.ClientCertURI]
	reason := "ACL permissive"
	if !ok {
		reason = "intention deny"
	}
	return &api.AgentAuthorize{Authorized: ok, Reason: reason}, nil
}

func (f *fakeAgent) allow(uri string, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.authz[uri] = ok
}

func (f *fakeAgent) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.authzErr = err
}

func (f *fakeAgent) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

var errAgentDown = errors.New("agent down")

// runIdentity follows agent as service until the test ends, and waits
// until it is ready.
func runIdentity(t *testing.T, agent Agent, service string) *Identity {
	t.Helper()
	id := NewIdentity(agent, service, Options{}, testLogger(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); id.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-id.Ready():
	case <-time.After(5 * time.Second):
		t.Fatalf("identity of %s not ready", service)
	}
	return id
}

func webURI() string {
	return ServiceID{TrustDomain: testTrustDomain, Namespace: "default", Datacenter: "dc1", Service: "web"}.URI()
}

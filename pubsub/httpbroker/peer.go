package httpbroker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sidecarlb/sidecar/internal/h1"
	"github.com/sidecarlb/sidecar/pubsub"
)

// DeliverPath is the peer listener's one route.
const DeliverPath = "/v1/pubsub/deliver"

// maxPeerBody bounds a delivery request a peer reads.
const maxPeerBody = 256 << 20

// deliverRequest is a batch of one topic's messages for one group.
type deliverRequest struct {
	Topic    string        `json:"topic"`
	Group    string        `json:"group"`
	Messages []peerMessage `json:"messages"`
}

type peerMessage struct {
	Attempt int             `json:"attempt"` // the attempt this delivery is, from 1
	Message json.RawMessage `json:"message"` // a pubsub.Message
}

type deliverResponse struct {
	Results []peerResult `json:"results"` // one per message, in order
}

type peerResult struct {
	Outcome      string `json:"outcome"`
	RetryAfterMS int64  `json:"retry_after_ms,omitempty"`
	Reason       string `json:"reason,omitempty"`
}

// Deliverer is what the Server hands messages to; *pubsub.App satisfies it.
type Deliverer interface {
	// Deliver may block for a slot while ctx lasts; safe for concurrent use.
	Deliver(ctx context.Context, group string, m *pubsub.Message, attempt int) pubsub.Result
}

// Server is the subscriber side: it takes batches from peer sidecars on
// pubsub.http.listen, delivers each message to the app, and answers each
// one's outcome.
type Server struct {
	app Deliverer
	log *zap.Logger
}

// NewServer returns the peer handler delivering to app.
func NewServer(app Deliverer, log *zap.Logger) *Server { return &Server{app: app, log: log} }

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != DeliverPath {
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	body, err := pubsub.ReadAll(http.MaxBytesReader(w, r.Body, maxPeerBody), r.ContentLength)
	if err != nil {
		http.Error(w, "bad delivery request: "+err.Error(), http.StatusBadRequest)
		return
	}
	group, msgs, ok := decodeBatch(body)
	if !ok {
		var req deliverRequest
		if err := json.NewDecoder(bytes.NewReader(body)).Decode(&req); err != nil {
			http.Error(w, "bad delivery request: "+err.Error(), http.StatusBadRequest)
			return
		}
		group, msgs = req.Group, make([]batchMessage, len(req.Messages))
		for i, pm := range req.Messages {
			msgs[i].attempt = pm.Attempt
			if m, err := pubsub.Unmarshal(pm.Message); err == nil && m.Topic == req.Topic {
				msgs[i].m = m
			}
		}
	}
	res := make([]peerResult, len(msgs))
	var wg sync.WaitGroup
	for i, bm := range msgs {
		if bm.m == nil || bm.attempt < 1 {
			res[i] = peerResult{Outcome: pubsub.NotDelivered.String(), Reason: "bad message"}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			out := s.app.Deliver(r.Context(), group, bm.m, bm.attempt)
			res[i] = peerResult{Outcome: out.Outcome.String(), RetryAfterMS: out.RetryAfter.Milliseconds(), Reason: out.Reason}
		}()
	}
	wg.Wait()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(deliverResponse{Results: res})
}

// batchMessage is one message of a delivery request as the peer reads it;
// m is nil when it did not decode or is not of the request's topic.
type batchMessage struct {
	attempt int
	m       *pubsub.Message
}

// decodeBatch reads a delivery request exactly as encode writes it, its
// messages as pubsub.Marshal writes them (pubsub.UnmarshalPrefix), in one
// pass with no JSON scanning; ok is false for any other shape, which
// encoding/json then reads. A message of another topic than the request's
// comes back with a nil m.
func decodeBatch(b []byte) (group string, msgs []batchMessage, ok bool) {
	d := batchDecoder{b: b}
	if !d.lit(`{"topic":"`) {
		return "", nil, false
	}
	topic, ok1 := d.until('"')
	if !d.lit(`,"group":"`) {
		return "", nil, false
	}
	group, ok2 := d.until('"')
	if !ok1 || !ok2 || !d.lit(`,"messages":[`) {
		return "", nil, false
	}
	for !d.lit("]}") {
		if len(msgs) > 0 && !d.lit(",") {
			return "", nil, false
		}
		if !d.lit(`{"attempt":`) {
			return "", nil, false
		}
		n, ok := d.int()
		if !ok || !d.lit(`,"message":`) {
			return "", nil, false
		}
		m, rest, ok := pubsub.UnmarshalPrefix(d.b)
		if !ok {
			return "", nil, false
		}
		d.b = rest
		if !d.lit("}") {
			return "", nil, false
		}
		if m.Topic != topic {
			m = nil
		}
		msgs = append(msgs, batchMessage{attempt: n, m: m})
	}
	if len(d.b) != 0 {
		return "", nil, false
	}
	return group, msgs, true
}

type batchDecoder struct{ b []byte }

func (d *batchDecoder) lit(s string) bool {
	if len(d.b) >= len(s) && string(d.b[:len(s)]) == s {
		d.b = d.b[len(s):]
		return true
	}
	return false
}

// until returns the bytes before the next c (a closing quote), which must
// be plain: printable ASCII without a backslash, as topics and groups are.
func (d *batchDecoder) until(c byte) (string, bool) {
	for i, x := range d.b {
		switch {
		case x == c:
			s := string(d.b[:i])
			d.b = d.b[i+1:]
			return s, true
		case x < 0x20 || x >= 0x7f || x == '\\':
			return "", false
		}
	}
	return "", false
}

// int reads a positive decimal of at most 9 digits without a leading zero.
func (d *batchDecoder) int() (int, bool) {
	n, i := 0, 0
	for ; i < len(d.b) && i < 10 && d.b[i] >= '0' && d.b[i] <= '9'; i++ {
		n = n*10 + int(d.b[i]-'0')
	}
	if i == 0 || i > 9 || d.b[0] == '0' {
		return 0, false
	}
	d.b = d.b[i:]
	return n, true
}

// encode is json.Marshal(r) without re-validating each message, which the
// store holds as the JSON Message.Marshal wrote.
func (r *deliverRequest) encode() []byte {
	n := 64 + len(r.Topic) + len(r.Group)
	for _, m := range r.Messages {
		n += len(m.Message) + 32
	}
	b := make([]byte, 0, n)
	b = append(b, `{"topic":`...)
	b = strconv.AppendQuote(b, r.Topic) // topics and groups are plain ASCII
	b = append(b, `,"group":`...)
	b = strconv.AppendQuote(b, r.Group)
	b = append(b, `,"messages":[`...)
	for i, m := range r.Messages {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"attempt":`...)
		b = strconv.AppendInt(b, int64(m.Attempt), 10)
		b = append(b, `,"message":`...)
		b = append(b, m.Message...)
		b = append(b, '}')
	}
	return append(b, "]}"...)
}

// Bounds of the connections to peer sidecars.
const (
	peerConnectTimeout = 5 * time.Second
	peerIdleTimeout    = 90 * time.Second
)

// peerPools holds one keep-alive connection pool (internal/h1, the
// sidecar's own HTTP/1.1 client) per peer address. A lane has at most
// lanesInFlight batches out, each on a connection of its own, so a pool
// keeps about that many connections per lane sending to its peer; those
// idle past peerIdleTimeout close. Past maxPeerPools pools (instances come
// and go), those unused for peerIdleTimeout are retired and forgotten.
// Safe for concurrent use.
type peerPools struct {
	mu    sync.Mutex
	pools map[string]*peerPool
}

// peerPool is the connections to one peer, and the URL of its deliveries
// (shared read-only by every request).
type peerPool struct {
	*h1.Pool
	url  *url.URL
	used time.Time // under peerPools.mu
}

// maxPeerPools is the number of peer pools past which unused ones go.
const maxPeerPools = 256

func newPeerPools() *peerPools { return &peerPools{pools: map[string]*peerPool{}} }

// pool returns addr's pool, creating it on first use.
func (pp *peerPools) pool(addr string) *peerPool {
	now := time.Now()
	pp.mu.Lock()
	defer pp.mu.Unlock()
	p := pp.pools[addr]
	if p == nil {
		if len(pp.pools) >= maxPeerPools {
			for a, old := range pp.pools {
				if now.Sub(old.used) > peerIdleTimeout {
					old.Retire() // its connections close, the busy ones once done
					delete(pp.pools, a)
				}
			}
		}
		p = &peerPool{Pool: h1.NewPool(peerConnectTimeout, peerIdleTimeout, nil), url: &url.URL{Scheme: "http", Host: addr, Path: DeliverPath}}
		pp.pools[addr] = p
	}
	p.used = now
	return p
}

// batchBody is a delivery request's body, held in memory, for h1.Pool:
// the pool sends it again on a new connection only when a reused one
// failed before the request fully left (a POST is not idempotent).
type batchBody []byte

func (b batchBody) Bytes() []byte    { return b }
func (b batchBody) Replayable() bool { return true }

// errPeer wraps every failure of a delivery request as a whole.
var errPeer = errors.New("peer delivery failed")

// send posts one batch to the peer at addr and returns one result per
// message. An error means no result is known: none counts as an attempt.
func send(ctx context.Context, pool *peerPool, addr string, req *deliverRequest, timeout time.Duration) ([]pubsub.Result, error) {
	body := req.encode()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hr := (&http.Request{Method: http.MethodPost, URL: pool.url, Host: addr, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{"Content-Type": {"application/json"}}, ContentLength: int64(len(body))}).WithContext(ctx)
	resp, err := pool.RoundTrip(hr, batchBody(body), time.Now())
	if err != nil {
		return nil, errors.Join(errPeer, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, errors.Join(errPeer, errors.New(resp.Status+": "+string(b)))
	}
	var dr deliverResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&dr); err != nil {
		return nil, errors.Join(errPeer, err)
	}
	if len(dr.Results) != len(req.Messages) {
		return nil, errors.Join(errPeer, errors.New("answer has the wrong number of results"))
	}
	out := make([]pubsub.Result, len(dr.Results))
	for i, r := range dr.Results {
		o, ok := pubsub.ParseOutcome(r.Outcome)
		if !ok {
			o = pubsub.NotDelivered
		}
		out[i] = pubsub.Result{Outcome: o, RetryAfter: time.Duration(r.RetryAfterMS) * time.Millisecond, Reason: r.Reason}
	}
	return out, nil
}

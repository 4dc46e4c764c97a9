package natsbroker

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
)

// pullGrace is how long past its expiry a pull request is waited for (its
// 408, or its last messages) before it is taken as gone, as when the
// server restarted and lost it.
const pullGrace = time.Second

// pullReq is one pull request sent and not known to be over.
type pullReq struct {
	id       uint64
	n        int       // messages asked for
	deadline time.Time // past it, the request is taken as gone
}

// puller is a subscription's persistent pull: one inbox subscription
// ("<inbox>.*") for the life of consume, and pull requests published on it
// for the slots as they free, in place of jetstream's Fetch, which
// subscribes to a new inbox (a SUB and an UNSUB the server applies to its
// subject index), arms timers and makes a channel for every pull, and
// waits for the whole batch before the next.
//
// asked counts the messages pulled and not yet received, exactly: each
// message received takes one, and a status that ends a request (408 when
// it expired, 409, 503) gives back what the server says it had left
// (Nats-Pending-Messages). Messages arrive with their stream subject,
// not the request's, so they cannot be told apart by request; a status
// can (the reply subject "<inbox>.<n>"). Where the server's count is
// missing (a status without it, a request that never ended, as when the
// server restarted and lost it, past its expiry and a grace second),
// asked is cut to what the requests still live could bring, never below
// what may still come, so max_in_flight holds; a message past that (none
// asked for) is a stray, nak'd at once.
//
// It is not safe for concurrent use: consume's loop owns it, reads msgs
// and calls take for each message.
type puller struct {
	nc      *nats.Conn
	subject string // $JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>
	prefix  string // "<inbox>."
	expires time.Duration
	sub     *nats.Subscription
	msgs    chan *nats.Msg

	reqs  []pullReq // in the order sent, so by deadline
	live  int       // the sum of reqs' n
	next  uint64
	asked int
	buf   []byte

	reconnects uint64 // nc's reconnects when last looked at (expire)
}

// newPuller subscribes to a new inbox for the consumer's messages. window
// is the most messages ever asked for at once (max_in_flight): the
// channel has room for them and for a status per request, so the
// subscription never drops one as a slow consumer.
func newPuller(nc *nats.Conn, stream, consumer string, window int, expires time.Duration) (*puller, error) {
	p := &puller{
		nc:      nc,
		subject: "$JS.API.CONSUMER.MSG.NEXT." + stream + "." + consumer,
		prefix:  nc.NewInbox() + ".",
		expires: expires,
		msgs:    make(chan *nats.Msg, 2*window+64),
	}
	p.reconnects = nc.Stats().Reconnects
	sub, err := nc.ChanSubscribe(p.prefix+"*", p.msgs)
	if err != nil {
		return nil, fmt.Errorf("subscribe to the pull inbox: %w", err)
	}
	p.sub = sub
	return p, nil
}

// pull asks the server for n more messages. It does not block on the
// network.
func (p *puller) pull(n int, now time.Time) error {
	p.next++
	id := p.next
	p.buf = append(p.buf[:0], `{"batch":`...)
	p.buf = strconv.AppendInt(p.buf, int64(n), 10)
	p.buf = append(p.buf, `,"expires":`...)
	p.buf = strconv.AppendInt(p.buf, p.expires.Nanoseconds(), 10)
	p.buf = append(p.buf, '}')
	if err := p.nc.PublishRequest(p.subject, p.prefix+strconv.FormatUint(id, 10), p.buf); err != nil {
		return fmt.Errorf("send pull request: %w", err)
	}
	if p.asked == 0 {
		// Nothing can come for the requests before: forget them.
		p.reqs, p.live = p.reqs[:0], 0
	}
	p.reqs = append(p.reqs, pullReq{id: id, n: n, deadline: now.Add(p.expires + pullGrace)})
	p.live += n
	p.asked += n
	return nil
}

// A kind says what a message from the inbox is.
type kind int

const (
	kindMsg    kind = iota // a message to deliver: one from asked to running
	kindStray              // a message not asked for: to be nak'd
	kindStatus             // a status ending its request (408 expired, 409, 503…)
)

// take accounts for one message from the inbox and says what it is.
//
// A status is an empty message with a Status header, no reply subject and
// a request's subject ("<inbox>.<n>"): a stored message always has a
// reply ($JS.ACK…) and its stream subject, so an empty one a publisher
// gave a Status header is a message, not a status. No idle heartbeat is
// asked for, and 100 (flow control) is for push consumers only.
func (p *puller) take(m *nats.Msg) kind {
	status := ""
	if len(m.Data) == 0 && m.Reply == "" && strings.HasPrefix(m.Subject, p.prefix) {
		status = m.Header.Get("Status")
	}
	if status == "" {
		if p.asked == 0 {
			return kindStray
		}
		p.asked--
		return kindMsg
	}
	id, err := strconv.ParseUint(strings.TrimPrefix(m.Subject, p.prefix), 10, 64)
	i := slices.IndexFunc(p.reqs, func(r pullReq) bool { return r.id == id })
	if err != nil || i < 0 {
		return kindStatus // not a request still counted
	}
	n := p.reqs[i].n
	p.live -= n
	p.reqs = slices.Delete(p.reqs, i, i+1)
	if left, err := strconv.Atoi(m.Header.Get("Nats-Pending-Messages")); err == nil && left >= 0 {
		p.asked = max(0, p.asked-left)
	} else if refusedOnArrival(status, m.Header.Get("Description")) {
		// Nothing was sent for it: all it asked for is back.
		p.asked = max(0, p.asked-n)
	}
	p.asked = min(p.asked, p.live)
	return kindStatus
}

// refusedOnArrival says whether a status refuses a request as it arrives,
// before any message is sent for it: no responders (503), a bad request
// (400), or a limit of the consumer's (409 Exceeded MaxWaiting,
// MaxRequestBatch, MaxRequestExpires…). A 409 Leadership Change or
// Consumer Deleted may come after some messages were sent.
func refusedOnArrival(status, description string) bool {
	switch status {
	case "503", "400":
		return true
	case "409":
		return strings.HasPrefix(strings.ToLower(description), "exceeded max")
	}
	return false
}

// expire ends the requests past their deadline, and every request sent
// before a reconnect: the server drops a waiting request when its client
// goes, without a word. A request that did survive delivers strays, which
// are nak'd, so max_in_flight still holds.
func (p *puller) expire(now time.Time) {
	if r := p.nc.Stats().Reconnects; r != p.reconnects {
		p.reconnects = r
		p.reqs, p.live, p.asked = p.reqs[:0], 0, 0
		return
	}
	k := 0
	for k < len(p.reqs) && now.After(p.reqs[k].deadline) {
		p.live -= p.reqs[k].n
		k++
	}
	if k > 0 {
		p.reqs = p.reqs[k:]
		p.asked = min(p.asked, p.live)
	}
}

// stop ends the subscription: the server sends nothing more to it, and
// what it sent before is in msgs once stop returns (or after a second,
// when the connection is down), for the caller to nak; what is still on
// its way then (in a cluster, from another server) comes back after
// AckWait.
func (p *puller) stop() {
	_ = p.sub.Drain()
	_ = p.nc.FlushTimeout(time.Second)
}

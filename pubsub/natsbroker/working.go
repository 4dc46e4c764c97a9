package natsbroker

import (
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// working is the set of a subscription's messages being delivered, told
// to JetStream as in progress every third of ack_wait by one goroutine
// (run), so a slow handler is not redelivered; in place of a goroutine and
// a ticker per message. A message added just before a tick gets its
// in-progress ack early, which does no harm. add and remove are safe for
// concurrent use and do not block on the network.
type working struct {
	mu   sync.Mutex
	msgs map[*nats.Msg]struct{}
	buf  []*nats.Msg // run's copy of msgs, reused
}

func (w *working) add(m *nats.Msg) {
	w.mu.Lock()
	w.msgs[m] = struct{}{}
	w.mu.Unlock()
}

func (w *working) remove(m *nats.Msg) {
	w.mu.Lock()
	delete(w.msgs, m)
	w.mu.Unlock()
}

// run sends the in-progress acks every period until stop is closed. It
// blocks.
func (w *working) run(stop <-chan struct{}, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		w.mu.Lock()
		w.buf = w.buf[:0]
		for m := range w.msgs {
			w.buf = append(w.buf, m)
		}
		w.mu.Unlock()
		for _, m := range w.buf {
			_ = m.InProgress()
		}
	}
}

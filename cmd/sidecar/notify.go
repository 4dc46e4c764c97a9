package main

import (
	"context"
	"os"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// systemd's notify protocol (Type=notify units): the sidecar says READY=1
// once it is ready as /ready tells it (registered and passing, the first
// discovery answers in), STATUS= why not while it waits, RELOADING=1 with
// MONOTONIC_USEC= when a reload begins and READY=1 when it ends, and
// STOPPING=1 when shutdown begins. Without $NOTIFY_SOCKET (not started by
// systemd) nothing is sent.

// notifyEvery is how often notifyReady looks at readiness while it waits.
const notifyEvery = 100 * time.Millisecond

// readyNotice is whether systemd was told READY=1, under a lock that orders
// that first READY=1 against a reload's announcement: a reload that begins
// before READY=1 is sent announces nothing (systemd still waits for the
// start), one that begins after announces itself and its end.
type readyNotice struct {
	mu   sync.Mutex
	sent bool
}

// notifyReady sends READY=1 to systemd the first time ready reports true,
// and STATUS= with its reason whenever that changes before then. It returns
// once READY=1 is sent, noting it in sent, or when ctx ends; it returns at
// once when there is no notify socket.
func notifyReady(ctx context.Context, ready func() (bool, string), sent *readyNotice, log *zap.Logger) {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return
	}
	t := time.NewTicker(notifyEvery)
	defer t.Stop()
	last := ""
	for {
		ok, why := ready()
		if ok {
			sent.mu.Lock()
			sdNotify(daemon.SdNotifyReady+"\nSTATUS=ready", log)
			sent.sent = true
			sent.mu.Unlock()
			return
		}
		if why != last {
			sdNotify("STATUS="+why, log)
			last = why
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// notifyReloading tells systemd a reload has begun, once READY=1 was sent
// (before that, systemd is still waiting for the start), and reports
// whether it did.
func notifyReloading(sent *readyNotice, log *zap.Logger) bool {
	sent.mu.Lock()
	defer sent.mu.Unlock()
	if sent.sent {
		sdNotify(daemon.SdNotifyReloading+"\n"+daemon.SdNotifyMonotonicUsec()+"\nSTATUS=reloading", log)
	}
	return sent.sent
}

// notifyReloaded tells systemd the reload notifyReloading announced is
// over; announced is what notifyReloading returned.
func notifyReloaded(announced bool, log *zap.Logger) {
	if announced {
		sdNotify(daemon.SdNotifyReady+"\nSTATUS=ready", log)
	}
}

// notifyStopping tells systemd that shutdown has begun.
func notifyStopping(log *zap.Logger) {
	if os.Getenv("NOTIFY_SOCKET") != "" {
		sdNotify(daemon.SdNotifyStopping+"\nSTATUS=deregistering and draining", log)
	}
}

func sdNotify(state string, log *zap.Logger) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("systemd notify failed", zap.Error(err))
	}
}

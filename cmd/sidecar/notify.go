package main

import (
	"context"
	"os"
	"sync/atomic"
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

// notifyReady sends READY=1 to systemd the first time ready reports true,
// and STATUS= with its reason whenever that changes before then. It returns
// once READY=1 is sent, setting sent, or when ctx ends; it returns at once
// when there is no notify socket.
func notifyReady(ctx context.Context, ready func() (bool, string), sent *atomic.Bool, log *zap.Logger) {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return
	}
	t := time.NewTicker(notifyEvery)
	defer t.Stop()
	last := ""
	for {
		ok, why := ready()
		if ok {
			sdNotify(daemon.SdNotifyReady+"\nSTATUS=ready", log)
			sent.Store(true)
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
// (before that, systemd is still waiting for the start).
func notifyReloading(sent *atomic.Bool, log *zap.Logger) {
	if sent.Load() {
		sdNotify(daemon.SdNotifyReloading+"\n"+daemon.SdNotifyMonotonicUsec()+"\nSTATUS=reloading", log)
	}
}

// notifyReloaded tells systemd the reload notifyReloading announced is
// over.
func notifyReloaded(sent *atomic.Bool, log *zap.Logger) {
	if sent.Load() {
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

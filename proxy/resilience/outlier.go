package resilience

import (
	"sync/atomic"
	"time"

	"github.com/sidecarlb/sidecar/config"
)

// forgiveAfter is how many successes in a row after an ejection forgive
// the ejections so far, so the next one lasts the base time again.
const forgiveAfter = 100

// Outlier is one node's outlier-detection state: its run of gateway
// failures and its ejections. Whether an ejection may happen at all
// (max_ejection_percent) is the caller's to decide, since it depends on the
// other nodes. Its zero value is a node never ejected; it is safe for
// concurrent use and never blocks.
type Outlier struct {
	consecutive  atomic.Int32 // gateway failures in a row
	ejections    atomic.Int32 // times ejected; multiplies the ejection time
	successes    atomic.Int32 // successes since the last ejection
	ejectedUntil atomic.Int64 // unix nanoseconds; 0 when not ejected
}

// Observe records a try's outcome and reports whether the node should now
// be ejected: cfg.ConsecutiveFailures gateway failures in a row with
// cfg.Enabled. A success ends the run, and forgiveAfter of them since the
// last ejection forgive the earlier ejections.
func (o *Outlier) Observe(cfg *config.Outlier, gatewayFailure bool) (eject bool) {
	if !gatewayFailure {
		if o.consecutive.Load() != 0 {
			o.consecutive.Store(0)
		}
		if o.ejections.Load() > 0 && o.successes.Add(1) >= forgiveAfter {
			o.ejections.Store(0)
		}
		return false
	}
	if !cfg.Enabled {
		return false
	}
	return o.consecutive.Add(1) >= int32(max(cfg.ConsecutiveFailures, 1))
}

// Eject takes the node out from now for base_ejection times the ejections
// so far, this one included, capped at max_ejection (or base_ejection when
// that is larger). It returns how long, and the count of ejections.
func (o *Outlier) Eject(cfg *config.Outlier, now time.Time) (time.Duration, int32) {
	times := o.ejections.Add(1)
	d := min(cfg.BaseEjection*time.Duration(times), max(cfg.MaxEjection, cfg.BaseEjection))
	o.ejectedUntil.Store(now.Add(d).UnixNano())
	o.consecutive.Store(0)
	o.successes.Store(0)
	return d, times
}

// Ejected reports whether the node is ejected at now.
func (o *Outlier) Ejected(now time.Time) bool { return o.ejectedUntil.Load() > now.UnixNano() }

// EjectedUntil is when the node's ejection ends, if it is ejected at now.
func (o *Outlier) EjectedUntil(now time.Time) (time.Time, bool) {
	until := o.ejectedUntil.Load()
	if until <= now.UnixNano() {
		return time.Time{}, false
	}
	return time.Unix(0, until).UTC(), true
}

// Consecutive is the node's current run of gateway failures.
func (o *Outlier) Consecutive() int { return int(o.consecutive.Load()) }

package pubsub

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Outcome is what became of one delivery attempt.
type Outcome uint8

const (
	// Success: the app took the message (2xx, empty or {"status":"SUCCESS"}).
	Success Outcome = iota
	// Retry: try again later ({"status":"RETRY"}, 5xx, 408, 429, a timeout or
	// a broken connection). Counts as an attempt.
	Retry
	// Drop: the app declined the message ({"status":"DROP"}); done.
	Drop
	// DeadLetter: the app refused the message ({"status":"DEADLETTER"} or
	// another 4xx); dead-lettered at once.
	DeadLetter
	// NotDelivered: the message never reached the app (draining, unhealthy,
	// no such subscription, app not listening). Not an attempt: the
	// publisher tries again, elsewhere if it can.
	NotDelivered
)

var outcomeNames = [...]string{"success", "retry", "drop", "deadletter", "not_delivered"}

func (o Outcome) String() string {
	if int(o) < len(outcomeNames) {
		return outcomeNames[o]
	}
	return "unknown"
}

// ParseOutcome is the inverse of String.
func ParseOutcome(s string) (Outcome, bool) {
	for i, n := range outcomeNames {
		if n == s {
			return Outcome(i), true
		}
	}
	return 0, false
}

// Result is one delivery attempt's outcome.
type Result struct {
	Outcome Outcome
	// RetryAfter is the app's Retry-After, if it sent one with a retry.
	RetryAfter time.Duration
	// Reason says why, for dead letters and logs ("status 404").
	Reason string
}

// maxRetryAfter caps an app's Retry-After.
const maxRetryAfter = time.Hour

// Classify maps the app's answer to an outcome.
func Classify(status int, h http.Header, body []byte) Result {
	switch {
	case status >= 200 && status < 300:
		return classifyBody(body)
	case status >= 500, status == http.StatusRequestTimeout, status == http.StatusTooManyRequests:
		return Result{Outcome: Retry, RetryAfter: retryAfter(h.Get("Retry-After")), Reason: "status " + strconv.Itoa(status)}
	case status >= 400:
		return Result{Outcome: DeadLetter, Reason: "status " + strconv.Itoa(status)}
	}
	return Result{Outcome: Retry, Reason: "status " + strconv.Itoa(status)}
}

func classifyBody(body []byte) Result {
	if len(strings.TrimSpace(string(body))) == 0 {
		return Result{Outcome: Success}
	}
	var r struct {
		Status *string `json:"status"`
	}
	if json.Unmarshal(body, &r) != nil || r.Status == nil {
		return Result{Outcome: Success} // a 2xx with some other body
	}
	switch strings.ToUpper(*r.Status) {
	case "SUCCESS", "":
		return Result{Outcome: Success}
	case "RETRY":
		return Result{Outcome: Retry, Reason: "app answered RETRY"}
	case "DROP":
		return Result{Outcome: Drop, Reason: "app answered DROP"}
	case "DEADLETTER":
		return Result{Outcome: DeadLetter, Reason: "app answered DEADLETTER"}
	}
	return Result{Outcome: Retry, Reason: fmt.Sprintf("unknown status %q", *r.Status)}
}

// retryAfter parses Retry-After (seconds or an HTTP date); 0 if absent.
func retryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return min(time.Duration(n)*time.Second, maxRetryAfter)
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(time.Until(t), 0), maxRetryAfter)
	}
	return 0
}

// Policy is a subscription's retry policy.
type Policy struct {
	MaxAttempts int
	Backoff     time.Duration
	MaxBackoff  time.Duration
}

// Delay is how long to wait before the attempt after the attempts-th:
// Backoff doubled per attempt up to MaxBackoff, with ±20% jitter, or the
// app's Retry-After when it is longer.
func (p Policy) Delay(attempts int, retryAfter time.Duration) time.Duration {
	d := p.Backoff
	for i := 1; i < attempts && d < p.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, p.MaxBackoff)
	d = time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
	return max(d, retryAfter)
}

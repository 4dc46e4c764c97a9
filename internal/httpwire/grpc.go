package httpwire

import (
	"math"
	"strconv"
	"time"
)

// GRPCTimeout parses a grpc-timeout header value: at most 8 digits and a
// unit (H, M, S, m, u or n), as gRPC over HTTP/2 defines it. It reports
// false for anything else. A value past what a time.Duration holds (such
// as 99999999H) is clamped to the longest Duration rather than wrapping
// round to a negative one.
func GRPCTimeout(v string) (time.Duration, bool) {
	if len(v) < 2 || len(v) > 9 {
		return 0, false
	}
	n, err := strconv.ParseInt(v[:len(v)-1], 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	var unit time.Duration
	switch v[len(v)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, false
	}
	if n > int64(math.MaxInt64/unit) {
		return math.MaxInt64, true
	}
	return time.Duration(n) * unit, true
}

// Package resilience holds the per-node and per-route mechanisms that keep
// a proxy's traffic off failing nodes and bound how much extra load its
// retries add: the circuit breaker (sony/gobreaker's two-step breaker),
// outlier ejection, and the retry budget.
//
// None of them does I/O or keeps a clock of its own: every call that needs
// the time takes it as an argument, and what must happen later (an
// ejection's end) is scheduled through a Clock passed in, so tests move
// time on with a Manual clock instead of sleeping. The breaker is the
// exception: gobreaker reads the wall clock for its open period.
//
// Everything here is safe for concurrent use and none of it blocks; the
// budget and the outlier counters are lock-free atomics on the request
// path.
package resilience

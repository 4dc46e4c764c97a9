package config

// ProcessLimits bound the sidecar process itself (limits.*).
type ProcessLimits struct {
	// Memory is a soft limit on the memory the Go runtime holds (heap,
	// stacks and its own), as a size ("96MiB"): near it the garbage
	// collector runs more often and gives freed memory back to the system
	// sooner, trading CPU for resident memory; it never refuses an
	// allocation. Empty (the default): no limit, or the GOMEMLIMIT
	// environment variable's when it is set. At least 16MiB.
	Memory string `yaml:"memory"`
	// MemoryN is Memory resolved by Load, in bytes; 0 for none.
	MemoryN int64 `yaml:"-"`
}

// MinMemoryLimit is the smallest limits.memory accepted: below it the
// collector would run all the time.
const MinMemoryLimit = 16 << 20

// resolveLimits parses limits.memory.
func (p *parser) resolveLimits(l *ProcessLimits) {
	n, err := ParseBytes(l.Memory)
	switch {
	case err != nil:
		p.errorf("limits.memory", "%v", err)
	case l.Memory != "" && n < MinMemoryLimit:
		p.errorf("limits.memory", "%q is below the least of 16MiB", l.Memory)
	default:
		l.MemoryN = n
	}
}

package balancer

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/sidecarlb/sidecar/discovery"
)

// keyOwners returns the ID picked for each of keys 0..n-1. Small consecutive
// integers are deliberately poorly mixed keys.
func keyOwners(t *testing.T, h *Hash, n int) []string {
	t.Helper()
	owners := make([]string, n)
	for k := range owners {
		owners[k] = pickID(t, h, &Request{Key: uint64(k), HasKey: true})
	}
	return owners
}

func TestHashSameKey(t *testing.T) {
	eps := testEndpoints(10)
	h := NewHash()
	h.Update(eps)
	first := keyOwners(t, h, 1000)
	if again := keyOwners(t, h, 1000); !slices.Equal(first, again) {
		t.Errorf("Pick() owners changed between two passes over the same set")
	}
	// The ring depends on IDs, not on the order of the slice.
	shuffled := slices.Clone(eps)
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(shuffled), func(i, j int) {
		shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
	})
	h.Update(shuffled)
	if got := keyOwners(t, h, 1000); !slices.Equal(first, got) {
		t.Errorf("Pick() owners changed after reordering the same set")
	}
}

func TestHashMovement(t *testing.T) {
	const keys = 10000
	eps := testEndpoints(10)
	tests := []struct {
		name          string
		before, after []discovery.Endpoint
		maxMoved      float64
	}{
		{"remove first", eps, without(eps, "node-00000"), 0.12},
		{"remove middle", eps, without(eps, "node-00004"), 0.12},
		{"remove last", eps, without(eps, "node-00009"), 0.12},
		{"add one", eps[:9], eps, 0.15},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := NewHash()
			h.Update(tc.before)
			before := keyOwners(t, h, keys)
			h.Update(tc.after)
			after := keyOwners(t, h, keys)
			moved, movedBetweenSurvivors := 0, 0
			for k := range keys {
				if before[k] == after[k] {
					continue
				}
				moved++
				// A key may only move off a removed endpoint or onto
				// an added one.
				if hasID(tc.after, before[k]) && hasID(tc.before, after[k]) {
					movedBetweenSurvivors++
				}
			}
			frac := float64(moved) / keys
			t.Logf("moved %d of %d keys (%.1f%%)", moved, keys, 100*frac)
			if frac > tc.maxMoved {
				t.Errorf("moved keys = %.3f, want at most %.2f", frac, tc.maxMoved)
			}
			if movedBetweenSurvivors != 0 {
				t.Errorf("keys moved between surviving endpoints = %d, want 0", movedBetweenSurvivors)
			}
		})
	}
}

func TestHashBalance(t *testing.T) {
	const keys = 10000
	tests := []struct {
		name   string
		n      int
		keyGen func(k int) uint64
	}{
		{"sequential keys", 10, func(k int) uint64 { return uint64(k) }},
		{"strided keys", 10, func(k int) uint64 { return uint64(k) << 32 }},
		{"random keys", 10, func(k int) uint64 { return rand.New(rand.NewPCG(uint64(k), 0)).Uint64() }},
		{"3 endpoints", 3, func(k int) uint64 { return uint64(k) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			eps := testEndpoints(tc.n)
			h := NewHash()
			h.Update(eps)
			counts := map[string]int{}
			for k := range keys {
				counts[pickID(t, h, &Request{Key: tc.keyGen(k), HasKey: true})]++
			}
			mean := float64(keys) / float64(tc.n)
			most := 0
			for _, e := range eps {
				most = max(most, counts[e.ID])
			}
			ratio := float64(most) / mean
			t.Logf("max/mean = %.3f", ratio)
			if ratio > 1.25 {
				t.Errorf("max/mean load = %.3f, want at most 1.25", ratio)
			}
		})
	}
}

func TestHashWeighted(t *testing.T) {
	eps := weightedEndpoints(1, 3)
	h := NewHash()
	h.Update(eps)
	counts := map[string]int{}
	for k := range 10000 {
		counts[pickID(t, h, &Request{Key: uint64(k), HasKey: true})]++
	}
	if share := float64(counts["node-00001"]) / 10000; share < 0.65 || share > 0.85 {
		t.Errorf("share of weight-3 endpoint = %.3f, want in [0.65, 0.85]", share)
	}
}

func TestHashNoKeyRoundRobin(t *testing.T) {
	h := NewHash()
	h.Update(testEndpoints(3))
	var got []string
	for i := range 6 {
		// A Key without HasKey is ignored.
		got = append(got, pickID(t, h, &Request{Key: 42, HasKey: i < 0}))
	}
	want := []string{"node-00000", "node-00001", "node-00002", "node-00000", "node-00001", "node-00002"}
	if !slices.Equal(got, want) {
		t.Errorf("Pick() without key = %v, want %v", got, want)
	}
}

func TestHashExclude(t *testing.T) {
	const keys = 2000
	eps := testEndpoints(10)
	h := NewHash()
	h.Update(eps)
	owners := keyOwners(t, h, keys)
	fallback := make([]string, keys)
	for k := range keys {
		r := &Request{Key: uint64(k), HasKey: true, Exclude: []string{owners[k]}}
		fallback[k] = pickID(t, h, r)
		if fallback[k] == owners[k] {
			t.Fatalf("Pick(%+v) = %v, want another endpoint", r, fallback[k])
		}
		if again := pickID(t, h, r); again != fallback[k] {
			t.Fatalf("Pick(%+v) = %v, then %v, want the same", r, fallback[k], again)
		}
	}
	// The fallback is where the key goes once its owner is gone, so a retry
	// lands where later requests for the key will.
	for _, e := range eps {
		h.Update(without(eps, e.ID))
		for k := range keys {
			if owners[k] != e.ID {
				continue
			}
			if got := pickID(t, h, &Request{Key: uint64(k), HasKey: true}); got != fallback[k] {
				t.Fatalf("Pick(key %d) without %s = %v, want %v (the fallback under Exclude)", k, e.ID, got, fallback[k])
			}
		}
	}
}

func TestHashLarge(t *testing.T) {
	eps := testEndpoints(10000)
	h := NewHash()
	h.Update(eps)
	st := h.state.Load()
	if len(st.ring) > ringBudget {
		t.Errorf("ring points = %d, want at most %d", len(st.ring), ringBudget)
	}
	if !slices.IsSorted(st.ring) {
		t.Errorf("ring is not sorted")
	}
	before := keyOwners(t, h, 10000)
	h.Update(without(eps, "node-05000"))
	after := keyOwners(t, h, 10000)
	for k := range before {
		if before[k] != after[k] && before[k] != "node-05000" {
			t.Fatalf("key %d moved from surviving %s to %s", k, before[k], after[k])
		}
	}
}

func TestMix64(t *testing.T) {
	// Reference values of the splitmix64 finalizer.
	tests := []struct{ in, want uint64 }{
		{0, 0},
		{golden, 0xe220a8397b1dcdaf},
	}
	for _, tc := range tests {
		if got := mix64(tc.in); got != tc.want {
			t.Errorf("mix64(%#x) = %#x, want %#x", tc.in, got, tc.want)
		}
	}
	// FNV-1a test vectors.
	for s, want := range map[string]uint64{"": 0xcbf29ce484222325, "a": 0xaf63dc4c8601ec8c, "foobar": 0x85944171f73967e8} {
		if got := fnv1a(s); got != want {
			t.Errorf("fnv1a(%q) = %#x, want %#x", s, got, want)
		}
	}
}

func hasID(eps []discovery.Endpoint, id string) bool {
	return slices.ContainsFunc(eps, func(e discovery.Endpoint) bool { return e.ID == id })
}

func TestHashSearch(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, n := range []int{1, 2, 3, 100, 1000} {
		h := NewHash()
		h.Update(testEndpoints(n))
		st := h.state.Load()
		probes := []uint64{0, 1, st.ring[0], st.ring[len(st.ring)-1], ^uint64(0)}
		for range 10000 {
			probes = append(probes, rng.Uint64())
		}
		for _, v := range probes {
			if got, want := st.search(v), searchAtLeast(st.ring, v); got != want {
				t.Fatalf("%d endpoints: search(%#x) = %d, want %d", n, v, got, want)
			}
		}
	}
}

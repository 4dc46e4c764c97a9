package balancer

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkPick measures Pick (and Done, where there is one) for every
// balancer at several set sizes, serially and in parallel. Hash requests
// carry keys; the others carry none.
func BenchmarkPick(b *testing.B) {
	keys := make([]uint64, 1<<16)
	for i := range keys {
		keys[i] = rand.Uint64()
	}
	for _, name := range Names() {
		for _, n := range []int{3, 100, 10000} {
			bal, err := New(name, Options{})
			if err != nil {
				b.Fatal(err)
			}
			bal.Update(testEndpoints(n))
			b.Run(fmt.Sprintf("%s/%d", name, n), func(b *testing.B) {
				b.ReportAllocs()
				r := &Request{HasKey: name == "hash"}
				i := 0
				for b.Loop() {
					r.Key = keys[i&(1<<16-1)]
					i++
					benchPick(b, bal, r)
				}
			})
			b.Run(fmt.Sprintf("%s/%d/parallel", name, n), func(b *testing.B) {
				b.ReportAllocs()
				b.RunParallel(func(pb *testing.PB) {
					r := &Request{HasKey: name == "hash"}
					i := rand.IntN(1 << 16)
					for pb.Next() {
						r.Key = keys[i&(1<<16-1)]
						i++
						benchPick(b, bal, r)
					}
				})
			})
		}
	}
}

// BenchmarkPickWeighted covers the weighted paths of random and round_robin.
func BenchmarkPickWeighted(b *testing.B) {
	for _, name := range []string{"random", "round_robin"} {
		for _, n := range []int{3, 100, 10000} {
			eps := testEndpoints(n)
			for i := range eps {
				eps[i].Weight = 1 + i%5
			}
			bal, _ := New(name, Options{})
			bal.Update(eps)
			b.Run(fmt.Sprintf("%s/%d", name, n), func(b *testing.B) {
				b.ReportAllocs()
				r := &Request{}
				for b.Loop() {
					benchPick(b, bal, r)
				}
			})
		}
	}
}

// BenchmarkUpdate measures rebuilding each balancer's snapshot.
func BenchmarkUpdate(b *testing.B) {
	for _, name := range Names() {
		for _, n := range []int{100, 10000} {
			eps := testEndpoints(n)
			for i := range eps {
				eps[i].Weight = 1 + i%5
			}
			bal, _ := New(name, Options{})
			b.Run(fmt.Sprintf("%s/%d", name, n), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					bal.Update(eps)
				}
			})
		}
	}
}

func benchPick(b *testing.B, bal Balancer, r *Request) {
	p, err := bal.Pick(val(r))
	if err != nil {
		b.Fatal(err)
	}
	if p.Done != nil {
		p.Done(Result{})
	}
}

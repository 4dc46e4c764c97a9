package httpwire

import (
	"math/rand/v2"
	"net/textproto"
	"strings"
	"testing"
)

// TestCanonicalKeyMatchesTextproto: CanonicalKey is
// textproto.CanonicalMIMEHeaderKey for every input, valid field name or
// not, canonical, lower case (HTTP/2) or mixed.
func TestCanonicalKeyMatchesTextproto(t *testing.T) {
	keys := []string{
		"Content-Type", "content-type", "CONTENT-TYPE", "X-Forwarded-For", "x-forwarded-for",
		"Te", "TE", "te", "Etag", "ETag", "etag", "Www-Authenticate", "www-authenticate",
		"X-1-b", "A", "a", "-x", "x--y", "X_Under", "x_under", "Accept-Encoding", "aCCEPT",
		"Grpc-Status", "grpc-status", "", "x y", "X Y", "X y", "é", "a\x00b", ":path",
	}
	keys = append(keys, commonKeys...)
	for _, k := range commonKeys {
		keys = append(keys, strings.ToLower(k), strings.ToUpper(k))
	}
	rng := rand.New(rand.NewPCG(1, 2))
	const alphabet = "aAbBzZ09-_!#$%&'*+.^`|~ :\x7f"
	for range 5000 {
		b := make([]byte, 1+rng.IntN(12))
		for i := range b {
			b[i] = alphabet[rng.IntN(len(alphabet))]
		}
		keys = append(keys, string(b))
	}
	for _, k := range keys {
		if got, want := CanonicalKey(k), textproto.CanonicalMIMEHeaderKey(k); got != want {
			t.Errorf("CanonicalKey(%q) = %q, want %q", k, got, want)
		}
	}
}

func TestLowerKey(t *testing.T) {
	for _, k := range append(commonKeys, "X-Custom-Thing", "x-already-lower", "A") {
		if got, want := LowerKey(k), strings.ToLower(k); got != want {
			t.Errorf("LowerKey(%q) = %q, want %q", k, got, want)
		}
		if got := CanonicalKey(LowerKey(k)); got != textproto.CanonicalMIMEHeaderKey(k) {
			t.Errorf("CanonicalKey(LowerKey(%q)) = %q, want %q", k, got, textproto.CanonicalMIMEHeaderKey(k))
		}
	}
}

func TestCommonKeysCanonical(t *testing.T) {
	for _, k := range CommonKeys() {
		if c := textproto.CanonicalMIMEHeaderKey(k); c != k {
			t.Errorf("common key %q is not canonical (%q)", k, c)
		}
	}
}

func BenchmarkCanonicalKey(b *testing.B) {
	for _, k := range []string{"Content-Type", "content-type", "x-custom-header"} {
		b.Run(k, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = CanonicalKey(k)
			}
		})
	}
}

// FuzzCanonicalKey: CanonicalKey is textproto.CanonicalMIMEHeaderKey for
// any bytes a peer may send as a field name, and ValidToken agrees with
// ValidLowerToken on names with no upper-case letter.
func FuzzCanonicalKey(f *testing.F) {
	for _, k := range []string{"content-type", "Content-Type", "X_Under", "a b", "", "é", "TE"} {
		f.Add(k)
	}
	f.Fuzz(func(t *testing.T, k string) {
		if got, want := CanonicalKey(k), textproto.CanonicalMIMEHeaderKey(k); got != want {
			t.Fatalf("CanonicalKey(%q) = %q, want %q", k, got, want)
		}
		if strings.ToLower(k) == k && ValidToken(k) != ValidLowerToken(k) {
			t.Fatalf("ValidToken(%q) = %v, ValidLowerToken = %v; want equal for a lower-case name", k, ValidToken(k), ValidLowerToken(k))
		}
	})
}

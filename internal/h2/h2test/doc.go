// Package h2test holds the HTTP/2 peers that the tests of internal/h2 and
// proxy run against, the way net/http/httptest holds the servers of
// net/http's tests: Go's own h2c server and client (StartH2C, NewClient),
// an app connection driven frame by frame (Dial, RawConn), a node driven
// frame by frame (StartRawNode), and the connection errors a peer can
// commit (ConnErrorCases).
//
// It is for _test.go files only. Every peer listens or dials on loopback
// and is closed, with its goroutines waited for, by the test's cleanup.
package h2test

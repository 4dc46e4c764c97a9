package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// wsLoops opens -c WebSocket sessions to /ws, spread over the targets, and
// plays ping-pong: send one binary message of -size bytes, read the echo.
func wsLoops(ctx context.Context, o options, phase *atomic.Int32) ([]func(*worker), error) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: o.workers}}
	conns := make([]*websocket.Conn, o.workers)
	for i := range conns {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, _, err := websocket.Dial(dctx, "ws://"+o.targets[i%len(o.targets)]+"/ws", &websocket.DialOptions{
			HTTPClient:      client,
			CompressionMode: websocket.CompressionDisabled,
		})
		cancel()
		if err != nil {
			for _, c := range conns[:i] {
				c.CloseNow()
			}
			return nil, fmt.Errorf("websocket dial %d: %w", i, err)
		}
		c.SetReadLimit(1 << 20)
		conns[i] = c
	}
	msg := make([]byte, o.size)
	loops := make([]func(*worker), o.workers)
	for i, c := range conns {
		buf := make([]byte, o.size+1)
		loops[i] = func(w *worker) {
			defer c.Close(websocket.StatusNormalClosure, "")
			closedLoop(phase, func() error {
				if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
					return err
				}
				_, r, err := c.Reader(ctx)
				if err != nil {
					return err
				}
				n, err := io.ReadFull(r, buf)
				if err != io.ErrUnexpectedEOF && err != nil {
					return err
				}
				if n != o.size {
					return fmt.Errorf("echo of %d bytes, want %d", n, o.size)
				}
				return nil
			})(w)
		}
	}
	return loops, nil
}

package main

import (
	"fmt"
	"io"
	"os"
	"sync"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sidecarlb/sidecar/config"
)

// newLogger builds the one logger of the process, writing to w, and the
// level a reload changes.
func newLogger(c config.Log, w io.Writer) (*zap.Logger, zap.AtomicLevel, error) {
	l, err := zapcore.ParseLevel(c.Level)
	if err != nil {
		return nil, zap.AtomicLevel{}, fmt.Errorf("log.level: %w", err)
	}
	level := zap.NewAtomicLevelAt(l)
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	var encoder zapcore.Encoder
	if c.Format == "console" {
		enc.EncodeLevel = zapcore.CapitalLevelEncoder
		encoder = zapcore.NewConsoleEncoder(enc)
	} else {
		encoder = zapcore.NewJSONEncoder(enc)
	}
	core := zapcore.NewCore(encoder, zapcore.Lock(zapcore.AddSync(w)), level)
	return zap.New(core, zap.ErrorOutput(zapcore.AddSync(w))), level, nil
}

// newAccessLogger builds the access log log.access asks for: nil for off,
// JSON lines to stdout or appended to a file. closeFn closes the file;
// reopen opens it again by its name (after logrotate moved it away), and
// does nothing for stdout.
func newAccessLogger(c config.Log, stdout io.Writer) (log *zap.Logger, closeFn func(), reopen func() error, err error) {
	var w zapcore.WriteSyncer
	closeFn, reopen = func() {}, func() error { return nil }
	switch c.Access {
	case config.AccessOff, "":
		return nil, closeFn, reopen, nil
	case "stdout":
		w = zapcore.Lock(zapcore.AddSync(stdout))
	default:
		f, err := openReopenable(c.Access)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("log.access: %w", err)
		}
		w, closeFn, reopen = f, f.close, f.reopen
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	enc.LevelKey = "" // every line is Info
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), w, zapcore.InfoLevel)
	return zap.New(core), closeFn, reopen, nil
}

// reopenable is a log file appended to that can be opened again by its
// name, so that a rotated file is let go: the usual logrotate setup
// (create, then a reload of the sidecar) works without copytruncate.
type reopenable struct {
	path string
	mu   sync.Mutex
	f    *os.File
}

func openReopenable(path string) (*reopenable, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	return &reopenable{path: path, f: f}, nil
}

func (r *reopenable) Write(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f.Write(b)
}

func (r *reopenable) Sync() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f.Sync()
}

// reopen opens the path again and closes the file it replaces; on an
// error the old file stays in use.
func (r *reopenable) reopen() error {
	f, err := os.OpenFile(r.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	r.mu.Lock()
	old := r.f
	r.f = f
	r.mu.Unlock()
	_ = old.Sync()
	return old.Close()
}

func (r *reopenable) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	_ = r.f.Sync()
	_ = r.f.Close()
}

package main

import (
	"fmt"
	"io"
	"os"

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
// JSON lines to stdout or appended to a file. closeFn closes the file.
func newAccessLogger(c config.Log, stdout io.Writer) (log *zap.Logger, closeFn func(), err error) {
	var w zapcore.WriteSyncer
	closeFn = func() {}
	switch c.Access {
	case config.AccessOff, "":
		return nil, closeFn, nil
	case "stdout":
		w = zapcore.Lock(zapcore.AddSync(stdout))
	default:
		f, err := os.OpenFile(c.Access, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return nil, nil, fmt.Errorf("log.access: %w", err)
		}
		w, closeFn = zapcore.Lock(f), func() { _ = f.Sync(); _ = f.Close() }
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	enc.LevelKey = "" // every line is Info
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), w, zapcore.InfoLevel)
	return zap.New(core), closeFn, nil
}

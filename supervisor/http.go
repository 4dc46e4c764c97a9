package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"go.uber.org/zap"
)

// Result is the JSON answer of the control endpoints.
type Result struct {
	Action string `json:"action"` // kill, restart or update
	OK     bool   `json:"ok"`
	Error  string `json:"error,omitempty"`
	// BuildOutput is the build's combined output, for update.
	BuildOutput string `json:"build_output,omitempty"`
	// Seconds is how long the action took.
	Seconds float64 `json:"seconds"`
	// PreviousPID is the app's pid before the action; 0 if none ran.
	PreviousPID int `json:"previous_pid,omitempty"`
	// App is the app's state after the action.
	App Status `json:"app"`
}

// Routes returns the admin routes of the app, by ServeMux pattern:
//
//	GET  /app          the app's Status
//	POST /app/kill     Kill
//	POST /app/restart  Restart
//	POST /app/update   Update
//
// The POST routes answer a Result once the action is done: 200 when it
// succeeded, 409 when another action runs or the app was killed, 422 when
// the build failed, 504 when the app did not become healthy in time, 503
// when the supervisor has stopped. An action ends early if the client goes
// away.
func (a *App) Routes() map[string]http.Handler {
	return map[string]http.Handler{
		"GET /app": http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, http.StatusOK, a.Status())
		}),
		"POST /app/kill": a.action("kill", func(ctx context.Context) ([]byte, error) {
			return nil, a.Kill(ctx)
		}),
		"POST /app/restart": a.action("restart", func(ctx context.Context) ([]byte, error) {
			return nil, a.Restart(ctx)
		}),
		"POST /app/update": a.action("update", a.Update),
	}
}

func (a *App) action(name string, f func(context.Context) ([]byte, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		res := Result{Action: name, PreviousPID: a.Status().PID}
		out, err := f(r.Context())
		res.Seconds = time.Since(start).Seconds()
		res.BuildOutput = string(out)
		res.App = a.Status()
		code := http.StatusOK
		if err != nil {
			code = errorStatus(err)
			res.Error = err.Error()
			a.log.Warn("app "+name+" failed", zap.Error(err), zap.Duration("took", time.Since(start)))
		} else {
			res.OK = true
			a.log.Info("app "+name+" done", zap.Int("pid", res.App.PID), zap.Duration("took", time.Since(start)))
		}
		writeJSON(w, code, res)
	})
}

// errorStatus is the one place that maps control errors to HTTP statuses.
func errorStatus(err error) int {
	switch {
	case errors.Is(err, ErrBusy), errors.Is(err, ErrKilled):
		return http.StatusConflict
	case errors.Is(err, ErrBuild):
		return http.StatusUnprocessableEntity
	case errors.Is(err, ErrNoBuild):
		return http.StatusBadRequest
	case errors.Is(err, ErrNotReady), errors.Is(err, context.DeadlineExceeded):
		return http.StatusGatewayTimeout
	case errors.Is(err, ErrStopped), errors.Is(err, context.Canceled):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

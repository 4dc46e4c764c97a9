package httpwire

import (
	"net/http"
	"strconv"
)

// statusCodes and statusLines hold each status's code and status line, so
// that answering allocates neither.
var statusCodes, statusLines = func() (codes, lines [600]string) {
	for code := range 600 {
		codes[code] = strconv.Itoa(code)
		lines[code] = codes[code] + " " + http.StatusText(code)
	}
	return
}()

// StatusCode returns code in decimal, as HTTP/2's :status carries it.
func StatusCode(code int) string {
	if code >= 0 && code < len(statusCodes) {
		return statusCodes[code]
	}
	return strconv.Itoa(code)
}

// StatusLine returns the status line of code after "HTTP/1.1 ": "200 OK",
// "599 " for a code with no reason phrase, the code alone out of 0–599.
func StatusLine(code int) string {
	if code >= 0 && code < len(statusLines) {
		return statusLines[code]
	}
	return strconv.Itoa(code)
}

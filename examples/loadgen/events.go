package main

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"math"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// maxEventRead bounds how much of the events file one read takes in.
const maxEventRead = 1 << 20

// eventFile follows a file that another process appends lines to.
type eventFile struct {
	path string
	off  int64
	part []byte // an unfinished last line
}

// read returns the lines completed since the last read. A missing file has
// no lines yet; a file that shrank is read again from its start.
func (f *eventFile) read() ([]string, error) {
	file, err := os.Open(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer file.Close()
	if fi, err := file.Stat(); err == nil && fi.Size() < f.off {
		f.off, f.part = 0, nil
	}
	if _, err := file.Seek(f.off, io.SeekStart); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(io.LimitReader(file, maxEventRead))
	if err != nil {
		return nil, err
	}
	f.off += int64(len(b))
	f.part = append(f.part, b...)
	var lines []string
	for {
		i := bytes.IndexByte(f.part, '\n')
		if i < 0 {
			break
		}
		if line := strings.TrimSpace(string(f.part[:i])); line != "" {
			lines = append(lines, line)
		}
		f.part = f.part[i+1:]
	}
	return lines, nil
}

// parseEvent reads "[@UNIXTIME ]TEXT". Without a time, or with one that is
// not a number, the event happened at readAt. A decimal comma is accepted,
// since a shell's $EPOCHREALTIME follows the locale.
func parseEvent(line string, readAt time.Time) event {
	e := event{at: readAt, text: line}
	stamp, text, ok := strings.Cut(line, " ")
	if !ok || !strings.HasPrefix(stamp, "@") {
		return e
	}
	secs, err := strconv.ParseFloat(strings.Replace(stamp[1:], ",", ".", 1), 64)
	if err != nil || secs <= 0 || math.IsInf(secs, 0) {
		return e
	}
	whole, frac := math.Modf(secs)
	e.at = time.Unix(int64(whole), int64(frac*1e9))
	e.text = strings.TrimSpace(text)
	return e
}

// names reports whether text mentions name as a whole word: "killing
// echo-2 …" names echo-2 but not echo-20.
func names(text, name string) bool {
	words := strings.FieldsFunc(text, func(r rune) bool {
		return unicode.IsSpace(r) || strings.ContainsRune(`()[]{}<>,;"'«»…`, r)
	})
	for _, w := range words {
		if strings.TrimRight(w, ".:!?") == name {
			return true
		}
	}
	return false
}

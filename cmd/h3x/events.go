package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/h3x-io/h3x"
)

// eventJSON is the JSON-lines form of an event that inject reads and tail
// writes:
//
//	{"id":"…","namespace":"orders","type":"order.created","message":"…",
//	 "data":{"any":"JSON"},"time":"2026-01-02T15:04:05Z","metadata":{"k":"v"}}
//
// "data" holds the body: a JSON string stands for its text, any other JSON
// value for its own bytes; bodies that are not UTF-8 travel as
// "data_base64". "time" is RFC 3339 or Unix seconds. tail adds "attempt",
// which inject ignores, so tail's output can be injected again.
type eventJSON struct {
	ID         string            `json:"id,omitempty"`
	Namespace  string            `json:"namespace,omitempty"`
	Type       string            `json:"type,omitempty"`
	Message    string            `json:"message,omitempty"`
	Data       json.RawMessage   `json:"data,omitempty"`
	DataBase64 []byte            `json:"data_base64,omitempty"`
	Time       json.RawMessage   `json:"time,omitempty"`
	Metadata   map[string]string `json:"metadata,omitempty"`
	Attempt    int               `json:"attempt,omitempty"`
}

// parseEventLine decodes one JSON line into an event; defaultNS fills a
// missing namespace.
func parseEventLine(line []byte, defaultNS string) (h3x.Event, error) {
	var j eventJSON
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&j); err != nil {
		return h3x.Event{}, fmt.Errorf("not a JSON event: %v", err)
	}
	if dec.More() {
		return h3x.Event{}, errors.New("more than one JSON value on the line")
	}
	ev := h3x.Event{ID: j.ID, Namespace: j.Namespace, Type: j.Type, Message: j.Message, Metadata: j.Metadata}
	if ev.Namespace == "" {
		ev.Namespace = defaultNS
	}
	if ev.Namespace == "" {
		return h3x.Event{}, errors.New("no namespace (give \"namespace\" or --ns)")
	}
	if err := h3x.ValidateNamespace(ev.Namespace); err != nil {
		return h3x.Event{}, fmt.Errorf("namespace %q: %v", ev.Namespace, strings.TrimPrefix(err.Error(), "h3x: invalid argument: "))
	}
	switch {
	case len(j.Data) > 0 && len(j.DataBase64) > 0:
		return h3x.Event{}, errors.New("both \"data\" and \"data_base64\"")
	case len(j.DataBase64) > 0:
		ev.Data = j.DataBase64
	case len(j.Data) > 0 && j.Data[0] == '"':
		var s string
		if err := json.Unmarshal(j.Data, &s); err != nil {
			return h3x.Event{}, fmt.Errorf("data: %v", err)
		}
		ev.Data = []byte(s)
	case len(j.Data) > 0 && !bytes.Equal(j.Data, []byte("null")):
		var buf bytes.Buffer
		if err := json.Compact(&buf, j.Data); err != nil {
			return h3x.Event{}, fmt.Errorf("data: %v", err)
		}
		ev.Data = buf.Bytes()
	}
	if len(j.Time) > 0 && !bytes.Equal(j.Time, []byte("null")) {
		t, err := parseTime(j.Time)
		if err != nil {
			return h3x.Event{}, err
		}
		ev.Time = t
	}
	return ev, nil
}

func parseTime(raw json.RawMessage) (time.Time, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return time.Time{}, fmt.Errorf("time %q is not RFC 3339", s)
		}
		return t, nil
	}
	sec, err := strconv.ParseFloat(string(raw), 64)
	if err != nil {
		return time.Time{}, errors.New("time must be an RFC 3339 string or Unix seconds")
	}
	// The years RFC 3339 can write (tail writes times that way).
	const firstUnix, lastUnix = -62135596800, 253402300799 // 0001-01-01, 9999-12-31T23:59:59Z
	if !(sec >= firstUnix && sec < lastUnix+1) {
		return time.Time{}, fmt.Errorf("time %s is out of range: Unix seconds from year 1 to 9999 (milliseconds given?)", raw)
	}
	whole := math.Floor(sec)
	return time.Unix(int64(whole), int64((sec-whole)*1e9)), nil
}

// eventToJSON is the inverse of parseEventLine: a body that is compact JSON
// (other than a string or null) is written as JSON, any other text as a
// JSON string and anything else in base64, so that parseEventLine gives
// back the same bytes.
func eventToJSON(ev *h3x.Event, attempt int) eventJSON {
	j := eventJSON{ID: ev.ID, Namespace: ev.Namespace, Type: ev.Type, Message: ev.Message, Metadata: ev.Metadata, Attempt: attempt}
	if len(ev.Data) > 0 {
		switch {
		case compactJSON(ev.Data):
			j.Data = ev.Data
		case utf8.Valid(ev.Data):
			j.Data, _ = json.Marshal(string(ev.Data))
		default:
			j.DataBase64 = ev.Data
		}
	}
	if !ev.Time.IsZero() {
		j.Time, _ = json.Marshal(ev.Time.UTC().Format(time.RFC3339Nano))
	}
	return j
}

// compactJSON reports whether b is a JSON value in compact form that
// parseEventLine keeps as it is: not a string (read as its text) and not
// null (read as no data).
func compactJSON(b []byte) bool {
	if !json.Valid(b) || b[0] == '"' || bytes.Equal(b, []byte("null")) {
		return false
	}
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return false
	}
	return bytes.Equal(buf.Bytes(), b)
}

// formatHuman writes a delivery on one line for people.
func formatHuman(ev *h3x.Event, attempt int) string {
	var b strings.Builder
	ts := "-"
	if !ev.Time.IsZero() {
		ts = ev.Time.Local().Format("2006-01-02 15:04:05")
	}
	fmt.Fprintf(&b, "%s %s", ts, ev.Namespace)
	if ev.Type != "" {
		fmt.Fprintf(&b, " %s", bareOrQuoted(ev.Type))
	}
	fmt.Fprintf(&b, " id=%s", bareOrQuoted(ev.ID))
	if attempt > 1 {
		fmt.Fprintf(&b, " attempt=%d", attempt)
	}
	if ev.Message != "" {
		fmt.Fprintf(&b, " msg=%s", strconv.Quote(ev.Message))
	}
	if len(ev.Data) > 0 {
		j := eventToJSON(&h3x.Event{Data: ev.Data}, 0)
		var compact bytes.Buffer
		if j.Data != nil && json.Compact(&compact, j.Data) == nil {
			// Compact: JSON's insignificant whitespace may hold newlines.
			fmt.Fprintf(&b, " data=%s", compact.Bytes())
		} else {
			fmt.Fprintf(&b, " data=<%d bytes>", len(ev.Data))
		}
	}
	keys := make([]string, 0, len(ev.Metadata))
	for k := range ev.Metadata {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%s", bareOrQuoted(k), strconv.Quote(ev.Metadata[k]))
	}
	return b.String()
}

// bareOrQuoted returns s as it is when it is one visible word, and quoted
// (Go syntax) otherwise: a newline, a space or a terminal escape sequence
// in an event's type, ID or metadata key must not break the line or reach
// the terminal.
func bareOrQuoted(s string) string {
	if s == "" {
		return `""`
	}
	for _, r := range s {
		if !unicode.IsGraphic(r) || unicode.IsSpace(r) || r == '"' || r == '=' {
			return strconv.Quote(s)
		}
	}
	return s
}

// jsonEncode writes v as one JSON line, without HTML escaping.
func jsonEncode(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

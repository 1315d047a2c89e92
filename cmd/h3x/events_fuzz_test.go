package main

import (
	"bytes"
	"maps"
	"testing"
)

// FuzzParseEventLine feeds arbitrary lines to inject's decoder: it must not
// panic, and an event it accepts must come back unchanged through tail's
// JSON form (eventToJSON) and the decoder again, as the CLI promises
// ("tail's JSON output is valid input and gives back the same bytes").
//
//	go test -run '^$' -fuzz FuzzParseEventLine -fuzztime 2m ./cmd/h3x
func FuzzParseEventLine(f *testing.F) {
	for _, s := range []string{
		`{"namespace":"orders","data":{"order":1,"items":[1,2]}}`,
		`{"id":"e-1","namespace":"orders","type":"order.created","message":"placed","data":"plain text","time":"2026-01-02T15:04:05.123Z","metadata":{"k":"v"}}`,
		`{"namespace":"orders","data_base64":"AAECAwT/"}`,
		`{"namespace":"orders","time":1700000000.25,"attempt":3}`,
		`{"data":[1, 2,  3]}`,
		`{"namespace":"orders","data":null,"time":null,"metadata":{}}`,
		`{"namespace":"Bad Namespace"}`,
		`{"namespace":"orders","data":1,"data_base64":"AA=="}`,
		`{"namespace":"orders","unknown":1}`,
		`{"namespace":"orders"} {"namespace":"orders"}`,
		`{"namespace":"orders","time":"yesterday"}`,
		`{`,
		``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		ev, err := parseEventLine(line, "default")
		if err != nil {
			return
		}
		var buf bytes.Buffer
		if err := jsonEncode(&buf, eventToJSON(&ev, 1)); err != nil {
			t.Fatalf("tail cannot write the event %+v: %v", ev, err)
		}
		again, err := parseEventLine(bytes.TrimSuffix(buf.Bytes(), []byte("\n")), "")
		if err != nil {
			t.Fatalf("inject refuses tail's line %s (from %q): %v", buf.Bytes(), line, err)
		}
		if again.ID != ev.ID || again.Namespace != ev.Namespace || again.Type != ev.Type || again.Message != ev.Message ||
			!bytes.Equal(again.Data, ev.Data) || !again.Time.Equal(ev.Time) ||
			len(again.Metadata) != len(ev.Metadata) || (len(ev.Metadata) > 0 && !maps.Equal(again.Metadata, ev.Metadata)) {
			t.Fatalf("round trip changed the event:\n line  %q\n first %+v\n again %+v\n via   %s", line, ev, again, buf.Bytes())
		}
	})
}

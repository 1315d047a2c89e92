package main

import (
	"bytes"
	"testing"

	"github.com/h3x-io/h3x"
)

// TestEventJSONRoundTripBodies: inject's doc says "tail's JSON output
// is valid input", and TestEventJSONRoundTrip checks that a body survives
// tail → inject. Bodies that were valid JSON but not in compact form came
// back compacted, and the JSON literal null came back as no data.
func TestEventJSONRoundTripBodies(t *testing.T) {
	for _, body := range []string{
		"null",
		`{"a": 1}`,
		"{\"a\":1}\n",
		" 42",
	} {
		ev := h3x.Event{ID: "1", Namespace: "orders", Data: []byte(body)}
		var buf bytes.Buffer
		if err := jsonEncode(&buf, eventToJSON(&ev, 1)); err != nil {
			t.Fatal(err)
		}
		got, err := parseEventLine(bytes.TrimSpace(buf.Bytes()), "")
		if err != nil {
			t.Fatalf("parsing %s: %v", buf.String(), err)
		}
		if !bytes.Equal(got.Data, ev.Data) {
			t.Errorf("body %q came back as %q (line %s)", body, got.Data, bytes.TrimSpace(buf.Bytes()))
		}
	}
}

// TestEventJSONCompactBodyStaysJSON: a body that is already compact JSON
// is written as JSON, not as a string, so tail shows it as it is.
func TestEventJSONCompactBodyStaysJSON(t *testing.T) {
	ev := h3x.Event{ID: "1", Namespace: "orders", Data: []byte(`{"a":[1,2],"b":"x"}`)}
	var buf bytes.Buffer
	if err := jsonEncode(&buf, eventToJSON(&ev, 1)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(buf.Bytes(), []byte(`"data":{"a":[1,2],"b":"x"}`)) {
		t.Errorf("compact JSON body written as %s", bytes.TrimSpace(buf.Bytes()))
	}
}

// TestEventJSONRoundTripLargeBodies: a body that fits an event (well under
// the 1 MiB frame) is written by tail as one JSON line that inject must be
// able to read back. Base64 (binary bodies) grows a body by 4/3 and JSON
// escaping of control characters by up to 6x, so such lines are longer
// than the frame size although the event is not.
func TestEventJSONRoundTripLargeBodies(t *testing.T) {
	binary := make([]byte, 800_000)
	for i := range binary {
		binary[i] = byte(i*7 + 0x80) // not UTF-8
	}
	text := bytes.Repeat([]byte{0x01}, 300_000) // valid UTF-8, escaped as \u0001
	for name, body := range map[string][]byte{"binary": binary, "control-text": text} {
		ev := h3x.Event{ID: "1", Namespace: "orders", Data: body}
		var buf bytes.Buffer
		if err := jsonEncode(&buf, eventToJSON(&ev, 1)); err != nil {
			t.Fatal(err)
		}
		lineLen := buf.Len()
		src := newLineSource(&buf, "")
		got, _, err := src.next()
		if err != nil {
			t.Errorf("%s body of %d bytes (a line of %d bytes): inject cannot read tail's line: %v", name, len(body), lineLen, err)
			continue
		}
		if !bytes.Equal(got.Data, body) {
			t.Errorf("%s body changed in the round trip", name)
		}
	}
}

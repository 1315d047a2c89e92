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

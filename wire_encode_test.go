package h3x

import (
	"bytes"
	"strings"
	"testing"

	"github.com/h3x-io/h3x/proto/h3xpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// checkWireEncoder checks that the hand-written encoder of m writes what
// proto.MarshalOptions{Deterministic: true} writes, or fails where it
// fails, and that it appends to what dst holds.
func checkWireEncoder(t *testing.T, m proto.Message) {
	t.Helper()
	want, wantErr := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	prefix := []byte("prefix")
	got, ok, gotErr := marshalFast(bytes.Clone(prefix), m)
	if !ok {
		t.Fatalf("%T has no hand-written encoder", m)
	}
	if (wantErr == nil) != (gotErr == nil) {
		t.Fatalf("%v: proto.Marshal: %v; hand-written: %v", m, wantErr, gotErr)
	}
	if wantErr != nil {
		if !bytes.Equal(got, prefix) {
			t.Fatalf("%v: a failed encoding changed dst to % x", m, got)
		}
		return
	}
	if !bytes.HasPrefix(got, prefix) || !bytes.Equal(got[len(prefix):], want) {
		t.Fatalf("%v encoded differently:\nproto.Marshal: % x\nhand-written:  % x", m, want, got[len(prefix):])
	}
	if se, ok := m.(*h3xpb.SendEvent); ok { // Publish sizes its chunks with payloadSize
		for _, p := range se.GetEvents() {
			if p != nil && payloadSize(p) != proto.Size(p) {
				t.Fatalf("payloadSize(%v) = %d, proto.Size %d", p, payloadSize(p), proto.Size(p))
			}
		}
	}
}

func TestWireEncodersMatchProto(t *testing.T) {
	long := strings.Repeat("é", 100) // lengths of two-byte varints
	payload := func(p *h3xpb.EventPayload) *h3xpb.EventPayload { return p }
	full := payload(&h3xpb.EventPayload{Id: "id-1", Namespace: "orders", Type: "created", Message: long, Data: []byte(long),
		Timestamp: 1700000000, Metadata: map[string]string{"b": "2", "a": "1", "": "", "k": ""}})
	unknown := payload(&h3xpb.EventPayload{Id: "u"})
	unknown.ProtoReflect().SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 9, protowire.VarintType), 7))
	deliveryUnknown := &h3xpb.Delivery{Event: unknown, Attempt: 1}
	deliveryUnknown.ProtoReflect().SetUnknown(protowire.AppendString(protowire.AppendTag(nil, 20, protowire.BytesType), "x"))
	for _, m := range []proto.Message{
		&h3xpb.EventsBatch{},
		&h3xpb.EventsBatch{RequestId: 1 << 63},
		&h3xpb.EventsBatch{RequestId: 3, Events: []*h3xpb.Delivery{
			{Event: full, Attempt: 1, LeaseDeadlineMs: 1700000000123},
			{}, // empty delivery
			{Event: &h3xpb.EventPayload{}, Attempt: 0},                                                    // empty event
			{Event: payload(&h3xpb.EventPayload{Timestamp: -1}), Attempt: 1<<32 - 1, LeaseDeadlineMs: -5}, // ten-byte varints
			deliveryUnknown,
		}},
		&h3xpb.EventsBatch{Events: []*h3xpb.Delivery{nil, {Attempt: 1}, nil}}, // nil elements: empty messages
		&h3xpb.SendEvent{Events: []*h3xpb.EventPayload{nil, {Id: "x"}}},
		(*h3xpb.EventsBatch)(nil), // typed nil messages: nothing
		(*h3xpb.SendEvent)(nil),
		&h3xpb.SendEvent{},
		&h3xpb.SendEvent{RequestId: 42, Events: []*h3xpb.EventPayload{full, {}, unknown, {Id: "x", Data: []byte{}}}},
		// Not valid UTF-8: refused, as proto.Marshal refuses it.
		&h3xpb.SendEvent{Events: []*h3xpb.EventPayload{{Id: "ok"}, {Namespace: "\xff"}}},
		&h3xpb.SendEvent{Events: []*h3xpb.EventPayload{{Metadata: map[string]string{"k": "\xc3"}}}},
		&h3xpb.EventsBatch{Events: []*h3xpb.Delivery{{Event: &h3xpb.EventPayload{Type: "a\x80"}}}},
		&h3xpb.EventsBatch{Events: []*h3xpb.Delivery{{Event: &h3xpb.EventPayload{Metadata: map[string]string{"\xfe": "v"}}}}},
		&h3xpb.EventsBatch{Events: []*h3xpb.Delivery{{Event: &h3xpb.EventPayload{Data: []byte("\xff is fine in bytes")}}}},
	} {
		checkWireEncoder(t, m)
	}
	// The decoders' seed payloads, decoded by proto (unknown fields kept).
	for name, seed := range wireDecoderSeeds(t) {
		for _, m := range []proto.Message{&h3xpb.EventsBatch{}, &h3xpb.SendEvent{}} {
			if proto.Unmarshal(seed.payload, m) == nil {
				t.Run(name, func(t *testing.T) { checkWireEncoder(t, m) })
			}
		}
	}
}

// FuzzWireEncoders checks the hand-written encoders against
// proto.Marshal on the messages proto.Unmarshal makes of arbitrary
// payloads (unknown fields included).
func FuzzWireEncoders(f *testing.F) {
	f.Fuzz(func(t *testing.T, pick byte, payload []byte) {
		var m proto.Message = &h3xpb.EventsBatch{}
		if pick%2 == 1 {
			m = &h3xpb.SendEvent{}
		}
		if proto.Unmarshal(payload, m) != nil {
			return
		}
		checkWireEncoder(t, m)
	})
}

// BenchmarkMarshalEventsBatch: a fetch's answer of 1,000 deliveries of
// 256-byte events, by proto.Marshal and by the hand-written encoder.
func BenchmarkMarshalEventsBatch(b *testing.B) {
	leases := make([]Lease, 1000)
	for i := range leases {
		leases[i] = Lease{Event: Event{ID: newUUIDv4(), Namespace: "bench", Type: "t", Data: make([]byte, 256)}, Attempt: 1}
	}
	batch := batchFromLeases(1, leases)
	buf := make([]byte, 0, 1<<20)
	b.Run("proto", func(b *testing.B) {
		for range b.N {
			buf, _ = proto.MarshalOptions{Deterministic: true}.MarshalAppend(buf[:0], batch)
		}
	})
	b.Run("hand-written", func(b *testing.B) {
		for range b.N {
			buf, _ = appendEventsBatch(buf[:0], batch)
		}
	})
}

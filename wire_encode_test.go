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
		&h3xpb.SendEvent{RequestId: 43, Events: []*h3xpb.EventPayload{{Id: "x"}}, OmitStored: true},
		&h3xpb.SendEvent{OmitStored: true},
		// Not valid UTF-8: refused, as proto.Marshal refuses it.
		&h3xpb.SendEvent{Events: []*h3xpb.EventPayload{{Id: "ok"}, {Namespace: "\xff"}}},
		&h3xpb.SendEvent{Events: []*h3xpb.EventPayload{{Metadata: map[string]string{"k": "\xc3"}}}},
		&h3xpb.EventsBatch{Events: []*h3xpb.Delivery{{Event: &h3xpb.EventPayload{Type: "a\x80"}}}},
		&h3xpb.EventsBatch{Events: []*h3xpb.Delivery{{Event: &h3xpb.EventPayload{Metadata: map[string]string{"\xfe": "v"}}}}},
		&h3xpb.EventsBatch{Events: []*h3xpb.Delivery{{Event: &h3xpb.EventPayload{Data: []byte("\xff is fine in bytes")}}}},
		// Acks and their answers.
		(*h3xpb.AckEvent)(nil),
		(*h3xpb.AckResult)(nil),
		&h3xpb.AckEvent{},
		&h3xpb.AckEvent{RequestId: 1 << 63, EventIds: []string{"a", "", long}, Attempts: []uint32{1, 0, 1<<32 - 1}, Namespaces: []string{"orders", "", "x"}},
		&h3xpb.AckEvent{EventIds: []string{"only ids"}},
		&h3xpb.AckEvent{Attempts: []uint32{0}}, // a packed field of one zero
		ackEventUnknown(),
		&h3xpb.AckEvent{EventIds: []string{"ok", "\xff"}},
		&h3xpb.AckEvent{EventIds: []string{"ok"}, Namespaces: []string{"\xc3"}},
		&h3xpb.AckResult{},
		&h3xpb.AckResult{RequestId: 7, Outcomes: []*h3xpb.SettleOutcome{
			{Id: "a", Status: h3xpb.SettleStatus_SETTLE_STATUS_OK}, {}, nil, {Id: long, Status: h3xpb.SettleStatus_SETTLE_STATUS_STALE},
			{Id: "neg", Status: h3xpb.SettleStatus(-1)}, // ten-byte varint, as proto writes a negative enum
			settleOutcomeUnknown(),
		}},
		&h3xpb.AckResult{Outcomes: []*h3xpb.SettleOutcome{{Id: "a\x80"}}},
		&h3xpb.AckEvent{EventIds: []string{"a"}, RequestId: 2, OmitOk: true},
		&h3xpb.AckResult{RequestId: 2, OkOmitted: 1 << 31, Outcomes: []*h3xpb.SettleOutcome{{Id: "b", Status: h3xpb.SettleStatus_SETTLE_STATUS_STALE}}},
		&h3xpb.AckResult{OkOmitted: 3},
	} {
		checkWireEncoder(t, m)
	}
	// The decoders' seed payloads, decoded by proto (unknown fields kept).
	for name, seed := range wireDecoderSeeds(t) {
		for _, m := range []proto.Message{&h3xpb.EventsBatch{}, &h3xpb.SendEvent{}, &h3xpb.AckEvent{}, &h3xpb.AckResult{}} {
			if proto.Unmarshal(seed.payload, m) == nil {
				t.Run(name, func(t *testing.T) { checkWireEncoder(t, m) })
			}
		}
	}
}

func ackEventUnknown() *h3xpb.AckEvent {
	m := &h3xpb.AckEvent{EventIds: []string{"u"}, RequestId: 2}
	m.ProtoReflect().SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 9, protowire.VarintType), 7))
	return m
}

func settleOutcomeUnknown() *h3xpb.SettleOutcome {
	o := &h3xpb.SettleOutcome{Id: "u", Status: h3xpb.SettleStatus_SETTLE_STATUS_UNKNOWN}
	o.ProtoReflect().SetUnknown(protowire.AppendString(protowire.AppendTag(nil, 20, protowire.BytesType), "x"))
	return o
}

// FuzzWireEncoders checks the hand-written encoders against
// proto.Marshal on the messages proto.Unmarshal makes of arbitrary
// payloads (unknown fields included).
func FuzzWireEncoders(f *testing.F) {
	f.Fuzz(func(t *testing.T, pick byte, payload []byte) {
		m := [...]func() proto.Message{
			func() proto.Message { return &h3xpb.EventsBatch{} },
			func() proto.Message { return &h3xpb.SendEvent{} },
			func() proto.Message { return &h3xpb.AckEvent{} },
			func() proto.Message { return &h3xpb.AckResult{} },
		}[pick%4]()
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

// BenchmarkMarshalAcks: an AckEvent of 256 deliveries and its AckResult,
// by proto.Marshal and by the hand-written encoders.
func BenchmarkMarshalAcks(b *testing.B) {
	ack := &h3xpb.AckEvent{RequestId: 1}
	res := &h3xpb.AckResult{RequestId: 1}
	for range 256 {
		id := newUUIDv4()
		ack.EventIds = append(ack.EventIds, id)
		ack.Attempts = append(ack.Attempts, 1)
		ack.Namespaces = append(ack.Namespaces, "bench")
		res.Outcomes = append(res.Outcomes, &h3xpb.SettleOutcome{Id: id, Status: h3xpb.SettleStatus_SETTLE_STATUS_OK})
	}
	buf := make([]byte, 0, 64<<10)
	for _, m := range []proto.Message{ack, res} {
		name := string(m.ProtoReflect().Descriptor().Name())
		b.Run(name+"/proto", func(b *testing.B) {
			for range b.N {
				buf, _ = proto.MarshalOptions{Deterministic: true}.MarshalAppend(buf[:0], m)
			}
		})
		b.Run(name+"/hand-written", func(b *testing.B) {
			for range b.N {
				buf, _, _ = marshalFast(buf[:0], m)
			}
		})
	}
}

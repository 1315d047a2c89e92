package h3x

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"testing"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// wireDecoded are the frame types with hand-written decoders (wire_decode.go),
// in the order FuzzWireDecoders' first argument picks them.
var wireDecoded = []FrameType{FrameSendEvent, FrameEventsBatch, FrameAckEvent, FrameAckResult, FrameSendResult}

// FuzzWireDecoders checks the hand-written decoders against proto.Unmarshal
// on arbitrary payloads: both fail, or both succeed with the same message
// (unknown fields aside, which the hand-written ones skip), down to nil
// against empty byte slices; and the message shares no memory with the
// payload, which the frame reader reuses for the next frame.
func FuzzWireDecoders(f *testing.F) {
	f.Fuzz(func(t *testing.T, pick byte, payload []byte) {
		checkWireDecoder(t, wireDecoded[int(pick)%len(wireDecoded)], payload)
	})
}

func checkWireDecoder(t *testing.T, ft FrameType, payload []byte) {
	t.Helper()
	want := newMessage(ft)
	wantErr := proto.Unmarshal(payload, want)

	buf := bytes.Clone(payload)
	got := newMessage(ft)
	ok, gotErr := unmarshalFast(buf, got)
	if !ok {
		t.Fatalf("%v has no hand-written decoder", ft)
	}
	if (wantErr == nil) != (gotErr == nil) {
		t.Fatalf("%v % x: proto.Unmarshal: %v; hand-written: %v", ft, payload, wantErr, gotErr)
	}
	if ft == FrameEventsBatch {
		checkDecodeDeliveries(t, payload, want.(*h3xpb.EventsBatch), wantErr)
	}
	if wantErr != nil {
		return
	}
	for i := range buf {
		buf[i] = 0xa5 // the reader's next frame
	}
	dropUnknown(want.ProtoReflect())
	if !proto.Equal(want, got) {
		t.Fatalf("%v % x decoded differently:\nproto.Unmarshal: %v\nhand-written:    %v", ft, payload, want, got)
	}
	if w, g := nilBytes(want.ProtoReflect()), nilBytes(got.ProtoReflect()); w != g {
		t.Fatalf("%v % x: nil byte slices differ: proto.Unmarshal %s, hand-written %s", ft, payload, w, g)
	}
	// Through unmarshalPayload, as the connections decode.
	m := newMessage(ft)
	if err := unmarshalPayload(ft, payload, m); err != nil || !proto.Equal(want, m) {
		t.Fatalf("unmarshalPayload(%v): %v, %v", ft, m, err)
	}
}

// checkDecodeDeliveries checks that decodeDeliveries fails where
// proto.Unmarshal fails, and otherwise gives the deliveries the client made
// of protobuf's message (deliveries), none sharing memory with the payload.
func checkDecodeDeliveries(t *testing.T, payload []byte, want *h3xpb.EventsBatch, wantErr error) {
	t.Helper()
	buf := bytes.Clone(payload)
	rid, ds, err := decodeDeliveries(buf)
	if (wantErr == nil) != (err == nil) {
		t.Fatalf("EventsBatch % x: proto.Unmarshal: %v; decodeDeliveries: %v", payload, wantErr, err)
	}
	if wantErr != nil {
		return
	}
	for i := range buf {
		buf[i] = 0xa5
	}
	if rid != want.GetRequestId() || len(ds) != len(want.GetEvents()) {
		t.Fatalf("EventsBatch % x: request %d and %d deliveries, want %d and %d", payload, rid, len(ds), want.GetRequestId(), len(want.GetEvents()))
	}
	for i, w := range want.GetEvents() {
		d := ds[i]
		we := eventFromWire(w.GetEvent())
		if len(we.Metadata) == 0 && len(d.Event.Metadata) == 0 {
			// protobuf makes the map before it checks the field's wire
			// type (field 7 as a varint: an empty map); proto.Equal, which
			// checkWireDecoder uses, does not tell nil from empty either.
			we.Metadata = d.Event.Metadata
		}
		if !reflect.DeepEqual(d.Event, we) || d.attempt != int(w.GetAttempt()) || !d.deadline.Equal(time.UnixMilli(w.GetLeaseDeadlineMs())) {
			t.Fatalf("EventsBatch % x: delivery %d is %+v (attempt %d, deadline %v); protobuf's %v", payload, i, d.Event, d.attempt, d.deadline, w)
		}
	}
}

// dropUnknown removes the unknown fields of m and of every message in it.
func dropUnknown(m protoreflect.Message) {
	m.SetUnknown(nil)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
		case fd.IsList() && fd.Message() != nil:
			for i := range v.List().Len() {
				dropUnknown(v.List().Get(i).Message())
			}
		case fd.Message() != nil:
			dropUnknown(v.Message())
		}
		return true
	})
}

// nilBytes lists, for every bytes field set in m and the messages in it,
// whether it is nil (proto.Equal does not tell nil from empty).
func nilBytes(m protoreflect.Message) string {
	var b bytes.Buffer
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
		case fd.IsList() && fd.Message() != nil:
			for i := range v.List().Len() {
				fmt.Fprintf(&b, "%s[%d]{%s}", fd.Name(), i, nilBytes(v.List().Get(i).Message()))
			}
		case fd.Message() != nil:
			fmt.Fprintf(&b, "%s{%s}", fd.Name(), nilBytes(v.Message()))
		case fd.Kind() == protoreflect.BytesKind:
			fmt.Fprintf(&b, "%s:%t ", fd.Name(), v.Bytes() == nil)
		}
		return true
	})
	return b.String()
}

// wireDecoderSeeds is FuzzWireDecoders' checked-in seed corpus: the golden
// messages, and encodings protobuf allows but a hand-written decoder could
// get wrong.
func wireDecoderSeeds(tb testing.TB) map[string]struct {
	pick    byte
	payload []byte
} {
	seeds := make(map[string]struct {
		pick    byte
		payload []byte
	})
	add := func(name string, ft FrameType, payload []byte) {
		for i, w := range wireDecoded {
			if w == ft {
				seeds[name] = struct {
					pick    byte
					payload []byte
				}{byte(i), payload}
				return
			}
		}
		tb.Fatalf("seed %s: %v has no hand-written decoder", name, ft)
	}
	enc := func(m proto.Message) []byte {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			tb.Fatal(err)
		}
		return b
	}
	for _, ft := range wireDecoded {
		add("golden-"+ft.String(), ft, enc(goldenMessages()[ft]))
	}
	ev := func(id, ns string, data []byte, md map[string]string) *h3xpb.EventPayload {
		return &h3xpb.EventPayload{Id: id, Namespace: ns, Type: "order.created", Message: "m", Data: data, Timestamp: 1700000000, Metadata: md}
	}
	batch := &h3xpb.EventsBatch{RequestId: 7}
	for i := range 5 {
		batch.Events = append(batch.Events, &h3xpb.Delivery{
			Event:   ev(fmt.Sprintf("id-%d", i), []string{"orders", "payments"}[i%2], []byte{byte(i)}, map[string]string{"service": "checkout", "n": fmt.Sprint(i)}),
			Attempt: uint32(i + 1), LeaseDeadlineMs: 1700000000123,
		})
	}
	add("batch-five", FrameEventsBatch, enc(batch))
	add("batch-empty-data", FrameEventsBatch, enc(&h3xpb.EventsBatch{Events: []*h3xpb.Delivery{{Event: ev("a", "n", nil, nil)}, {}}}))
	add("send-many", FrameSendEvent, enc(&h3xpb.SendEvent{RequestId: 1, Events: []*h3xpb.EventPayload{ev("", "a", []byte("x"), nil), ev("", "a", nil, map[string]string{"": ""}), ev("z", "b", []byte{}, nil)}}))

	tag := protowire.AppendTag
	str := func(b []byte, num protowire.Number, s string) []byte {
		return protowire.AppendString(tag(b, num, protowire.BytesType), s)
	}
	varint := func(b []byte, num protowire.Number, v uint64) []byte {
		return protowire.AppendVarint(tag(b, num, protowire.VarintType), v)
	}
	msg := func(b []byte, num protowire.Number, inner []byte) []byte {
		return protowire.AppendBytes(tag(b, num, protowire.BytesType), inner)
	}
	// A delivery whose event field occurs twice: the two merge.
	d := msg(nil, 1, str(str(nil, 1, "first"), 2, "ns"))
	d = msg(d, 1, str(msg(nil, 7, str(str(nil, 1, "k"), 2, "v")), 3, "type"))
	d = varint(d, 2, 3)
	add("batch-merged-event", FrameEventsBatch, msg(nil, 1, d))
	// Known fields with the wrong wire type are unknown fields.
	add("batch-wrong-wire-types", FrameEventsBatch, msg(varint(nil, 1, 5), 1, varint(str(nil, 2, "x"), 1, 9)))
	add("send-wrong-wire-types", FrameSendEvent, msg(str(nil, 1, "rid"), 2, varint(varint(str(nil, 6, "t"), 5, 1), 2, 1)))
	// Unknown fields of every wire type, groups included, at every level.
	unk := tag(nil, 90, protowire.Fixed32Type)
	unk = append(unk, 1, 2, 3, 4)
	unk = protowire.AppendFixed64(tag(unk, 91, protowire.Fixed64Type), 5)
	unk = append(tag(tag(unk, 92, protowire.StartGroupType), 1, protowire.VarintType), 1)
	unk = tag(unk, 92, protowire.EndGroupType)
	unk = str(unk, 93, "later")
	add("batch-unknown-fields", FrameEventsBatch, append(msg(unk, 1, append(msg(unk, 1, append(str(unk, 1, "id"), unk...)), unk...)), unk...))
	add("ack-unknown-fields", FrameAckEvent, append(str(unk, 1, "id"), unk...))
	// Map entries: missing key or value, repeated key, fields reversed.
	md := msg(nil, 7, str(nil, 2, "only-value"))
	md = msg(md, 7, str(nil, 1, "only-key"))
	md = msg(md, 7, str(str(nil, 2, "b"), 1, "k"))
	md = msg(md, 7, str(str(nil, 1, "k"), 2, "c"))
	md = msg(md, 7, nil)
	add("send-metadata-entries", FrameSendEvent, msg(nil, 2, md))
	// Attempts packed, unpacked and both; empty packed.
	a := str(str(nil, 1, "a"), 1, "b")
	a = protowire.AppendBytes(tag(a, 3, protowire.BytesType), protowire.AppendVarint(protowire.AppendVarint(nil, 1), 1<<33+2))
	a = varint(a, 3, 3)
	a = protowire.AppendBytes(tag(a, 3, protowire.BytesType), nil)
	a = str(str(a, 4, "orders"), 4, "orders")
	add("ack-packed-and-unpacked", FrameAckEvent, a)
	add("ack-result-statuses", FrameAckResult, msg(msg(msg(varint(nil, 1, 9), 2, varint(str(nil, 1, "x"), 2, 1)), 2, varint(nil, 2, 1<<40|3)), 2, nil))
	// Failures.
	add("bad-utf8-id", FrameEventsBatch, msg(nil, 1, msg(nil, 1, str(nil, 1, "\xff"))))
	add("bad-utf8-namespace", FrameSendEvent, msg(nil, 2, str(str(nil, 2, "ok"), 2, "\xc3")))
	add("bad-utf8-metadata", FrameSendEvent, msg(nil, 2, msg(nil, 7, str(nil, 1, "\xff"))))
	add("bad-utf8-ack-namespace", FrameAckEvent, str(nil, 4, "\xfe"))
	add("bad-utf8-outcome", FrameAckResult, msg(nil, 2, str(nil, 1, "\x80")))
	add("bad-utf8-publish-message", FrameSendResult, msg(nil, 2, str(str(nil, 1, "id"), 4, "\xff")))
	refused := str(varint(varint(varint(str(nil, 1, "id"), 2, 3), 3, 6), 5, 1<<32+250), 4, "rate limited")
	// Field 3 of SendEvent (a bool) and SendResult (a uint32): any nonzero
	// varint is true, a count beyond 32 bits keeps its low bits, the last
	// occurrence wins and a wrong wire type makes it unknown.
	add("send-omit-stored", FrameSendEvent, varint(varint(msg(varint(nil, 3, 0), 2, nil), 3, 1<<40), 1, 2))
	add("send-omit-stored-wrong-wire-type", FrameSendEvent, str(varint(nil, 3, 1), 3, "x"))
	add("send-result-stored-omitted", FrameSendResult, varint(msg(varint(varint(nil, 3, 9), 1, 5), 2, varint(str(nil, 1, "id"), 2, 2)), 3, 1<<32+7))
	add("send-result-stored-omitted-wrong-wire-type", FrameSendResult, str(varint(nil, 3, 4), 3, "x"))
	add("ack-omit-ok", FrameAckEvent, varint(str(varint(varint(nil, 5, 3), 2, 1), 1, "a"), 5, 0))
	add("ack-result-ok-omitted", FrameAckResult, varint(msg(varint(nil, 3, 1<<33+2), 2, varint(str(nil, 1, "x"), 2, 3)), 3, 5))
	add("ack-result-ok-omitted-wrong-wire-type", FrameAckResult, str(varint(nil, 3, 4), 3, "x"))
	add("send-result-refusals", FrameSendResult, msg(msg(msg(varint(nil, 1, 4), 2, refused), 2, refused), 2, varint(nil, 2, 1<<35|1)))
	add("truncated-nested", FrameEventsBatch, msg(nil, 1, []byte{0x0a, 0x05, 0x0a, 0x01}))
	add("truncated-packed", FrameAckEvent, protowire.AppendBytes(tag(nil, 3, protowire.BytesType), []byte{0x80}))
	add("field-zero-nested", FrameAckResult, msg(nil, 2, []byte{0x00, 0x01}))
	add("end-group-alone", FrameSendEvent, msg(nil, 2, tag(nil, 5, protowire.EndGroupType)))
	add("unterminated-group", FrameEventsBatch, tag(nil, 9, protowire.StartGroupType))
	// A field number above 2^29-1, which protowire.ConsumeTag takes (found
	// by the fuzzer).
	add("field-number-above-max", FrameSendEvent, protowire.AppendVarint(nil, uint64(protowire.MaxValidNumber+1)<<3))
	return seeds
}

func TestWireDecoderSeeds(t *testing.T) {
	for name, s := range wireDecoderSeeds(t) {
		t.Run(name, func(t *testing.T) {
			checkWireDecoder(t, wireDecoded[s.pick], s.payload)
		})
	}
}

// TestWireDecodersRefuseAsProtobuf: a payload the hand-written decoders
// refuse gives the error proto.Unmarshal's failure gives.
func TestWireDecodersRefuseAsProtobuf(t *testing.T) {
	for _, ft := range wireDecoded {
		_, err := decodeFrame(ft, []byte{0x0a, 0x05, 'a'})
		if !errors.Is(err, ErrMalformedPayload) || !errors.Is(err, ErrProtocolViolation) {
			t.Errorf("%v: %v", ft, err)
		}
	}
}

// TestWireDecodersShareNothing: a decoded event's fields are its own, so
// that keeping one event keeps neither the frame nor the other events.
func TestWireDecodersShareNothing(t *testing.T) {
	batch := &h3xpb.EventsBatch{}
	for i := range 3 {
		batch.Events = append(batch.Events, &h3xpb.Delivery{Event: &h3xpb.EventPayload{Id: fmt.Sprint(i), Namespace: "ns", Data: []byte("abc")}})
	}
	b, err := proto.Marshal(batch)
	if err != nil {
		t.Fatal(err)
	}
	var got h3xpb.EventsBatch
	if ok, err := unmarshalFast(b, &got); !ok || err != nil {
		t.Fatal(ok, err)
	}
	d0, d1 := got.Events[0].Event.Data, got.Events[1].Event.Data
	d0 = append(d0, 'x') // must not run into the next event's bytes
	d0[0] = 'z'
	if string(d1) != "abc" {
		t.Fatalf("events share their data: the next event's is now %q", d1)
	}
}

// BenchmarkDecodeEventsBatch decodes a fetch's answer of 1,000 deliveries of
// 256-byte events, as a consumer does, with proto.Unmarshal and with the
// hand-written decoder.
func BenchmarkDecodeEventsBatch(b *testing.B) {
	batch := &h3xpb.EventsBatch{RequestId: 1}
	for i := range 1000 {
		batch.Events = append(batch.Events, &h3xpb.Delivery{
			Event: &h3xpb.EventPayload{
				Id: fmt.Sprintf("0b7c1a4e-3f7d-4a7e-9b1c-%012d", i), Namespace: "orders", Type: "order.created",
				Message: "order placed", Data: bytes.Repeat([]byte("x"), 256), Timestamp: 1700000000,
				Metadata: map[string]string{"service": "checkout"},
			},
			Attempt: 1, LeaseDeadlineMs: 1700000030000,
		})
	}
	payload, err := proto.Marshal(batch)
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		decode func([]byte, *h3xpb.EventsBatch) error
	}{
		{"protobuf", func(p []byte, m *h3xpb.EventsBatch) error { return proto.Unmarshal(p, m) }},
		{"hand-written", func(p []byte, m *h3xpb.EventsBatch) error { _, err := unmarshalFast(p, m); return err }},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(payload)))
			for b.Loop() {
				var m h3xpb.EventsBatch
				if err := c.decode(payload, &m); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000, "ns/event")
		})
	}
}

// TestWireDecodersAllocateNoMoreThanProtobuf: on frames of many empty
// entries (the most messages per byte a peer can send) the hand-written
// decoders allocate no more than proto.Unmarshal does (finding 85: the
// EventsBatch decoder sized an event slab for deliveries without events,
// twice protobuf's allocation).
func TestWireDecodersAllocateNoMoreThanProtobuf(t *testing.T) {
	const size = 1 << 20
	for _, c := range []struct {
		ft    FrameType
		entry []byte
	}{
		{FrameEventsBatch, []byte{0x0a, 0x00}},             // empty deliveries
		{FrameEventsBatch, []byte{0x0a, 0x02, 0x0a, 0x00}}, // deliveries with an empty event
		{FrameSendEvent, []byte{0x12, 0x00}},
		{FrameAckEvent, []byte{0x0a, 0x00}},
		{FrameAckResult, []byte{0x12, 0x00}},
		{FrameSendResult, []byte{0x12, 0x00}},
	} {
		payload := bytes.Repeat(c.entry, size/len(c.entry))
		allocated := func(decode func(proto.Message) error) uint64 {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			if err := decode(newMessage(c.ft)); err != nil {
				t.Fatal(err)
			}
			runtime.ReadMemStats(&after)
			return after.TotalAlloc - before.TotalAlloc
		}
		pb := allocated(func(m proto.Message) error { return proto.Unmarshal(payload, m) })
		hw := allocated(func(m proto.Message) error { _, err := unmarshalFast(payload, m); return err })
		if hw > pb+pb/10 {
			t.Errorf("%v of % x × %d: hand-written decoder allocated %d KiB, protobuf %d KiB", c.ft, c.entry, size/len(c.entry), hw>>10, pb>>10)
		}
	}
}

// TestEchoedIDsShareOneCopy: the IDs of a SendResult or AckResult cost one
// allocation a frame, not one each, and decode to what protobuf gives.
func TestEchoedIDsShareOneCopy(t *testing.T) {
	sr := &h3xpb.SendResult{RequestId: 1}
	ar := &h3xpb.AckResult{RequestId: 1}
	for range 256 {
		id := newUUIDv4()
		sr.Outcomes = append(sr.Outcomes, &h3xpb.PublishOutcome{Id: id, Status: h3xpb.PublishStatus_PUBLISH_STATUS_STORED})
		ar.Outcomes = append(ar.Outcomes, &h3xpb.SettleOutcome{Id: id, Status: h3xpb.SettleStatus_SETTLE_STATUS_OK})
	}
	for _, m := range []proto.Message{sr, ar} {
		payload, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		got := m.ProtoReflect().New().Interface()
		if err := unmarshalPayload(FrameSendResult, payload, got); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(got, m) {
			t.Fatalf("%T decoded differently", m)
		}
		allocs := testing.AllocsPerRun(20, func() {
			if _, err := unmarshalFast(payload, got); err != nil {
				t.Fatal(err)
			}
		})
		// The outcomes' slab and pointers, and one copy of the frame: not
		// one string per ID.
		if allocs > 16 {
			t.Fatalf("%T of 256 IDs: %.0f allocations", m, allocs)
		}
	}
}

func TestEchoStringsOutsideThePayload(t *testing.T) {
	b := []byte("0123456789")
	e := echoStrings{b: b}
	first, _ := e.str(b[2:5])
	for _, tc := range []struct {
		sub  []byte
		want string
	}{
		{b[2:5], "234"},
		{b[7:], "789"},
		{[]byte("234"), "234"}, // not a slice of b: a copy
		{b[3:3], ""},
	} {
		got, err := e.str(tc.sub)
		if err != nil || got != tc.want {
			t.Fatalf("str(%q) = %q, %v", tc.sub, got, err)
		}
	}
	if _, err := e.str([]byte{0xff}); err == nil {
		t.Fatal("invalid UTF-8 accepted")
	}
	b[2] = 'x' // as the frame reader reuses its buffer: a string handed out is a copy's
	if first != "234" {
		t.Fatalf("after the payload changed: %q", first)
	}
}

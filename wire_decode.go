package h3x

import (
	"errors"
	"unicode/utf8"

	"github.com/h3x-io/h3x/proto/h3xpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// Hand-written decoders for the messages that carry events and
// settlements, the ones a busy connection decodes per event: SendEvent (the
// server, per publish), SendResult (the client, per publish), EventsBatch
// (the client, per delivery, decodes it straight into its deliveries with
// decodeDeliveries, wire_deliveries.go), AckEvent (the server, per ack) and
// AckResult (the client, per ack). They accept exactly what proto.Unmarshal accepts
// and give the same messages (unknown fields are skipped, not kept: nothing
// re-encodes a received message), a contract FuzzWireDecoders checks
// against proto.Unmarshal. What they save is protobuf's reflection-driven
// decoding and most of its allocations: a frame's messages of one type are
// allocated in slabs (chunks of up to 256), and the namespace, type,
// message and metadata strings that repeat from one event to the next are
// allocated once per frame. Every field of an event still gets memory of
// its own (no string or byte slice shares the frame's buffer, which the
// reader reuses, nor another event's), so that keeping one event keeps
// nothing else alive. The IDs an answer echoes (SendResult, AckResult),
// answers to the caller's own request, share one copy of the frame
// (echoStrings).

// errWire is any failure of the hand-written decoders; unmarshalPayload
// turns it into the error proto.Unmarshal's would have given.
var errWire = errors.New("h3x: malformed protobuf")

// unmarshalFast decodes payload into m if m is one of the messages with a
// hand-written decoder; ok is false for the others.
func unmarshalFast(payload []byte, m proto.Message) (ok bool, err error) {
	switch m := m.(type) {
	case *h3xpb.SendEvent:
		*m = h3xpb.SendEvent{}
		return true, decodeSendEvent(payload, m)
	case *h3xpb.EventsBatch:
		*m = h3xpb.EventsBatch{}
		return true, decodeEventsBatch(payload, m)
	case *h3xpb.AckEvent:
		*m = h3xpb.AckEvent{}
		return true, decodeAckEvent(payload, m)
	case *h3xpb.AckResult:
		*m = h3xpb.AckResult{}
		return true, decodeAckResult(payload, m)
	case *h3xpb.SendResult:
		*m = h3xpb.SendResult{}
		return true, decodeSendResult(payload, m)
	}
	return false, nil
}

// wireField is one field of a message being decoded: its number and wire
// type, and its value (a varint's in v, a length-delimited field's bytes in
// b; other wire types are only skipped).
type wireField struct {
	num protowire.Number
	typ protowire.Type
	v   uint64
	b   []byte
}

// consumeField reads the field at the start of b and returns it with its
// length in b, or a negative length if b does not start with a valid field.
// Fields of wire types other than varint and length-delimited (fixed-size
// ones, groups) are consumed whole, for the caller to skip as unknown.
// (The decoders keep their position in a local slice and take fields by
// value: no pointer writes, so no write barriers while the collector runs.)
func consumeField(b []byte) (wireField, int) {
	// The usual case first: a one-byte tag (fields 1 to 15), then a varint
	// (timestamps and deadlines take five and six bytes) or a length of
	// one or two bytes.
	if len(b) >= 2 && b[0] < 0x80 && b[0] >= 8 {
		f := wireField{num: protowire.Number(b[0] >> 3), typ: protowire.Type(b[0] & 7)}
		switch {
		case f.typ == protowire.VarintType && b[1] < 0x80:
			f.v = uint64(b[1])
			return f, 2
		case f.typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b[1:])
			if n < 0 {
				return wireField{}, -1
			}
			f.v = v
			return f, 1 + n
		case f.typ == protowire.BytesType && b[1] < 0x80:
			if end := 2 + int(b[1]); end <= len(b) {
				f.b = b[2:end]
				return f, end
			}
		case f.typ == protowire.BytesType && len(b) >= 3 && b[2] < 0x80:
			if end := 3 + (int(b[1]&0x7f) | int(b[2])<<7); end <= len(b) {
				f.b = b[3:end]
				return f, end
			}
		}
	}
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 || num > protowire.MaxValidNumber { // protowire allows up to 2^31-1
		return wireField{}, -1
	}
	f := wireField{num: num, typ: typ}
	var m int
	switch typ {
	case protowire.VarintType:
		f.v, m = protowire.ConsumeVarint(b[n:])
	case protowire.BytesType:
		f.b, m = protowire.ConsumeBytes(b[n:])
	default:
		m = protowire.ConsumeFieldValue(num, typ, b[n:])
	}
	if m < 0 {
		return wireField{}, -1
	}
	return f, n + m
}

// interner hands out the strings of a frame that repeat from one event to
// the next (namespaces, types, messages, metadata), allocating each distinct
// one once. It remembers a few, replacing the oldest.
type interner struct {
	s    [8]string
	next int
}

func (in *interner) str(b []byte) (string, error) {
	if len(b) == 0 {
		return "", nil
	}
	for _, s := range in.s {
		if s == string(b) { // compiled without a conversion
			return s, nil
		}
	}
	if !utf8.Valid(b) {
		return "", errWire
	}
	s := string(b)
	in.s[in.next] = s
	in.next = (in.next + 1) % len(in.s)
	return s, nil
}

// echoStrings hands out the IDs a SendResult or AckResult echoes as
// substrings of one copy of the frame's payload, made on first use: one
// allocation a frame instead of one an ID (the decoding of SendResult's
// IDs, which Publish does not even use, was a tenth of a publishing
// client's CPU).
type echoStrings struct {
	b     []byte // the payload that the fields' bytes are slices of
	whole string // a copy of b
}

// str returns sub, a slice of e.b, as a string, refusing invalid UTF-8.
func (e *echoStrings) str(sub []byte) (string, error) {
	if !utf8.Valid(sub) {
		return "", errWire
	}
	if len(sub) == 0 {
		return "", nil
	}
	// The decoders slice without limiting capacity, so sub's offset in b
	// follows from the capacities; the address check makes sure.
	off := cap(e.b) - cap(sub)
	if off < 0 || off+len(sub) > len(e.b) || &e.b[off] != &sub[0] {
		return string(sub), nil
	}
	if e.whole == "" {
		e.whole = string(e.b)
	}
	return e.whole[off : off+len(sub)], nil
}

// str returns b as a new string, refusing invalid UTF-8 (proto3 strings).
func str(b []byte) (string, error) {
	if !utf8.Valid(b) {
		return "", errWire
	}
	return string(b), nil
}

// forFields calls fn with each field of the encoded message b, in order.
func forFields(b []byte, fn func(f wireField) error) error {
	for len(b) > 0 {
		f, n := consumeField(b)
		if n < 0 {
			return errWire
		}
		b = b[n:]
		if err := fn(f); err != nil {
			return err
		}
	}
	return nil
}

// countFields returns how many fields numbered num of wire type typ the
// encoded message b holds at its top level (the first pass that sizes a
// frame's slabs; a malformed message stops the count, and the decoding pass
// reports it).
func countFields(b []byte, num protowire.Number, typ protowire.Type) int {
	count := 0
	for len(b) > 0 {
		f, n := consumeField(b)
		if n < 0 {
			break
		}
		b = b[n:]
		if f.num == num && f.typ == typ {
			count++
		}
	}
	return count
}

// slab hands out the messages of one type that a frame holds from a few
// allocations: chunks of up to slabChunk, for at most the number the frame
// was counted to hold (left), so that memory follows the messages found
// (a delivery need not carry an event, say).
type slab[T any] struct {
	buf  []T
	left int
}

const slabChunk = 256

func (s *slab[T]) next() *T {
	if len(s.buf) == cap(s.buf) {
		s.buf = make([]T, 0, min(max(s.left, 1), slabChunk))
	}
	s.left--
	s.buf = s.buf[:len(s.buf)+1]
	return &s.buf[len(s.buf)-1]
}

// repeated decodes the messages of a repeated message field: for each
// occurrence, a new element from a slab sized by count, decoded by decode.
// It returns nil if there were none, as protobuf does.
type repeated[T any] struct {
	slab slab[T]
	list []*T
}

func newRepeated[T any](count int) repeated[T] {
	return repeated[T]{slab: slab[T]{left: count}, list: make([]*T, 0, count)}
}

func (r *repeated[T]) add(b []byte, decode func([]byte, *T) error) error {
	m := r.slab.next()
	if err := decode(b, m); err != nil {
		return err
	}
	r.list = append(r.list, m)
	return nil
}

func (r *repeated[T]) result() []*T {
	if len(r.list) == 0 {
		return nil
	}
	return r.list
}

// decodeEventPayload merges the encoded EventPayload b into p (as protobuf
// does when a message field occurs more than once).
func decodeEventPayload(b []byte, p *h3xpb.EventPayload, in *interner) error {
	return forFields(b, func(f wireField) (err error) {
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			p.Id, err = str(f.b)
		case f.num == 2 && f.typ == protowire.BytesType:
			p.Namespace, err = in.str(f.b)
		case f.num == 3 && f.typ == protowire.BytesType:
			p.Type, err = in.str(f.b)
		case f.num == 4 && f.typ == protowire.BytesType:
			p.Message, err = in.str(f.b)
		case f.num == 5 && f.typ == protowire.BytesType:
			p.Data = append([]byte(nil), f.b...) // nil if empty, as protobuf
		case f.num == 6 && f.typ == protowire.VarintType:
			p.Timestamp = int64(f.v)
		case f.num == 7 && f.typ == protowire.BytesType:
			err = decodeMetadataEntry(f.b, p, in)
		}
		return err
	})
}

// decodeMetadataEntry adds one encoded map entry to p.Metadata: a missing
// key or value is "", and a later entry with the same key replaces it.
func decodeMetadataEntry(b []byte, p *h3xpb.EventPayload, in *interner) error {
	var k, v string
	err := forFields(b, func(f wireField) (err error) {
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			k, err = in.str(f.b)
		case f.num == 2 && f.typ == protowire.BytesType:
			v, err = in.str(f.b)
		}
		return err
	})
	if err != nil {
		return err
	}
	if p.Metadata == nil {
		p.Metadata = make(map[string]string, 1)
	}
	p.Metadata[k] = v
	return nil
}

// decodeListAnswer decodes the shape SendEvent, SendResult and AckResult
// share: a request id (field 1), a repeated message (field 2), whose
// elements decode decodes, and a varint field 3, stored in field3 (the
// last one, as protobuf keeps a scalar's last value).
func decodeListAnswer[T any](b []byte, requestID *uint64, decode func([]byte, *T) error, field3 *uint64) ([]*T, error) {
	list := newRepeated[T](countFields(b, 2, protowire.BytesType))
	err := forFields(b, func(f wireField) error {
		switch {
		case f.num == 1 && f.typ == protowire.VarintType:
			*requestID = f.v
		case f.num == 2 && f.typ == protowire.BytesType:
			return list.add(f.b, decode)
		case f.num == 3 && f.typ == protowire.VarintType:
			*field3 = f.v
		}
		return nil
	})
	return list.result(), err
}

func decodeSendEvent(b []byte, m *h3xpb.SendEvent) (err error) {
	var in interner
	var omitStored uint64
	m.Events, err = decodeListAnswer(b, &m.RequestId, func(b []byte, p *h3xpb.EventPayload) error { return decodeEventPayload(b, p, &in) }, &omitStored)
	m.OmitStored = omitStored != 0
	return err
}

func decodeEventsBatch(b []byte, m *h3xpb.EventsBatch) error {
	n := countFields(b, 1, protowire.BytesType)
	deliveries := newRepeated[h3xpb.Delivery](n)
	payloads := slab[h3xpb.EventPayload]{left: n}
	var in interner
	decode := func(b []byte, d *h3xpb.Delivery) (err error) {
		d.Attempt, d.LeaseDeadlineMs, err = decodeDeliveryFields(b, func() *h3xpb.EventPayload {
			if d.Event == nil {
				d.Event = payloads.next()
			}
			return d.Event
		}, &in)
		return err
	}
	err := forFields(b, func(f wireField) error {
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			return deliveries.add(f.b, decode)
		case f.num == 2 && f.typ == protowire.VarintType:
			m.RequestId = f.v
		}
		return nil
	})
	m.Events = deliveries.result()
	return err
}

// decodeDeliveryFields decodes an encoded Delivery: each occurrence of its
// event is merged into the payload event returns (as protobuf merges a
// message field that occurs twice); it returns the attempt and the lease
// deadline. decodeEventsBatch and decodeDeliveries share it.
func decodeDeliveryFields(b []byte, event func() *h3xpb.EventPayload, in *interner) (attempt uint32, deadlineMs int64, err error) {
	for len(b) > 0 { // a loop of its own: forFields' callback cost 8% here
		f, n := consumeField(b)
		if n < 0 {
			return 0, 0, errWire
		}
		b = b[n:]
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			if err := decodeEventPayload(f.b, event(), in); err != nil {
				return 0, 0, err
			}
		case f.num == 2 && f.typ == protowire.VarintType:
			attempt = uint32(f.v)
		case f.num == 3 && f.typ == protowire.VarintType:
			deadlineMs = int64(f.v)
		}
	}
	return attempt, deadlineMs, nil
}

// appendPackedUint32 appends the uint32 values of a packed repeated field.
func appendPackedUint32(dst []uint32, b []byte) ([]uint32, error) {
	for len(b) > 0 {
		v, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return dst, errWire
		}
		dst = append(dst, uint32(v))
		b = b[n:]
	}
	return dst, nil
}

func decodeAckEvent(b []byte, m *h3xpb.AckEvent) error {
	m.EventIds = make([]string, 0, countFields(b, 1, protowire.BytesType))
	var in interner
	err := forFields(b, func(f wireField) (err error) {
		var s string
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			if s, err = str(f.b); err == nil {
				m.EventIds = append(m.EventIds, s)
			}
		case f.num == 2 && f.typ == protowire.VarintType:
			m.RequestId = f.v
		case f.num == 3 && f.typ == protowire.VarintType:
			m.Attempts = append(m.Attempts, uint32(f.v))
		case f.num == 3 && f.typ == protowire.BytesType:
			m.Attempts, err = appendPackedUint32(m.Attempts, f.b)
		case f.num == 4 && f.typ == protowire.BytesType:
			if s, err = in.str(f.b); err == nil {
				if m.Namespaces == nil { // one per event ID, if any
					m.Namespaces = make([]string, 0, cap(m.EventIds))
				}
				m.Namespaces = append(m.Namespaces, s)
			}
		case f.num == 5 && f.typ == protowire.VarintType:
			m.OmitOk = f.v != 0
		}
		return err
	})
	if len(m.EventIds) == 0 {
		m.EventIds = nil
	}
	return err
}

func decodeAckResult(b []byte, m *h3xpb.AckResult) (err error) {
	ids := echoStrings{b: b}
	var omitted uint64
	m.Outcomes, err = decodeListAnswer(b, &m.RequestId, func(b []byte, o *h3xpb.SettleOutcome) error {
		return forFields(b, func(f wireField) (err error) {
			switch {
			case f.num == 1 && f.typ == protowire.BytesType:
				o.Id, err = ids.str(f.b)
			case f.num == 2 && f.typ == protowire.VarintType:
				o.Status = h3xpb.SettleStatus(int32(f.v))
			}
			return err
		})
	}, &omitted)
	m.OkOmitted = uint32(omitted)
	return err
}

func decodeSendResult(b []byte, m *h3xpb.SendResult) (err error) {
	var in interner
	ids := echoStrings{b: b}
	var omitted uint64
	m.Outcomes, err = decodeListAnswer(b, &m.RequestId, func(b []byte, o *h3xpb.PublishOutcome) error {
		return forFields(b, func(f wireField) (err error) {
			switch {
			case f.num == 1 && f.typ == protowire.BytesType:
				o.Id, err = ids.str(f.b)
			case f.num == 2 && f.typ == protowire.VarintType:
				o.Status = h3xpb.PublishStatus(int32(f.v))
			case f.num == 3 && f.typ == protowire.VarintType:
				o.Code = h3xpb.ErrorCode(int32(f.v))
			case f.num == 4 && f.typ == protowire.BytesType:
				o.Message, err = in.str(f.b) // refusals repeat their message
			case f.num == 5 && f.typ == protowire.VarintType:
				o.RetryAfterMs = uint32(f.v)
			}
			return err
		})
	}, &omitted)
	m.StoredOmitted = uint32(omitted)
	return err
}

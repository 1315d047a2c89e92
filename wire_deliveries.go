package h3x

import (
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
	"google.golang.org/protobuf/encoding/protowire"
)

// decodeDeliveries decodes an EventsBatch payload straight into the
// client's deliveries: what decodeEventsBatch gives, each message converted
// (the same fields, the same refusals), without the protobuf messages in
// between: a consumer allocated a Delivery and an EventPayload message
// for every event only to copy them into its own Delivery. Each event is
// decoded into one reused EventPayload, so its strings, data and metadata
// are still its own. It returns the batch's request id.
func decodeDeliveries(b []byte) (uint64, []*Delivery, error) {
	var rid uint64
	var out []*Delivery
	if n := countFields(b, 1, protowire.BytesType); n > 0 {
		out = make([]*Delivery, 0, n)
	}
	var in interner
	var p h3xpb.EventPayload
	for len(b) > 0 {
		f, n := consumeField(b)
		if n < 0 {
			return 0, nil, errWire
		}
		b = b[n:]
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			d, err := decodeDelivery(f.b, &p, &in)
			if err != nil {
				return 0, nil, err
			}
			out = append(out, d)
		case f.num == 2 && f.typ == protowire.VarintType:
			rid = f.v
		}
	}
	return rid, out, nil
}

// decodeDelivery decodes one encoded Delivery, its event through p.
func decodeDelivery(b []byte, p *h3xpb.EventPayload, in *interner) (*Delivery, error) {
	*p = h3xpb.EventPayload{}
	attempt, deadline, err := decodeDeliveryFields(b, func() *h3xpb.EventPayload { return p }, in)
	if err != nil {
		return nil, err
	}
	return &Delivery{Event: eventFromWire(p), attempt: int(attempt), deadline: time.UnixMilli(deadline)}, nil
}

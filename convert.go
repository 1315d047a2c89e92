package h3x

import (
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// eventsToWire converts events into their wire messages, allocated in one
// slab.
func eventsToWire(events []Event) []*h3xpb.EventPayload {
	slab := make([]h3xpb.EventPayload, len(events))
	wire := make([]*h3xpb.EventPayload, len(events))
	for i := range events {
		eventIntoWire(&events[i], &slab[i])
		wire[i] = &slab[i]
	}
	return wire
}

// eventIntoWire sets p, a zero wire message, to e.
func eventIntoWire(e *Event, p *h3xpb.EventPayload) {
	if !e.Time.IsZero() {
		p.Timestamp = e.Time.Unix()
	}
	p.Id, p.Namespace, p.Type, p.Message = e.ID, e.Namespace, e.Type, e.Message
	p.Data, p.Metadata = e.Data, e.Metadata
}

// eventFromWire converts a wire message into an Event.
func eventFromWire(p *h3xpb.EventPayload) Event {
	var t time.Time
	if p.GetTimestamp() != 0 {
		t = time.Unix(p.GetTimestamp(), 0).UTC()
	}
	return Event{
		ID:        p.GetId(),
		Namespace: p.GetNamespace(),
		Type:      p.GetType(),
		Message:   p.GetMessage(),
		Data:      p.GetData(),
		Time:      t,
		Metadata:  p.GetMetadata(),
	}
}

func unixMs(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

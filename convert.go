package h3x

import (
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// eventToWire converts an Event into its wire message.
func eventToWire(e *Event) *h3xpb.EventPayload {
	var ts int64
	if !e.Time.IsZero() {
		ts = e.Time.Unix()
	}
	return &h3xpb.EventPayload{
		Id:        e.ID,
		Namespace: e.Namespace,
		Type:      e.Type,
		Message:   e.Message,
		Data:      e.Data,
		Timestamp: ts,
		Metadata:  e.Metadata,
	}
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

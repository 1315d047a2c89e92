package h3x

import "testing"

// BenchmarkAssignIDs: the client's IDs for a 256-event publish without IDs.
func BenchmarkAssignIDs(b *testing.B) {
	events := make([]Event, 256)
	b.ReportAllocs()
	for b.Loop() {
		for i := range events {
			events[i].ID = ""
		}
		assignIDs(events)
	}
}

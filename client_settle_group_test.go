package h3x

import (
	"fmt"
	"slices"
	"testing"
	"time"
)

func TestGroupSettlements(t *testing.T) {
	ds := make([]*Delivery, 8)
	for i := range ds {
		ds[i] = &Delivery{Event: Event{ID: fmt.Sprint(i)}}
	}
	ack := func(i int) settleOp { return settleOp{kind: FrameAckEvent, d: ds[i]} }
	nack := func(i int, delay time.Duration) settleOp {
		return settleOp{kind: FrameNackEvent, delay: delay, d: ds[i]}
	}
	ext := func(i int) settleOp { return settleOp{kind: FrameExtendLease, delay: time.Second, d: ds[i]} }
	ids := func(g settleBatch) []string {
		var out []string
		for _, d := range g.ds {
			out = append(out, d.Event.ID)
		}
		return out
	}
	tests := []struct {
		name string
		ops  []settleOp
		want []string // each group: kind, delay, ids
	}{
		{"none", nil, nil},
		{"acks", []settleOp{ack(0), ack(1), ack(2)}, []string{"AckEvent 0s [0 1 2]"}},
		{"interleaved, in order of first appearance", []settleOp{nack(0, time.Second), ack(1), nack(2, time.Second), ack(3), nack(4, 0), ext(5), ack(6)},
			[]string{"NackEvent 1s [0 2]", "AckEvent 0s [1 3 6]", "NackEvent 0s [4]", "ExtendLease 1s [5]"}},
		{"same kind, other delays", []settleOp{nack(0, 1), nack(1, 2), nack(2, 1), nack(3, 2), nack(4, 3)},
			[]string{"NackEvent 1ns [0 2]", "NackEvent 2ns [1 3]", "NackEvent 3ns [4]"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, g := range groupSettlements(tt.ops) {
				got = append(got, fmt.Sprintf("%v %v %v", g.k.t, g.k.delay, ids(g)))
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got %q\nwant %q", got, tt.want)
			}
		})
	}
}

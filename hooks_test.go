package h3x

import (
	"fmt"
	"slices"
	"testing"
)

// settleRecorder records Settled and SettledIn calls.
type settleRecorder struct {
	NopHooks
	calls []string
}

func (r *settleRecorder) Settled(t FrameType, ok, refused int) {
	r.calls = append(r.calls, fmt.Sprintf("Settled(%v, %d, %d)", t, ok, refused))
}

func (r *settleRecorder) SettledIn(namespace string, t FrameType, n int) {
	r.calls = append(r.calls, fmt.Sprintf("SettledIn(%q, %v, %d)", namespace, t, n))
}

// totalsOnly implements Hooks without SettledInHooks.
type totalsOnly struct {
	NopHooks
	calls []string
}

func (r *totalsOnly) Settled(t FrameType, ok, refused int) {
	r.calls = append(r.calls, fmt.Sprintf("Settled(%v, %d, %d)", t, ok, refused))
}

// TestReportSettled checks that a settle request reaches Settled with its
// totals, and a SettledInHooks with its applied settlements per namespace
// run (refused ones left out, "" for refs without a namespace).
func TestReportSettled(t *testing.T) {
	refs := []LeaseRef{
		{ID: "1", Namespace: "orders"},
		{ID: "2", Namespace: "orders"},
		{ID: "3", Namespace: "audit"}, // refused
		{ID: "4", Namespace: "audit"},
		{ID: "5"},
		{ID: "6", Namespace: "orders"},
	}
	results := []SettleResult{
		{ID: "1", Status: SettleOK},
		{ID: "2", Status: SettleOK},
		{ID: "3", Status: SettleStale},
		{ID: "4", Status: SettleOK},
		{ID: "5", Status: SettleOK},
		{ID: "6", Status: SettleOK},
	}
	r := &settleRecorder{}
	reportSettled(r, FrameAckEvent, refs, results, 5, 2) // one more refused: denied before the queue
	want := []string{
		fmt.Sprintf("Settled(%v, 5, 2)", FrameAckEvent),
		fmt.Sprintf(`SettledIn("orders", %v, 2)`, FrameAckEvent),
		fmt.Sprintf(`SettledIn("audit", %v, 1)`, FrameAckEvent),
		fmt.Sprintf(`SettledIn("", %v, 1)`, FrameAckEvent),
		fmt.Sprintf(`SettledIn("orders", %v, 1)`, FrameAckEvent),
	}
	if !slices.Equal(r.calls, want) {
		t.Errorf("calls:\n%q\nwant:\n%q", r.calls, want)
	}

	// Nothing applied: no SettledIn.
	r = &settleRecorder{}
	reportSettled(r, FrameNackEvent, refs[2:3], results[2:3], 0, 1)
	if want := []string{fmt.Sprintf("Settled(%v, 0, 1)", FrameNackEvent)}; !slices.Equal(r.calls, want) {
		t.Errorf("calls %q, want %q", r.calls, want)
	}

	// A Hooks without SettledIn gets the totals as before.
	o := &totalsOnly{}
	reportSettled(o, FrameExtendLease, refs, results, 5, 1)
	if want := []string{fmt.Sprintf("Settled(%v, 5, 1)", FrameExtendLease)}; !slices.Equal(o.calls, want) {
		t.Errorf("calls %q, want %q", o.calls, want)
	}
}

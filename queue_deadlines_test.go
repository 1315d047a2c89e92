package h3x

import (
	"math/rand/v2"
	"testing"
)

// TestDeadlinesMatchAHeap drives the timers' FIFO-and-heap with random
// pushes (mostly in order, as leases come), removals at any place, fixes
// and pops of the first entry, against a plain heap of the same order.
func TestDeadlinesMatchAHeap(t *testing.T) {
	usedFIFO, usedHeap := false, false
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, 7))
		var d deadlines
		d.heap.byWhen = true
		ref := &entryHeap{byWhen: true}
		refIdx := map[*qentry]*qentry{} // entry in d -> its twin in ref
		var in []*qentry                // entries in d
		var seq uint64
		now := int64(1000)
		steps := 2000 + rng.IntN(3000)
		for step := range steps {
			switch op := rng.IntN(10); {
			case op < 5: // push: a lease (in order), sometimes out of order
				seq++
				now += int64(rng.IntN(3))
				when := now + 100
				if rng.IntN(8) == 0 {
					when = now + int64(rng.IntN(100)) // a nack's delay, a shorter deadline
				}
				e := &qentry{seq: seq, when: when, idx: -1}
				twin := &qentry{seq: seq, when: when, idx: -1}
				d.push(e)
				ref.push(twin)
				refIdx[e] = twin
				in = append(in, e)
			case op < 8 && len(in) > 0: // remove one, at any place (an ack)
				i := rng.IntN(len(in))
				if rng.IntN(2) == 0 {
					i = min(i, rng.IntN(4)) // mostly the oldest, as acks come
				}
				e := in[i]
				in = append(in[:i], in[i+1:]...)
				d.remove(e)
				ref.remove(refIdx[e])
				delete(refIdx, e)
				if e.idx != -1 {
					t.Fatalf("seed %d step %d: removed entry keeps idx %d", seed, step, e.idx)
				}
			case op < 9 && len(in) > 0: // fix: an extension
				e := in[rng.IntN(len(in))]
				e.when = now + int64(rng.IntN(300))
				refIdx[e].when = e.when
				d.fix(e)
				ref.fix(refIdx[e])
			case len(in) > 0: // pop what has expired, as advance does
				for d.len() > 0 && d.min().when <= now+50 {
					e := d.min()
					if got, want := refIdx[e], ref.min(); got != want {
						t.Fatalf("seed %d step %d: min is (%d, %d), want (%d, %d)", seed, step, e.when, e.seq, want.when, want.seq)
					}
					d.remove(e)
					ref.remove(refIdx[e])
					delete(refIdx, e)
					for i, x := range in {
						if x == e {
							in = append(in[:i], in[i+1:]...)
							break
						}
					}
				}
			}
			if d.len() != ref.len() || d.len() != len(in) {
				t.Fatalf("seed %d step %d: len %d, heap %d, entries %d", seed, step, d.len(), ref.len(), len(in))
			}
			if d.len() > 0 && refIdx[d.min()] != ref.min() {
				t.Fatalf("seed %d step %d: min differs", seed, step)
			}
			usedFIFO = usedFIFO || d.live > 40
			usedHeap = usedHeap || d.heap.len() > 5
			if d.live > 0 && d.fifo[0] == nil {
				t.Fatalf("seed %d step %d: the FIFO starts with a removed entry", seed, step)
			}
			if len(d.fifo)-d.live > d.live+32 {
				t.Fatalf("seed %d step %d: %d slots for %d entries", seed, step, len(d.fifo), d.live)
			}
		}
	}
	if !usedFIFO || !usedHeap {
		t.Fatalf("not both halves exercised: FIFO %v, heap %v", usedFIFO, usedHeap)
	}
}

// TestDeadlinesRenumber: positions start again from 0 before they pass
// maxFIFOPosition, and entries stay removable.
func TestDeadlinesRenumber(t *testing.T) {
	var d deadlines
	d.heap.byWhen = true
	d.base = maxFIFOPosition - 3
	var es []*qentry
	for i := range 6 {
		e := &qentry{seq: uint64(i + 1), when: int64(i), idx: -1}
		d.push(e)
		es = append(es, e)
	}
	for _, e := range es {
		if -2-e.idx >= maxFIFOPosition || e.idx >= 0 {
			t.Fatalf("entry %d at position %d", e.seq, -2-e.idx)
		}
	}
	for _, i := range []int{3, 0, 5, 1, 4, 2} {
		d.remove(es[i])
		es[i] = nil
		if f := firstLive(es); f >= 0 && d.min() != es[f] {
			t.Fatalf("after removing %d: min is %d, want %d", i, d.min().seq, es[f].seq)
		}
	}
	if d.len() != 0 {
		t.Fatalf("len %d after removing all", d.len())
	}
}

func firstLive(es []*qentry) int {
	for i, e := range es {
		if e != nil {
			return i
		}
	}
	return -1
}

// TestDeadlinesLetGoOfAPeak: once most entries of a large FIFO are gone,
// its array is replaced by a small one (it held 8 bytes per entry of the
// peak).
func TestDeadlinesLetGoOfAPeak(t *testing.T) {
	var d deadlines
	d.heap.byWhen = true
	const n = 100000
	es := make([]*qentry, n)
	for i := range es {
		es[i] = &qentry{seq: uint64(i + 1), when: int64(i), idx: -1}
		d.push(es[i])
	}
	for _, e := range es[:n-1] {
		d.remove(e)
	}
	if d.len() != 1 || d.min() != es[n-1] {
		t.Fatalf("len %d, min %v", d.len(), d.min())
	}
	if cap(d.fifo) > 1024 {
		t.Fatalf("one entry left in a FIFO of capacity %d", cap(d.fifo))
	}
}

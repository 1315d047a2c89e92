package h3x

import (
	"bytes"
	"testing"
)

// FuzzStorageDecoders feeds arbitrary bytes to every decoder of the Badger
// queue's stored records (events, chunks, lease records, dedup keys, dead
// letter markers, chunk pointers, chunk keys and segment records): none
// may panic, and what decodes re-encodes to a value that decodes the same.
//
//	go test -run '^$' -fuzz FuzzStorageDecoders -fuzztime 1m .
func FuzzStorageDecoders(f *testing.F) {
	ev := Event{ID: "0b6f7c2e-4a51-4f0e-9d43-7a1c2b3d4e5f", Type: "order.created", Message: "m", Data: []byte(`{"a":1}`), Metadata: map[string]string{"k": "v"}}
	val := encodeEvent(nil, &ev, 42)
	f.Add(val, uint64(7))
	f.Add(encodeChunk(nil, []uint64{7, 8, 12}, [][]byte{val, val, val}), uint64(7))
	f.Add(encodeLeaseRec([]recEntry{{ns: "n", seq: 3, id: ev.ID, size: 256, enq: 42, attempt: 2}, {ns: "n", seq: 1, attempt: 3}, {ns: "m", seq: 9, attempt: 1}}), uint64(0))
	f.Add(encodeLeaseRecFormat3([]recEntry{{ns: "n", seq: 3, id: ev.ID, size: 256, enq: 42, attempt: 2}}), uint64(0))
	for _, k := range groupKeys(9, 42, []string{ev.ID, "custom-id"}) {
		f.Add(k, uint64(9))
	}
	f.Add(encodeSegPtr(nil, segLoc{seg: 3, off: 1 << 20, n: 4096, crc: 0xc0ffee}), uint64(0))
	f.Add(seqKey(keyEvent, "orders", 7), uint64(7))
	rec := appendRecordHeader(nil, "orders", 7)
	at := len(rec)
	rec = encodeChunk(rec, []uint64{7}, [][]byte{val})
	setRecordLen(rec, at)
	f.Add(rec, uint64(7))
	compact := encodeLeaseRec([]recEntry{{ns: "n", seq: 3, attempt: 2}, {ns: "m", seq: 9, attempt: 1}})
	f.Add(appendJournalFrame(appendJournalFrame(nil, 12, compact), 1<<40, compact), uint64(0))
	f.Add([]byte{}, uint64(0))
	f.Fuzz(func(t *testing.T, b []byte, first uint64) {
		if ev, enq, err := decodeEvent(b); err == nil {
			again, enq2, err := decodeEvent(encodeEvent(nil, &ev, enq))
			if err != nil || enq2 != enq || again.ID != ev.ID || !bytes.Equal(again.Data, ev.Data) || len(again.Metadata) != len(ev.Metadata) {
				t.Fatalf("event does not round-trip: %+v / %+v, %v", ev, again, err)
			}
			ev.Namespace = "n"
			if n, err := storedSize(encodeEvent(nil, &ev, enq), "n"); err != nil || n != ev.size() {
				t.Fatalf("storedSize %d, %v; want %d", n, err, ev.size())
			}
		}
		storedSize(b, "n") // never panics
		if seqs, err := chunkSeqs(b, first); err == nil {
			for _, seq := range seqs {
				if _, err := chunkEvent(b, first, seq); err != nil {
					t.Fatalf("event %d listed but not found: %v", seq, err)
				}
			}
			ch := newStoredChunk(nil, first, seqs, b, seqs[:len(seqs)/2])
			if ch.live < 0 || ch.live > len(seqs) {
				t.Fatalf("live %d of %d", ch.live, len(seqs))
			}
		}
		if recs, err := decodeLeaseRec(b); err == nil {
			again, err := decodeLeaseRec(encodeLeaseRec(recs))
			if err != nil || len(again) != len(recs) {
				t.Fatalf("lease record does not round-trip: %v", err)
			}
			for i, r := range recs {
				if a := again[i]; a.ns != r.ns || a.seq != r.seq || a.attempt != r.attempt {
					t.Fatalf("lease record entry %d: %+v, then %+v", i, r, a)
				}
			}
		}
		decodeGroupKey(b)
		if l, err := decodeSegPtr(b); err == nil {
			if again, err := decodeSegPtr(encodeSegPtr(nil, l)); err != nil || again != l {
				t.Fatalf("chunk pointer does not round-trip: %+v / %+v, %v", l, again, err)
			}
		}
		if id, at, n, need, bad := parseRecord(b); !bad && need == 0 {
			if at+n > len(b) || n <= 0 {
				t.Fatalf("segment record at %d, %d bytes, in %d", at, n, len(b))
			}
			again := appendRecordHeader(nil, id.ns, id.first)
			again = append(again, b[at:at+n]...)
			setRecordLen(again, len(again)-n)
			if string(again) != string(b[:at+n]) {
				t.Fatalf("segment record does not round-trip: %q / %q", b[:at+n], again)
			}
		}
		if ns, seq, ok := decodeSeqKey(b, keyEvent); ok {
			if again := seqKey(keyEvent, ns, seq); string(again) != string(b) {
				t.Fatalf("chunk key does not round-trip: %q / %q", b, again)
			}
		}
		if ns, f, seq, ok := decodeMovedKey(b); ok {
			if again := movedKey(nil, ns, f, seq); string(again) != string(b) {
				t.Fatalf("moved key does not round-trip: %q / %q", b, again)
			}
		}
		if recs, good, err := decodeJournal(b); good > len(b) || (err == nil) != (good == len(b)) {
			t.Fatalf("journal: %d records, %d good bytes of %d, %v", len(recs), good, len(b), err)
		} else {
			var again []byte
			for _, r := range recs {
				again = appendJournalFrame(again, r.seq, r.rec)
			}
			if string(again) != string(b[:good]) {
				t.Fatalf("journal frames do not round-trip: %q / %q", b[:good], again)
			}
		}
	})
}

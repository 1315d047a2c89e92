package h3x

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dgraph-io/badger/v4"
)

// TestBadgerFsyncSmallGroupsStoredInBadger: with DurabilityFsync, a group
// whose chunks encode to fewer than fsyncInlineBytes is stored in Badger
// itself, so that its sync round is Badger's log alone: no segment file is
// written or synced for it. A larger group goes to a segment, and so does
// every group without DurabilityFsync (nothing is synced per round there).
// The events read back intact in each case, also after a reopen, and
// acking them leaves nothing stored.
func TestBadgerFsyncSmallGroupsStoredInBadger(t *testing.T) {
	large := fsyncInlineBytes / 100 // enough 200-byte events to be well over the limit
	tests := []struct {
		name         string
		durability   Durability
		events, size int
		inPlace      bool // stored in Badger, not in a segment
	}{
		{"fsync/small", DurabilityFsync, 5, 100, true}, // a chunk of about 0.7 KiB
		{"fsync/large", DurabilityFsync, large, 200, false},
		{"nosync/small", DurabilityNoSync, 5, 100, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			syncs := trackSegmentSyncs(t)
			dir := t.TempDir()
			opts := QueueOptions{Durability: tc.durability}
			q := openTestBadger(t, dir, opts)
			evs := segTestEvents("n", tc.events, tc.size)
			publishTest(t, q, evs...)
			checkLeased(t, leaseAll(t, q, "h", tc.events, "n"), evs)
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			files := segmentFiles(t, dir)
			ptrs, inPlace := storedPointers(t, dir, "n")
			syncs.mu.Lock()
			segSyncs := len(syncs.synced) // segments synced
			syncs.mu.Unlock()
			if tc.inPlace {
				if ptrs != 0 || inPlace != 1 || len(files) != 0 || segSyncs != 0 {
					t.Errorf("%d pointers, %d chunks in place, segment files %v, %d segments synced; want the chunk in place and no segment written or synced",
						ptrs, inPlace, files, segSyncs)
				}
			} else if ptrs == 0 || inPlace != 0 || len(files) == 0 {
				t.Errorf("%d pointers, %d chunks in place, segment files %v; want the chunks in a segment", ptrs, inPlace, files)
			}
			if tc.durability == DurabilityFsync && !tc.inPlace && segSyncs == 0 {
				t.Error("the segment was never synced")
			}

			// Reopened: the events are there to lease again (their leases
			// ended with the queue), and acked they are gone.
			q = openTestBadger(t, dir, opts)
			ls := leaseAll(t, q, "h", tc.events, "n")
			checkLeased(t, ls, evs)
			ackAll(t, q, "h", ls)
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			if n := storedKeys(t, dir, keyEvent, "n"); n != 0 {
				t.Errorf("%d chunks of n still stored after acking them all", n)
			}
		})
	}
}

// TestBadgerFsyncInlineLimit: the limit is on a group's encoded chunks,
// from either side of it.
func TestBadgerFsyncInlineLimit(t *testing.T) {
	for _, limit := range []int{0, 1 << 10, 1 << 20} {
		t.Run(fmt.Sprint(limit), func(t *testing.T) {
			withInlineBytes(t, limit)
			dir := t.TempDir()
			q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityFsync})
			evs := segTestEvents("n", 10, 200) // about 2.5 KiB encoded
			publishTest(t, q, evs...)
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			ptrs, inPlace := storedPointers(t, dir, "n")
			if wantInPlace := limit > 4<<10; (inPlace == 1) != wantInPlace || ptrs+inPlace != 1 {
				t.Errorf("limit %d: %d pointers, %d in place; want in place: %v", limit, ptrs, inPlace, wantInPlace)
			}
			if _, err := os.Stat(filepath.Join(dir, segmentsDir)); limit > 4<<10 && err == nil {
				if files := segmentFiles(t, dir); len(files) != 0 {
					t.Errorf("segment files %v for a group stored in place", files)
				}
			}
		})
	}
}

// TestBadgerFsyncInlineSmallMemtable: with a small MemTableSize, Badger's
// batch limit is small too; a group stored in Badger goes in one
// transaction with its dedup record (every ID again), and neither can be
// split. A group of long IDs under 16 KiB used to exceed the limit and fail
// every time it was published (found by the sixteenth session's review);
// such a group now goes to a segment.
func TestBadgerFsyncInlineSmallMemtable(t *testing.T) {
	for _, mt := range []int64{64 << 10, 128 << 10, 1 << 20} {
		t.Run(fmt.Sprint(mt), func(t *testing.T) {
			q := openTestBadger(t, t.TempDir(), QueueOptions{Durability: DurabilityFsync,
				Badger: func(o *badger.Options) { o.MemTableSize = mt }})
			var evs []Event
			for i, total := 0, 0; total < min(q.maxValue, fsyncInlineBytes)-1000; i++ {
				ev := Event{ID: fmt.Sprintf("%s-%04d", strings.Repeat("x", 500), i), Namespace: "n", Data: []byte("d")}
				evs = append(evs, ev)
				total += encodedLen(&ev) + 4
			}
			publishTest(t, q, evs...)
			checkLeased(t, leaseAll(t, q, "h", len(evs), "n"), evs)
		})
	}
}

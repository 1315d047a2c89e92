package h3x

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// tableMapResident returns the resident bytes of the process's maps of
// table files in dir, from /proc/self/smaps.
func tableMapResident(t *testing.T, dir string) (resident int64, maps int) {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no /proc/self/smaps: %v", err)
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) > 0 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			in = len(fields) >= 6 && strings.HasPrefix(fields[5], dir+"/") && strings.HasSuffix(fields[5], ".sst")
			if in {
				maps++
			}
			continue
		}
		if in && len(fields) == 3 && fields[0] == "Rss:" {
			kb, _ := strconv.ParseInt(fields[1], 10, 64)
			resident += kb << 10
		}
	}
	return resident, maps
}

// TestBadgerTableMapsTrimmed: the pages of the table files a process wrote
// stop counting in its RSS once the trimmer has run (and nothing was read
// since its last check), and the events read afterwards are intact; also
// with the tables in a directory of their own (opts.Badger moving Dir).
func TestBadgerTableMapsTrimmed(t *testing.T) {
	for _, elsewhere := range []bool{false, true} {
		t.Run(fmt.Sprintf("tablesElsewhere=%v", elsewhere), func(t *testing.T) { testTableMapsTrimmed(t, elsewhere) })
	}
}

func testTableMapsTrimmed(t *testing.T, elsewhere bool) {
	dir, tables := t.TempDir(), ""
	if elsewhere {
		tables = t.TempDir()
	}
	q := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync, Badger: func(o *badger.Options) {
		o.MemTableSize = 1 << 20
		if tables != "" {
			o.Dir = tables
		}
	}})
	q.segs.disabled.Store(true) // the events in Badger's tables
	real := q.tdir
	if want, _ := filepath.EvalSymlinks(cmp.Or(tables, dir)); real != want {
		t.Fatalf("the trimmer looks in %q; the tables are in %q", real, want)
	}
	data := []byte(strings.Repeat("x", 1000))
	var evs []Event
	for i := range 8000 {
		evs = append(evs, Event{ID: fmt.Sprintf("e%05d", i), Namespace: "n", Data: data})
	}
	for i := 0; i < len(evs); i += 500 {
		publishTest(t, q, evs[i:i+500]...)
	}
	// Badger flushes the memtables and compacts in the background: wait
	// until its table maps stay the same for 300 ms.
	var before int64
	var maps, same int
	for range 500 {
		r, m := tableMapResident(t, real)
		if r == before && m == maps && r >= 2<<20 {
			if same++; same == 3 {
				break
			}
		} else {
			before, maps, same = r, m, 0
		}
		time.Sleep(100 * time.Millisecond)
	}
	if before < 2<<20 {
		t.Fatalf("only %d bytes of table maps resident after writing 8 MB", before)
	}

	// The 8,000 events just published are more than trimBusyEvents, and
	// then a read: no trim while either happens in an interval.
	seen := trimSeen{reads: q.tableReads.Load(), enqueued: q.enqueued.Load() - trimBusyEvents - 1}
	if n, err := q.trimTick(real, &seen, 0); err != nil || n != 0 {
		t.Fatalf("trim right after a burst of enqueues: %d bytes, %v; want none", n, err)
	}
	seen.reads--
	if n, err := q.trimTick(real, &seen, 0); err != nil || n != 0 {
		t.Fatalf("trim right after a read: %d bytes, %v; want none", n, err)
	}
	n, err := q.trimTick(real, &seen, 0)
	if err != nil {
		t.Skipf("the kernel cannot trim: %v", err)
	}
	after, maps := tableMapResident(t, real)
	// A compaction that was still running (a machine busy with other
	// tests) can touch pages again, and the kernel does not reclaim pages
	// under writeback at once: the next rounds take them.
	for try := 0; try < 10 && after > before/4; try++ {
		time.Sleep(100 * time.Millisecond)
		m, err := q.trimTick(real, &seen, 0)
		if err != nil {
			t.Fatal(err)
		}
		n += m
		after, maps = tableMapResident(t, real)
	}
	t.Logf("%d table maps: %d bytes resident before, %d after; %d bytes of maps trimmed", maps, before, after, n)
	if n == 0 || after > before/4 {
		t.Fatalf("after trimming, %d of %d bytes of table maps are resident", after, before)
	}
	if n, _ := q.trimTick(real, &seen, 1<<50); n != 0 {
		t.Fatalf("trimmed %d bytes under the budget", n)
	}

	// Every event reads back intact (from the files, faulted in again).
	got := 0
	for got < len(evs) {
		ls, err := q.Lease(context.Background(), LeaseRequest{Holder: "h", Namespaces: []string{"n"}, Limit: 1000, AckDeadline: time.Minute})
		if err != nil || len(ls) == 0 {
			t.Fatalf("lease after %d: %d, %v", got, len(ls), err)
		}
		for _, l := range ls {
			if l.Event.ID != evs[got].ID || string(l.Event.Data) != string(data) {
				t.Fatalf("event %d: %s with %d bytes, want %s", got, l.Event.ID, len(l.Event.Data), evs[got].ID)
			}
			got++
		}
		ackAll(t, q, "h", ls)
	}
	if q.tableReads.Load() == seen.reads {
		t.Fatal("reading the backlog did not count as table reads")
	}
}

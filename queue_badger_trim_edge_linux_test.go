package h3x

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"golang.org/x/sys/unix"
)

// TestBadgerTrimInMemoryLeavesOtherTables: a queue whose Badger keeps its
// tables in memory (opts.Badger setting InMemory, which requires an empty
// Dir) has no table maps; its trimmer must not page out the table maps of
// another queue whose tables are in the working directory.
func TestBadgerTrimInMemoryLeavesOtherTables(t *testing.T) {
	dir := tableDir(t.TempDir())
	t.Chdir(dir)
	other := openTestBadger(t, dir, QueueOptions{Durability: DurabilityNoSync, Badger: func(o *badger.Options) {
		o.MemTableSize = 1 << 20
	}})
	other.segs.disabled.Store(true) // the events in Badger's tables
	data := []byte(strings.Repeat("x", 1000))
	for i := 0; i < 4000; i += 500 {
		var evs []Event
		for j := i; j < i+500; j++ {
			evs = append(evs, Event{ID: fmt.Sprintf("e%05d", j), Namespace: "n", Data: data})
		}
		publishTest(t, other, evs...)
	}
	var before int64
	for range 100 {
		if before, _ = tableMapResident(t, dir); before >= 1<<20 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if before < 1<<20 {
		t.Fatalf("only %d bytes of the other queue's table maps resident", before)
	}

	mem := openTestBadger(t, t.TempDir(), QueueOptions{Badger: func(o *badger.Options) {
		o.InMemory, o.Dir, o.ValueDir = true, "", ""
	}})
	seen := trimSeen{reads: mem.tableReads.Load(), enqueued: mem.enqueued.Load()}
	n, err := mem.trimTick(mem.tdir, &seen, 0) // as trimLoop does, RssFile above the budget
	after, _ := tableMapResident(t, dir)
	if mem.tdir != "" || n != 0 {
		t.Fatalf("the in-memory queue's trimmer looks in %q and paged out %d bytes of maps (%v): the other queue's tables went from %d to %d bytes resident",
			mem.tdir, n, err, before, after)
	}
}

// mapTable maps a table file of size bytes (created sparse) in dir, shared
// and read-only as Badger maps its tables, until the test ends.
func mapTable(t *testing.T, dir, name string, size int) []byte {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	b, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func touchPages(b []byte) (sum byte) {
	for i := 0; i < len(b); i += os.Getpagesize() {
		sum += b[i]
	}
	return sum
}

// TestBadgerTrimLoopSurvivesAFailedRound: one round in which madvise fails
// on one range (here a table map that is locked; in a real process, the
// range of a table unmapped by a compaction after /proc/self/maps was read
// and reused for a locked, hugetlb or PFN map, or /proc/self/maps failing
// to open for want of a file descriptor) must not stop the trimmer for the
// rest of the process's life: the kernel can do MADV_PAGEOUT.
func TestBadgerTrimLoopSurvivesAFailedRound(t *testing.T) {
	dir := tableDir(t.TempDir())
	locked := mapTable(t, dir, "000001.sst", os.Getpagesize())
	if err := unix.Mlock(locked); err != nil {
		t.Skipf("mlock: %v", err)
	}
	big := mapTable(t, dir, "000002.sst", mappedBudget+16<<20)
	touchPages(big)
	if r, ok := fileResident(); !ok || r <= mappedBudget {
		t.Skipf("file-backed resident memory %d (%v): the table maps do not count as RssFile here", r, ok)
	}
	var logs lockedBuffer
	q := &badgerQueue{
		log:      slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		tdir:     dir,
		trimStop: make(chan struct{}),
		trimDone: make(chan struct{}),
	}
	go q.trimLoop(10 * time.Millisecond)
	defer func() {
		close(q.trimStop)
		<-q.trimDone
	}()
	time.Sleep(100 * time.Millisecond) // a few rounds with the locked map
	if err := unix.Munlock(locked); err != nil {
		t.Fatal(err)
	}
	// The failure is over: the table map read again is trimmed again,
	// until the file-backed RSS is below the budget. (A round may run while
	// the pages are being touched, so less than all of them may go.)
	touchPages(big)
	var r int64
	for range 100 {
		if r, _ = tableMapResident(t, dir); r < mappedBudget {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%d bytes of table maps still resident 1 s after the failure ended; log:\n%s", r, logs.String())
}

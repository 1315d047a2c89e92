package h3x

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/dgraph-io/badger/v4"
	"github.com/google/uuid"
)

// Internal tests of the built-in queues, beyond the conformance suite
// (queue_conformance_test.go): the dedup index, the storage codec, and the
// Badger queue's failure modes and bookkeeping.

func TestParseCanonicalUUID(t *testing.T) {
	id := uuid.New()
	u, ok := parseCanonicalUUID(id.String())
	if !ok || u != [16]byte(id) {
		t.Fatalf("parseCanonicalUUID(%s) = %x, %v", id, u, ok)
	}
	for _, s := range []string{
		strings.ToUpper(id.String()),
		"{" + id.String()[:34] + "}",
		id.String()[:35] + "g",
		strings.ReplaceAll(id.String(), "-", ""),
		"evt-0001",
		"",
	} {
		if _, ok := parseCanonicalUUID(s); ok {
			t.Errorf("parseCanonicalUUID(%q) accepted it", s)
		}
	}
}

func TestNewUUIDv4(t *testing.T) {
	seen := map[string]bool{}
	check := func(s string) {
		t.Helper()
		u, err := uuid.Parse(s)
		if err != nil || u.Version() != 4 || u.Variant() != uuid.RFC4122 || u.String() != s {
			t.Fatalf("UUID %q: %v, version %v, variant %v", s, err, u.Version(), u.Variant())
		}
		if seen[s] {
			t.Fatalf("%s twice", s)
		}
		seen[s] = true
	}
	for range 1000 {
		check(newUUIDv4())
	}
	// A generator's batches: fewer, exactly, and more than one batch, and
	// more asked for than announced.
	for _, want := range []int{0, 1, uuidBatch - 1, uuidBatch, uuidBatch + 1, 100} {
		g := uuidGen{want: want}
		for range want + 3 {
			check(g.next())
		}
	}
	// Every bit but the version's and the variant's varies.
	var or, and [16]byte
	for i := range and {
		and[i] = 0xff
	}
	for range 200 {
		u := uuid.MustParse(newUUIDv4())
		for i := range u {
			or[i] |= u[i]
			and[i] &= u[i]
		}
	}
	for i := range or {
		fixedOr, fixedAnd := byte(0xff), byte(0)
		switch i {
		case 6:
			fixedOr, fixedAnd = 0x4f, 0x40
		case 8:
			fixedOr, fixedAnd = 0xbf, 0x80
		}
		if or[i] != fixedOr || and[i] != fixedAnd {
			t.Errorf("byte %d: OR of 200 UUIDs %#x, AND %#x; want %#x and %#x", i, or[i], and[i], fixedOr, fixedAnd)
		}
	}
}

func TestDedupIndex(t *testing.T) {
	const window = 10 * time.Second
	d := newDedupIndex(window, 1000, slog.New(slog.DiscardHandler))
	t0 := time.Now().UnixNano()
	at := func(d time.Duration) int64 { return t0 + int64(d) }
	ids := []string{uuid.NewString(), "evt-0001", "EVT-0001", uuid.NewString()}
	for i, id := range ids {
		if d.seen(d.keyOf(id), at(time.Duration(i)*time.Second)) {
			t.Fatalf("%s seen before it was added", id)
		}
		d.add(id, at(time.Duration(i)*time.Second))
	}
	for i, id := range ids {
		added := time.Duration(i) * time.Second
		if !d.seen(d.keyOf(id), at(added+window-time.Second)) {
			t.Errorf("%s not seen within its window", id)
		}
	}
	// The first ID leaves the window first.
	if d.seen(d.keyOf(ids[0]), at(window+200*time.Millisecond)) {
		t.Errorf("%s still seen after its window", ids[0])
	}
	if !d.seen(d.keyOf(ids[3]), at(window+200*time.Millisecond)) {
		t.Errorf("%s forgotten before its window ended", ids[3])
	}

	// gone / forget
	d2 := newDedupIndex(window, 1000, slog.New(slog.DiscardHandler))
	now := time.Now().UnixNano()
	d2.add("a", now)
	d2.add("b", now)
	if !d2.stored("a", now) {
		t.Error("a not stored")
	}
	d2.setGone(d2.keyOf("a"), true)
	if d2.stored("a", now) || !d2.seen(d2.keyOf("a"), now) {
		t.Error("a gone: want seen (for dedup) but not stored")
	}
	d2.setGone(d2.keyOf("a"), false)
	if !d2.stored("a", now) {
		t.Error("a not stored after clearing its gone mark")
	}
	d2.forgetKey(d2.keyOf("b"))
	if d2.seen(d2.keyOf("b"), now) {
		t.Error("b seen after forget")
	}
}

// An ID the queue assigned is remembered for dedup like a client's:
// publishing it again is a duplicate.
func TestAssignedIDDeduplicated(t *testing.T) {
	for _, q := range []struct {
		name string
		open func(t *testing.T) Queue
	}{
		{"memory", func(*testing.T) Queue { return NewMemoryQueue(QueueOptions{}) }},
		{"badger", func(t *testing.T) Queue { return openTestBadger(t, t.TempDir(), QueueOptions{}) }},
	} {
		t.Run(q.name, func(t *testing.T) {
			queue := q.open(t)
			defer queue.Close()
			ctx := context.Background()
			res, err := queue.Enqueue(ctx, []Event{{Namespace: "n", Type: "t"}, {Namespace: "n", Type: "t"}})
			if err != nil || len(res) != 2 || res[0].Status != PublishStored || res[1].Status != PublishStored || res[0].ID == res[1].ID {
				t.Fatalf("first publish: %+v, %v", res, err)
			}
			again, err := queue.Enqueue(ctx, []Event{{ID: res[1].ID, Namespace: "n", Type: "t"}, {ID: res[0].ID, Namespace: "n", Type: "t"}})
			if err != nil || again[0].Status != PublishDuplicate || again[1].Status != PublishDuplicate {
				t.Fatalf("publishing the assigned IDs again: %+v, %v; want duplicates", again, err)
			}
		})
	}
}

func TestDedupIndexCapacity(t *testing.T) {
	// Over capacity, the oldest generations go: old IDs may be stored again
	// (a duplicate, never a loss), new ones are still caught, and nothing is
	// ever reported seen that was not added.
	const window = 2 * time.Minute
	d := newDedupIndex(window, 1000, slog.New(slog.DiscardHandler))
	t0 := time.Now().UnixNano()
	for i := range 5000 {
		d.add(fmt.Sprintf("id-%d", i), t0+int64(i)*int64(10*time.Millisecond))
	}
	if d.n > 1000+250 { // at most one generation (a quarter) over
		t.Errorf("index holds %d IDs, capacity 1000", d.n)
	}
	end := t0 + 5000*int64(10*time.Millisecond)
	if !d.seen(d.keyOf("id-4999"), end) {
		t.Error("the newest ID was forgotten")
	}
	for i := range 5000 {
		if d.seen(d.keyOf(fmt.Sprintf("other-%d", i)), end) {
			t.Fatalf("other-%d seen but never added", i)
		}
	}
}

// TestDedupTable checks the dedup index's hash table against a map, with
// keys drawn from a few home slots so that runs are long and wrap around
// the end of the table, through growth, replacement and deletions.
func TestDedupTable(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3, 4} {
		rng := rand.New(rand.NewPCG(seed, 0))
		var tab dedupTable
		model := make(map[uint64][2]uint64)
		keys := []uint64{}
		for step := range 20000 {
			var k uint64
			switch {
			case len(keys) > 0 && rng.IntN(3) == 0:
				k = keys[rng.IntN(len(keys))]
			case rng.IntN(2) == 0:
				k = ^uint64(0) - rng.Uint64N(1<<20) // home slots at the very end: runs wrap
			default:
				k = rng.Uint64() | 1
			}
			switch op := rng.IntN(10); {
			case op < 6:
				fp, val := uint16(rng.Uint32()), rng.Uint32()
				_, had := model[k]
				if added := tab.put(k, fp, val); added == had {
					t.Fatalf("seed %d step %d: put(%x) added=%v, model had=%v", seed, step, k, added, had)
				}
				if !had {
					keys = append(keys, k)
				}
				model[k] = [2]uint64{uint64(fp), uint64(val)}
			case op < 9:
				j, ok := tab.find(k)
				if ok {
					tab.remove(j)
				}
				if _, had := model[k]; had != ok {
					t.Fatalf("seed %d step %d: find(%x) = %v, model %v", seed, step, k, ok, had)
				}
				delete(model, k)
			default:
				if j, ok := tab.find(k); ok {
					tab.setGone(j, true)
					m := model[k]
					m[1] |= dedupGoneBit
					model[k] = m
				}
			}
			if step%997 == 0 || step == 19999 {
				if tab.n != len(model) {
					t.Fatalf("seed %d step %d: %d entries, model %d", seed, step, tab.n, len(model))
				}
				for k, m := range model {
					j, ok := tab.find(k)
					if !ok || uint64(tab.fps[j]) != m[0] || uint64(tab.vals[j]) != m[1] {
						t.Fatalf("seed %d step %d: entry %x lost or changed (found %v)", seed, step, k, ok)
					}
				}
				if tab.n > 0 && tab.n*5 > len(tab.keys)*4 {
					t.Fatalf("seed %d step %d: %d entries in %d slots", seed, step, tab.n, len(tab.keys))
				}
			}
		}
	}
}

// TestDedupIndexMemory: the index's heap per remembered ID, at sizes a busy
// queue holds (the Go map it replaced took 36 bytes at 1,000,000).
func TestDedupIndexMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates 1,000,000 IDs")
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	d := newDedupIndex(2*time.Minute, dedupMaxIDs, slog.New(slog.DiscardHandler))
	t0 := time.Now().UnixNano()
	const n = 1000000
	for i := range n {
		d.addKey(dedupKey{k: uint64(i)*0x9e3779b97f4a7c15 | 1, fp: uint64(i)}, t0+int64(i)*5000)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	t.Logf("%.1f bytes per remembered ID (%d generations)", per, len(d.gens))
	if per > 24 {
		t.Errorf("%.1f bytes per remembered ID; want at most 24 (14 a slot, at least 53%% full)", per)
	}
	runtime.KeepAlive(d)
}

func TestEventCodec(t *testing.T) {
	for _, ev := range []Event{
		{ID: "x", Time: time.Unix(0, 0)},
		{ID: uuid.NewString(), Type: "t", Message: "héllo", Data: []byte{0, 1, 2, 0xff}, Time: time.Date(2022, 1, 2, 3, 4, 5, 6, time.UTC),
			Metadata: map[string]string{"a": "1", "": "", "k": "v"}},
		{ID: "old", Time: time.Date(1900, 1, 1, 0, 0, 0, 999999999, time.UTC)},
	} {
		enc := encodeEvent(nil, &ev, 12345)
		if len(enc) > encodedLen(&ev) {
			t.Errorf("encoded %d bytes, encodedLen %d", len(enc), encodedLen(&ev))
		}
		got, enq, err := decodeEvent(enc)
		if err != nil {
			t.Fatalf("decode: %v", err)
		}
		if enq != 12345 || got.ID != ev.ID || got.Type != ev.Type || got.Message != ev.Message ||
			string(got.Data) != string(ev.Data) || !got.Time.Equal(ev.Time) || len(got.Metadata) != len(ev.Metadata) {
			t.Errorf("round trip of %+v: %+v (enq %d)", ev, got, enq)
		}
		for k, v := range ev.Metadata {
			if got.Metadata[k] != v {
				t.Errorf("metadata %q: %q, want %q", k, got.Metadata[k], v)
			}
		}
		withNS := ev
		withNS.Namespace = "orders"
		if n, err := storedSize(enc, "orders"); err != nil || n != withNS.size() {
			t.Errorf("storedSize: %d, %v; want %d", n, err, withNS.size())
		}
		// Every truncation is an error, never a panic.
		for i := range len(enc) {
			if _, _, err := decodeEvent(enc[:i]); err == nil {
				t.Errorf("decode of %d of %d bytes: no error", i, len(enc))
			}
			if _, err := storedSize(enc[:i], "orders"); err == nil {
				t.Errorf("storedSize of %d of %d bytes: no error", i, len(enc))
			}
		}
	}
}

func TestGroupKeys(t *testing.T) {
	var ids []string
	for i := range 300 {
		if i%3 == 0 {
			ids = append(ids, fmt.Sprintf("evt-%04d", i))
		} else {
			ids = append(ids, uuid.NewString())
		}
	}
	ids = append(ids, strings.Repeat("x", groupIDMax+1)) // not recorded
	keys := groupKeys(42, 1234, ids)
	var got []string
	for i, k := range keys {
		if len(k) > groupKeyMax {
			t.Errorf("key %d is %d bytes", i, len(k))
		}
		enq, part, ok := decodeGroupKey(k)
		if !ok || enq != 1234 {
			t.Fatalf("key %d: %v, enq %d", i, ok, enq)
		}
		got = append(got, part...)
	}
	if strings.Join(got, ",") != strings.Join(ids[:300], ",") {
		t.Errorf("round trip lost or changed IDs: %d of 300", len(got))
	}
	for i := range len(keys[0]) {
		if _, _, ok := decodeGroupKey(keys[0][:i]); ok && i < 21 {
			t.Errorf("truncated key of %d bytes decoded", i)
		}
	}
}

func TestLeaseRecCodec(t *testing.T) {
	// Compact records (format 4) keep each delivery's namespace, sequence
	// number and attempt; the ID, size and enqueue time come from the
	// chunk when the queue opens.
	compact := func(rs []recEntry) []recEntry {
		out := make([]recEntry, len(rs))
		for i, r := range rs {
			out[i] = recEntry{ns: r.ns, seq: r.seq, attempt: r.attempt}
		}
		return out
	}
	for _, tc := range []struct {
		name string
		in   []recEntry
	}{
		{"one", []recEntry{{ns: "orders", seq: 7, id: "a", size: 300, enq: 99, attempt: 2}}},
		{"empty namespace, large seq", []recEntry{{ns: "orders", seq: 7, attempt: 2}, {ns: "", seq: 1 << 40, id: uuid.NewString(), attempt: 1}}},
		{"runs and a redelivery out of order", []recEntry{{ns: "a", seq: 10, attempt: 1}, {ns: "a", seq: 11, attempt: 1}, {ns: "a", seq: 3, attempt: 4}, {ns: "b", seq: 2, attempt: 1}, {ns: "a", seq: 12, attempt: 1}}},
		{"max seq", []recEntry{{ns: "n", seq: math.MaxUint64, attempt: math.MaxInt32}, {ns: "n", seq: 0, attempt: 0}}},
		{"none", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := decodeLeaseRec(encodeLeaseRec(tc.in))
			if err != nil || !slices.Equal(out, compact(tc.in)) {
				t.Fatalf("round trip: %+v, %v; want %+v", out, err, compact(tc.in))
			}
		})
	}

	// About 3 bytes a delivery for a lease of consecutive events (it was
	// about 58 with the ID, size and enqueue time).
	var batch []recEntry
	for i := range 1000 {
		batch = append(batch, recEntry{ns: "orders", seq: 1<<30 + uint64(i), id: uuid.NewString(), size: 300, enq: time.Now().UnixNano(), attempt: 1})
	}
	if n := len(encodeLeaseRec(batch)); n > 3*len(batch) {
		t.Errorf("a record of %d deliveries takes %d bytes", len(batch), n)
	}

	// Records of formats 2 and 3 still decode, whole.
	old := []recEntry{{ns: "orders", seq: 7, id: "a", size: 300, enq: 99, attempt: 2}, {ns: "", seq: 1 << 40, id: uuid.NewString(), attempt: 1}}
	if out, err := decodeLeaseRec(encodeLeaseRecFormat3(old)); err != nil || !slices.Equal(out, old) {
		t.Fatalf("format 3 record: %+v, %v", out, err)
	}
	if out, err := decodeLeaseRec(encodeLeaseRecFormat3(nil)); err != nil || len(out) != 0 {
		t.Fatalf("empty format 3 record: %+v, %v", out, err)
	}

	full := encodeLeaseRec(batch[:3])
	for _, bad := range [][]byte{
		{5, 1},                  // format 3, cut short
		{0, 2, 1, 'n', 1, 2, 1}, // an unknown compact layout
		full[:len(full)-1],      // cut short
		{0, 1, 1, 'n', 2, 2, 1}, // two deliveries announced, one there
		{0, 1, 1, 'n', 1, 0x80}, // a sequence number cut short
		{0, 1, 5, 'n'},          // a namespace cut short
	} {
		if out, err := decodeLeaseRec(bad); !errors.Is(err, errCorrupt) {
			t.Errorf("decode %x: %+v, %v; want errCorrupt", bad, out, err)
		}
	}
}

// encodeLeaseRecFormat3 encodes a lease record as storage formats 2 and 3
// did, for the tests of their decoding.
func encodeLeaseRecFormat3(entries []recEntry) []byte {
	b := binary.AppendUvarint(nil, uint64(len(entries)))
	for _, r := range entries {
		b = appendString(b, r.ns)
		b = binary.AppendUvarint(b, r.seq)
		b = appendString(b, r.id)
		b = binary.AppendUvarint(b, uint64(r.size))
		b = binary.AppendUvarint(b, uint64(r.enq))
		b = binary.AppendUvarint(b, uint64(r.attempt))
	}
	return b
}

func openTestBadger(t testing.TB, dir string, opts QueueOptions) *badgerQueue {
	t.Helper()
	q, err := OpenBadgerQueue(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q.(*badgerQueue)
}

func publishTest(t testing.TB, q Queue, evs ...Event) []string {
	t.Helper()
	res, err := q.Enqueue(context.Background(), evs)
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	ids := make([]string, len(res))
	for i, r := range res {
		if r.Status != PublishStored {
			t.Fatalf("Enqueue result %d: %v %v", i, r.Status, r.Err)
		}
		ids[i] = r.ID
	}
	return ids
}

// leaseAll leases up to limit events of ns for holder. On a Badger queue
// with no commit hook installed it then waits until the writer has written
// everything submitted so far: a Lease whose record went to the lease
// journal returns before Badger has it, and tests that go on to hold the
// core or the writer were written for a Lease that returned after. (With a
// hook installed, such as slowLeaseRecords, it does not wait: the journal
// tests keep records pending on purpose.)
func leaseAll(t testing.TB, q Queue, holder string, limit int, ns ...string) []Lease {
	t.Helper()
	ls, err := q.Lease(context.Background(), LeaseRequest{Holder: holder, Namespaces: ns, Limit: limit, AckDeadline: time.Minute})
	if err != nil {
		t.Fatalf("Lease: %v", err)
	}
	if bq, ok := q.(*badgerQueue); ok && bq.failCommit.Load() == nil {
		writerCaughtUp(bq)
	}
	return ls
}

// writerCaughtUp waits until every state change submitted to q so far has
// been written (groups complete in order: a barrier queued now completes
// after them).
func writerCaughtUp(q *badgerQueue) {
	if b := (*badgerStore)(q).barrier(); b != nil {
		b.wait(context.Background())
	}
}

func ackAll(t testing.TB, q Queue, holder string, ls []Lease) {
	t.Helper()
	refs := make([]LeaseRef, len(ls))
	for i, l := range ls {
		refs[i] = LeaseRef{ID: l.Event.ID, Attempt: l.Attempt}
	}
	res, err := q.Ack(context.Background(), holder, refs)
	if err != nil {
		t.Fatalf("Ack: %v", err)
	}
	for _, r := range res {
		if r.Status != SettleOK {
			t.Fatalf("Ack of %s: %v", r.ID, r.Status)
		}
	}
}

func TestBadgerQueueDirectoryInUse(t *testing.T) {
	dir := t.TempDir()
	openTestBadger(t, dir, QueueOptions{})
	q, err := OpenBadgerQueue(dir, QueueOptions{})
	if err == nil {
		q.Close()
		t.Fatal("a second OpenBadgerQueue of one directory succeeded")
	}
	if !strings.Contains(err.Error(), "in use by another process") || !strings.Contains(err.Error(), dir) {
		t.Errorf("error %q does not say the directory is in use", err)
	}
}

func TestBadgerQueueCloseTwice(t *testing.T) {
	q := openTestBadger(t, t.TempDir(), QueueOptions{})
	publishTest(t, q, Event{Namespace: "n"})
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := q.Enqueue(context.Background(), []Event{{Namespace: "n"}}); !errors.Is(err, ErrQueueClosed) {
		t.Errorf("Enqueue after Close: %v", err)
	}
}

// fakeDiskFree makes q see 1 TiB of free disk, until setFree says otherwise.
func fakeDiskFree(q *badgerQueue) (setFree func(uint64)) {
	free := uint64(1 << 40)
	var mu sync.Mutex
	df := func(string) (uint64, error) { mu.Lock(); defer mu.Unlock(); return free, nil }
	q.diskFree.Store(&df)
	return func(n uint64) { mu.Lock(); free = n; mu.Unlock() }
}

func TestBadgerQueueDiskFull(t *testing.T) {
	q := openTestBadger(t, t.TempDir(), QueueOptions{})
	ctx := context.Background()
	publishTest(t, q, Event{ID: "before", Namespace: "n"})
	ls := leaseAll(t, q, "h", 1, "n")

	setFree := fakeDiskFree(q)

	setFree(q.reserve - 1)
	_, err := q.Enqueue(ctx, []Event{{ID: "refused", Namespace: "n"}})
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeInternal || !e.Temporary() || e.RetryAfter <= 0 || !strings.Contains(e.Message, "disk full") {
		t.Fatalf("Enqueue on a full disk: %v, want a retryable *Error saying the disk is full", err)
	}
	// Nothing half-done: the refused event is neither stored nor a duplicate.
	if st, _ := q.Stats(ctx, "n"); st[0].Ready+st[0].Leased != 1 {
		t.Errorf("after the refusal: %+v", st[0])
	}
	// Acks still go through above half the reserve.
	ackAll(t, q, "h", ls)

	setFree(q.reserve/2 - 1)
	publishTestErr := func() error { _, err := q.Enqueue(ctx, []Event{{ID: "x", Namespace: "n"}}); return err }
	if err := publishTestErr(); !errors.Is(err, ErrInternal) {
		t.Errorf("Enqueue on a fuller disk: %v", err)
	}

	setFree(1 << 40)
	ids := publishTest(t, q, Event{ID: "refused", Namespace: "n"})
	if ids[0] != "refused" {
		t.Fatal(ids)
	}
	if got := leaseAll(t, q, "h", 10, "n"); len(got) != 1 || got[0].Event.ID != "refused" {
		t.Errorf("after space came back: leased %v", got)
	}
	if !isDiskFull(fmt.Errorf("write: %w", syscall.ENOSPC)) {
		t.Error("ENOSPC is not recognized as a full disk")
	}
}

// captureHandler records log records.
type captureHandler struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (h *captureHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *captureHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.recs = append(h.recs, r)
	h.mu.Unlock()
	return nil
}
func (h *captureHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *captureHandler) WithGroup(string) slog.Handler      { return h }

func TestBadgerQueueLogger(t *testing.T) {
	h := &captureHandler{}
	q := openTestBadger(t, t.TempDir(), QueueOptions{Logger: slog.New(h)})
	q.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.recs {
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "component" && a.Value.String() == "badger" {
				n++
			}
			return true
		})
	}
	if n == 0 {
		t.Errorf("no Badger log lines reached the Logger (%d records)", len(h.recs))
	}
}

func TestBadgerQueueTxnSplit(t *testing.T) {
	// Small memtables make Badger's transaction limit small: one Enqueue of
	// many large events spans several transactions.
	dir := t.TempDir()
	opts := QueueOptions{Badger: func(o *badger.Options) {
		o.MemTableSize = 1 << 20
		o.ValueThreshold = 100 << 10 // events stay in the LSM tree, so they count fully
	}}
	q := openTestBadger(t, dir, opts)
	q.segs.disabled.Store(true) // the chunks in Badger, as when no segment can be written
	var evs []Event
	for i := range 100 {
		evs = append(evs, Event{ID: fmt.Sprintf("big-%03d", i), Namespace: "n", Data: make([]byte, 10<<10)})
	}
	txns := q.statTxns.Load()
	ids := publishTest(t, q, evs...)
	if n := q.statTxns.Load() - txns; n < 5 {
		t.Errorf("1 MB of events went into %d transactions, want them split", n)
	}
	q = reopenTestBadger(t, q, dir, opts)
	if st, _ := q.Stats(context.Background(), "n"); st[0].Ready != 100 {
		t.Fatalf("after reopen: %+v", st[0])
	}
	var got []string
	for {
		ls := leaseAll(t, q, "h", 7, "n")
		if len(ls) == 0 {
			break
		}
		for _, l := range ls {
			got = append(got, l.Event.ID)
		}
		ackAll(t, q, "h", ls)
	}
	if strings.Join(got, ",") != strings.Join(ids, ",") {
		t.Errorf("delivered %v, want %v", got, ids)
	}

	// Events as big as a transaction allows, with the bookkeeping of a
	// commit on top, still go through, each in a transaction of its own.
	var huge []Event
	for i := range 4 {
		huge = append(huge, Event{ID: fmt.Sprintf("huge-%d", i), Namespace: "n", Data: make([]byte, 99<<10)})
	}
	publishTest(t, q, huge...)
	publishTest(t, q, Event{ID: "after", Namespace: "n"})
}

func TestBadgerQueueLeaseRecords(t *testing.T) {
	// Lease records are deleted once settled, and after a reopen the
	// deliveries they list keep their attempts and stay settleable.
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	var evs []Event
	for i := range 10 {
		evs = append(evs, Event{ID: fmt.Sprintf("e%d", i), Namespace: "n"})
	}
	publishTest(t, q, evs...)
	ls := leaseAll(t, q, "h", 10, "n")
	ackAll(t, q, "h", ls[:5])
	q = reopenTestBadger(t, q, dir, QueueOptions{})
	ackAll(t, q, "reconnected", ls[5:8]) // attempt 1, delivered before the reopen
	next := leaseAll(t, q, "h2", 10, "n")
	if len(next) != 2 || next[0].Event.ID != "e8" || next[0].Attempt != 2 || next[1].Event.ID != "e9" {
		t.Fatalf("after reopen leased %+v", next)
	}
	ackAll(t, q, "h2", next)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if n := storedPrefix(t, dir, []byte{keyLeaseRec}); n != 0 {
		t.Errorf("%d lease records left after every delivery was settled", n)
	}
}

func TestBadgerQueueAckedStayAcked(t *testing.T) {
	// Regression: with event values in Badger's value log, its value-log
	// GC could bring acked events back (about one run in ten of this
	// workload): kept events went missing behind resurrected ones. Values
	// now stay in the LSM tree, whatever ValueThreshold the escape hatch
	// sets: the value log stays empty, and after GC passes, compactions and
	// a reopen exactly the kept events remain, in order.
	dir := t.TempDir()
	opts := QueueOptions{Badger: func(o *badger.Options) {
		o.ValueLogFileSize = 1 << 20
		o.MemTableSize = 128 << 10
		o.BaseTableSize = 64 << 10
		o.ValueThreshold = 64    // overridden: values stay in the LSM tree
		o.NumLevelZeroTables = 1 // compact early
	}}
	q := openTestBadger(t, dir, opts)
	var keep []string
	for b := range 10 {
		evs := make([]Event, 500)
		for i := range evs {
			evs[i] = Event{ID: fmt.Sprintf("gc-%d-%03d", b, i), Namespace: "n", Data: make([]byte, 1000)}
		}
		publishTest(t, q, evs...)
		for {
			ls := leaseAll(t, q, "h", 100, "n")
			if len(ls) == 0 {
				break
			}
			var ack []Lease
			for _, l := range ls {
				if strings.HasSuffix(l.Event.ID, "7") {
					keep = append(keep, l.Event.ID)
				} else {
					ack = append(ack, l)
				}
			}
			ackAll(t, q, "h", ack)
		}
		// Park the kept ones, out of the next rounds' leases.
		if err := q.Release(context.Background(), "h"); err != nil {
			t.Fatal(err)
		}
		leaseAll(t, q, "parked", 10000, "n")
	}
	for range 3 {
		if err := q.valueLogGC(); err != nil && !errors.Is(err, badger.ErrNoRewrite) {
			t.Fatal(err)
		}
	}
	if err := q.db.Flatten(2); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	vlogBytes := int64(0)
	files, _ := filepath.Glob(filepath.Join(dir, "*.vlog"))
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil {
			vlogBytes += fi.Size()
		}
	}
	if vlogBytes > 4<<10 {
		t.Errorf("the value log holds %d bytes after 5,000 events of 1 KB; want it empty", vlogBytes)
	}
	q = openTestBadger(t, dir, opts)
	var got []string
	for {
		ls := leaseAll(t, q, "h", 1000, "n")
		if len(ls) == 0 {
			break
		}
		for _, l := range ls {
			if len(l.Event.Data) != 1000 {
				t.Fatalf("%s has %d bytes of data", l.Event.ID, len(l.Event.Data))
			}
			got = append(got, l.Event.ID)
		}
		ackAll(t, q, "h", ls)
	}
	if strings.Join(got, ",") != strings.Join(keep, ",") {
		t.Errorf("after GC, compaction and reopen: %d events, want exactly the %d kept, in order", len(got), len(keep))
	}
}

func TestBadgerQueueEventTooLarge(t *testing.T) {
	// An event whose stored value would not fit below Badger's value
	// threshold is refused, clearly; the rest of its batch is stored.
	q := openTestBadger(t, t.TempDir(), QueueOptions{Badger: func(o *badger.Options) {
		o.MemTableSize = 1 << 20 // a value threshold of 150 KiB
	}})
	res, err := q.Enqueue(context.Background(), []Event{
		{ID: "small", Namespace: "n", Data: make([]byte, 100)},
		{Namespace: "n", Data: make([]byte, 200<<10)},
		{ID: "fits", Namespace: "n", Data: make([]byte, 140<<10)},
	})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Status != PublishStored || res[2].Status != PublishStored {
		t.Fatalf("the events that fit: %+v, %+v", res[0], res[2])
	}
	if res[1].Status != PublishRefused || !errors.Is(res[1].Err, ErrInvalidArgument) || res[1].ID == "" {
		t.Fatalf("the oversized event: %+v", res[1])
	}
	t.Log(res[1].Err)
	ls := leaseAll(t, q, "h", 10, "n")
	if len(ls) != 2 || ls[0].Event.ID != "small" || ls[1].Event.ID != "fits" {
		t.Fatalf("leased %d events", len(ls))
	}
}

func TestBadgerQueueLargeLeaseRecords(t *testing.T) {
	// One Lease call of many deliveries is recorded in several lease
	// records, each below the value threshold: after a reopen every
	// delivery is still settleable, and the value log stays empty.
	dir := t.TempDir()
	opts := QueueOptions{Badger: func(o *badger.Options) {
		o.MemTableSize = 128 << 10 // a value threshold of 19 KiB
	}}
	q := openTestBadger(t, dir, opts)
	evs := make([]Event, 2000)
	for i := range evs {
		evs[i] = Event{ID: fmt.Sprintf("rec-%04d", i), Namespace: "n"}
	}
	publishTest(t, q, evs...)
	ls := leaseAll(t, q, "h", len(evs), "n")
	if len(ls) != len(evs) {
		t.Fatalf("leased %d", len(ls))
	}
	q = reopenTestBadger(t, q, dir, opts)
	recs := 0
	q.ts.view(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte{keyLeaseRec}})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			recs++
			if n := it.Item().ValueSize(); n >= 19<<10 {
				t.Errorf("a lease record of %d bytes", n)
			}
		}
		return nil
	})
	if recs < 2 {
		t.Errorf("%d lease records for one lease of %d deliveries, want it split", recs, len(ls))
	}
	ackAll(t, q, "reconnected", ls)
	if st, _ := q.Stats(context.Background(), "n"); st[0].Ready+st[0].Leased != 0 {
		t.Errorf("after acking every delivery: %+v", st[0])
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.vlog"))
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil && fi.Size() > 4<<10 {
			t.Errorf("%s holds %d bytes; want the value log empty", f, fi.Size())
		}
	}
}

func TestNackReasonTruncated(t *testing.T) {
	// A dead letter keeps the first KiB of the last nack reason, cut at a
	// rune boundary.
	for _, name := range []string{"memory", "badger"} {
		t.Run(name, func(t *testing.T) {
			opts := QueueOptions{MaxAttempts: 1}
			var q Queue
			if name == "memory" {
				q = NewMemoryQueue(opts)
				t.Cleanup(func() { q.Close() })
			} else {
				q = openTestBadger(t, t.TempDir(), opts)
			}
			publishTest(t, q, Event{ID: "x", Namespace: "n"})
			ls := leaseAll(t, q, "h", 1, "n")
			reason := strings.Repeat("é", 3000) // 2 bytes each
			if _, err := q.Nack(context.Background(), "h", []LeaseRef{{ID: "x", Attempt: ls[0].Attempt}}, 0, reason); err != nil {
				t.Fatal(err)
			}
			dl := leaseAll(t, q, "h", 1, DeadLetterNamespace("n"))
			if len(dl) != 1 {
				t.Fatalf("dead letters: %d", len(dl))
			}
			got := dl[0].Event.Metadata[MetaDeadLetterReason]
			if len(got) != maxNackReason || !strings.HasPrefix(reason, got) || !utf8.ValidString(got) {
				t.Errorf("reason of %d bytes kept as %d bytes (valid UTF-8: %v)", len(reason), len(got), utf8.ValidString(got))
			}
		})
	}
}

func TestMemoryQueueManyEvents(t *testing.T) {
	// No operation is linear in the backlog: 100k events go through in
	// seconds, even under the race detector.
	n := 100_000
	if testing.Short() {
		n = 10_000
	}
	q := NewMemoryQueue(QueueOptions{})
	defer q.Close()
	ctx := context.Background()
	batch := make([]Event, 1000)
	for i := 0; i < n; i += len(batch) {
		for j := range batch {
			batch[j] = Event{Namespace: "n", Data: []byte("x")}
		}
		if _, err := q.Enqueue(ctx, batch); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	total := 0
	for total < n {
		ls := leaseAll(t, q, "h", 500, "n")
		if len(ls) == 0 {
			t.Fatalf("nothing to lease after %d", total)
		}
		// Nack half once, so the ready heap is exercised too.
		var nack, ack []LeaseRef
		for i, l := range ls {
			ref := LeaseRef{ID: l.Event.ID, Attempt: l.Attempt}
			if l.Attempt == 1 && i%2 == 0 {
				nack = append(nack, ref)
			} else {
				ack = append(ack, ref)
			}
		}
		if _, err := q.Nack(ctx, "h", nack, 0, "again"); err != nil {
			t.Fatal(err)
		}
		if _, err := q.Ack(ctx, "h", ack); err != nil {
			t.Fatal(err)
		}
		total += len(ack)
	}
	t.Logf("%d events leased, half nacked once, and acked in %v", n, time.Since(start))
}

// --- memory of a large backlog ------------------------------------------------

// TestQueueBadgerRSS measures the memory of a process holding a backlog of
// 1,000,000 256-byte events in a Badger queue (H3X_RSS=1 to run; it takes
// about a minute). It runs in child processes, so that nothing else of the
// test binary counts: one publishes the backlog and reports its RSS; a
// second opens the directory (a restart) and leases from it.
func TestQueueBadgerRSS(t *testing.T) {
	if os.Getenv(rssChildEnv) != "" {
		rssChild(t)
		return
	}
	if os.Getenv("H3X_RSS") == "" {
		t.Skip("H3X_RSS=1 runs it")
	}
	dir := t.TempDir()
	n := "1000000"
	if s := os.Getenv("H3X_RSS_N"); s != "" {
		n = s
	}
	// The "reopen" child exits without closing the queue, as if killed:
	// the "unclean" one then recounts the backlog at open.
	for _, phase := range []string{"publish", "reopen", "unclean"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestQueueBadgerRSS$", "-test.v")
		cmd.Env = append(os.Environ(), rssChildEnv+"="+phase, "H3X_RSS_DIR="+dir, "H3X_RSS_N="+n)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s child: %v\n%s", phase, err, out)
		}
		sc := bufio.NewScanner(strings.NewReader(string(out)))
		for sc.Scan() {
			if strings.Contains(sc.Text(), "RSS ") || strings.Contains(sc.Text(), "opened in") {
				t.Log(strings.TrimSpace(sc.Text()))
			}
		}
	}
}

const rssChildEnv = "H3X_RSS_CHILD"

func rssChild(t *testing.T) {
	dir := os.Getenv("H3X_RSS_DIR")
	var n int
	fmt.Sscan(os.Getenv("H3X_RSS_N"), &n)
	ctx := context.Background()
	start := time.Now()
	q, err := OpenBadgerQueue(dir, QueueOptions{Durability: DurabilityNoSync})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	t.Logf("%s: opened in %v", os.Getenv(rssChildEnv), time.Since(start))
	switch os.Getenv(rssChildEnv) {
	case "publish":
		start := time.Now()
		queueBenchPrefill(t, q, "bench", n)
		t.Logf("published %d events in %v", n, time.Since(start))
		report := func(when string) {
			runtime.GC()
			t.Logf("RSS %s, %d-event backlog: %s", when, n, procMemory())
		}
		report("right after publishing")
		// Badger's pool of table-builder buffers gives one back every 2 s
		// without flushes or compactions; the trimmer looks every 10 s.
		for i := 1; i <= 4; i++ {
			time.Sleep(10 * time.Second)
			report(fmt.Sprintf("%ds idle", 10*i))
		}
		debug.FreeOSMemory()
		report("after FreeOSMemory")
		if p := os.Getenv("H3X_RSS_HEAPPROFILE"); p != "" {
			f, err := os.Create(p)
			if err == nil {
				pprof.WriteHeapProfile(f)
				f.Close()
			}
		}
	case "reopen", "unclean":
		st, err := q.Stats(ctx, "bench")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("RSS after reopening a %d-event backlog: %s", st[0].Ready, procMemory())
		if os.Getenv(rssChildEnv) == "unclean" {
			// The recount read every table, and Badger replayed and
			// flushed its write-ahead log.
			for i := 1; i <= 3; i++ {
				time.Sleep(10 * time.Second)
				runtime.GC()
				t.Logf("RSS %ds after reopening: %s", 10*i, procMemory())
			}
		}
		for range 10 {
			ls := leaseAll(t, q, "h", 1000, "bench")
			ackAll(t, q, "h", ls)
		}
		runtime.GC()
		t.Logf("RSS after reopening and leasing+acking 10,000 of it: %s", procMemory())
		if p := os.Getenv("H3X_RSS_HEAPPROFILE"); p != "" {
			if f, err := os.Create(p + "." + os.Getenv(rssChildEnv)); err == nil {
				pprof.WriteHeapProfile(f)
				f.Close()
			}
		}
		if os.Getenv(rssChildEnv) == "reopen" {
			os.Exit(0) // no Close: the next open is after a crash
		}
	}
}

// procMemory returns the peak RSS so far (VmHWM), VmRSS and its anonymous
// and file-backed parts.
func procMemory() string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return err.Error()
	}
	var parts []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, k := range []string{"VmHWM:", "VmRSS:", "RssAnon:", "RssFile:"} {
			if strings.HasPrefix(l, k) {
				parts = append(parts, strings.Join(strings.Fields(l), " "))
			}
		}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	parts = append(parts, fmt.Sprintf("Go heap in use: %d MB", ms.HeapInuse>>20))
	return strings.Join(parts, ", ")
}

func TestBadgerQueueBallast(t *testing.T) {
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	path := filepath.Join(dir, ballastName)
	fi, err := os.Stat(path)
	if err != nil || fi.Size() != q.ballast.size {
		t.Fatalf("ballast: %v, %v; want %d bytes", fi, err, q.ballast.size)
	}
	publishTest(t, q, Event{ID: "a", Namespace: "n"})
	ls := leaseAll(t, q, "h", 1, "n")
	setFree := fakeDiskFree(q)
	// Someone else filled the disk and stopped: the ballast goes, and every
	// write is refused until there is room to make it again.
	setFree(1 << 20)
	waitFor(t, func() bool { _, err := os.Stat(path); return errors.Is(err, os.ErrNotExist) })
	setFree(q.reserve/2 + 1<<20) // acks alone would be written at this level
	ack := func() error {
		_, err := q.Ack(context.Background(), "h", []LeaseRef{{ID: ls[0].Event.ID, Attempt: ls[0].Attempt}})
		return err
	}
	var e *Error
	if err := ack(); !errors.As(err, &e) || !e.Temporary() || !strings.Contains(e.Message, "disk full") {
		t.Fatalf("ack with the ballast released: %v, want a retryable disk-full error", err)
	}
	setFree(1 << 40)
	if err := ack(); err != nil {
		t.Fatalf("ack once the space is back: %v", err)
	}
	waitFor(t, func() bool { fi, err := os.Stat(path); return err == nil && fi.Size() == q.ballast.size })
}

// waitFor polls cond every 10 ms for at most 5 s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for range 500 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not met within 5 s")
}

// The memory queue copies a leased event's Data and Metadata (outside its
// lock): a consumer that modifies a delivery does not change the stored
// event, which a redelivery returns intact.
func TestMemoryQueueLeaseCopiesEvent(t *testing.T) {
	q := NewMemoryQueue(QueueOptions{})
	defer q.Close()
	ctx := context.Background()
	if _, err := q.Enqueue(ctx, []Event{{ID: "e1", Namespace: "ns", Data: []byte("data"), Metadata: map[string]string{"k": "v"}}}); err != nil {
		t.Fatal(err)
	}
	req := LeaseRequest{Holder: "h", Namespaces: []string{"ns"}, Limit: 1}
	got, err := q.Lease(ctx, req)
	if err != nil || len(got) != 1 {
		t.Fatalf("lease: %v, %d", err, len(got))
	}
	got[0].Event.Data[0] = 'X'
	got[0].Event.Metadata["k"] = "changed"
	if _, err := q.Nack(ctx, "h", []LeaseRef{{ID: "e1", Namespace: "ns", Attempt: 1}}, 0, "again"); err != nil {
		t.Fatal(err)
	}
	again, err := q.Lease(ctx, req)
	if err != nil || len(again) != 1 {
		t.Fatalf("second lease: %v, %d", err, len(again))
	}
	if ev := again[0].Event; string(ev.Data) != "data" || ev.Metadata["k"] != "v" {
		t.Fatalf("redelivered %q %v, want the stored event", ev.Data, ev.Metadata)
	}
}

// storedKeys counts the keys of kind (keyEvent, keyAcks) of namespace ns in a
// closed queue's directory.
func storedKeys(t *testing.T, dir string, kind byte, ns string) int {
	return storedPrefix(t, dir, nsPrefix(kind, ns))
}

// storedPrefix counts the keys with prefix in a closed queue's directory.
func storedPrefix(t *testing.T, dir string, prefix []byte) int {
	t.Helper()
	n := 0
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				n++
			}
			return nil
		})
	})
	return n
}

// withStoredDB opens a closed queue's directory with Badger for f.
func withStoredDB(t *testing.T, dir string, f func(db *badger.DB) error) {
	t.Helper()
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := f(db); err != nil {
		t.Fatal(err)
	}
}

// setStored sets key to val in a closed queue's directory.
func setStored(t *testing.T, dir string, key, val []byte) {
	t.Helper()
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.Update(func(txn *badger.Txn) error { return txn.Set(key, val) })
	})
}

// checkStoredFormat checks that a closed queue's directory is of the
// current storage format.
func checkStoredFormat(t *testing.T, dir string) {
	t.Helper()
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.View(func(txn *badger.Txn) error {
			item, err := txn.Get(metaFormat)
			if err != nil {
				return err
			}
			v, err := item.ValueCopy(nil)
			if err == nil && !bytes.Equal(v, []byte{storageFormat}) {
				t.Errorf("format after opening: %v, want %d", v, storageFormat)
			}
			return err
		})
	})
}

// reopenTestBadger closes q and opens dir again.
func reopenTestBadger(t *testing.T, q *badgerQueue, dir string, opts QueueOptions) *badgerQueue {
	t.Helper()
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	return openTestBadger(t, dir, opts)
}

func TestBadgerQueueChunks(t *testing.T) {
	// The events one Enqueue adds to a namespace are one stored chunk;
	// acks are kept per chunk (and survive a reopen); a chunk goes once
	// all its events are settled, dead letters included.
	dir := t.TempDir()
	opts := QueueOptions{MaxAttempts: 2}
	q := openTestBadger(t, dir, opts)
	var evs []Event
	for i := range 10 {
		evs = append(evs, Event{ID: fmt.Sprintf("n%d", i), Namespace: "n"}, Event{ID: fmt.Sprintf("m%d", i), Namespace: "m"})
	}
	publishTest(t, q, evs...)
	publishTest(t, q, Event{ID: "n10", Namespace: "n"})
	ls := leaseAll(t, q, "h", 6, "n")
	ackAll(t, q, "h", []Lease{ls[1], ls[3], ls[5]})
	// n0 goes to the dead-letter namespace after its second attempt. (The
	// others stay below the maximum: a delivery at the maximum whose lease
	// a reopen cuts off is dead-lettered too, see TestMaxAttemptsAcrossReopen.)
	for attempt := 1; attempt <= 2; attempt++ {
		if attempt == 2 {
			if again := leaseAll(t, q, "h", 1, "n"); len(again) != 1 || again[0].Event.ID != "n0" {
				t.Fatalf("lease after the nack: %+v", again)
			}
		}
		if res, err := q.Nack(context.Background(), "h", []LeaseRef{{ID: "n0", Attempt: attempt}}, 0, "bad"); err != nil || res[0].Status != SettleOK {
			t.Fatalf("Nack: %+v %v", res, err)
		}
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if n := storedKeys(t, dir, keyEvent, "n"); n != 2 {
		t.Errorf("namespace n: %d chunks stored, want 2 (one per Enqueue)", n)
	}
	if n := storedKeys(t, dir, keyEvent, "m"); n != 1 {
		t.Errorf("namespace m: %d chunks stored, want 1", n)
	}
	if n := storedKeys(t, dir, keyAcks, "n"); n != 1 {
		t.Errorf("namespace n: %d ack records, want 1", n)
	}

	q = openTestBadger(t, dir, opts)
	// n2 and n4 were delivered before the reopen and are settleable; the
	// rest comes in order.
	ackAll(t, q, "again", []Lease{{Event: Event{ID: "n2"}, Attempt: 1}})
	got := leaseAll(t, q, "h2", 100, "n")
	var ids []string
	for _, l := range got {
		ids = append(ids, l.Event.ID)
	}
	if want := "n4,n6,n7,n8,n9,n10"; strings.Join(ids, ",") != want {
		t.Fatalf("after reopen leased %v, want %s", ids, want)
	}
	ackAll(t, q, "h2", got)
	dl := leaseAll(t, q, "d", 10, "n"+DeadLetterSuffix)
	if len(dl) != 1 || dl[0].Event.ID != "n0" {
		t.Fatalf("dead letters: %+v", dl)
	}
	ackAll(t, q, "d", dl)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"n", "n" + DeadLetterSuffix} {
		if n := storedKeys(t, dir, keyEvent, ns) + storedKeys(t, dir, keyAcks, ns); n != 0 {
			t.Errorf("namespace %s: %d keys left after every event was settled", ns, n)
		}
	}
	if n := storedKeys(t, dir, keyEvent, "m"); n != 1 {
		t.Errorf("namespace m: %d chunks stored, want 1", n)
	}
}

func TestBadgerQueueFormat1Refused(t *testing.T) {
	dir := t.TempDir()
	setStored(t, dir, metaFormat, []byte{1})
	q, err := OpenBadgerQueue(dir, QueueOptions{})
	if err == nil {
		q.Close()
		t.Fatal("a format 1 directory opened")
	}
	if !strings.Contains(err.Error(), "storage format 1") {
		t.Errorf("error %q does not name the format", err)
	}
}

func TestChunkCodec(t *testing.T) {
	ev1 := Event{ID: "a", Type: "t", Data: []byte("x")}
	ev2 := Event{ID: "b", Metadata: map[string]string{"k": "v"}}
	v1, v2 := encodeEvent(nil, &ev1, 1), encodeEvent(nil, &ev2, 2)
	b := encodeChunk(nil, []uint64{7, 9}, [][]byte{v1, v2})
	seqs, err := chunkSeqs(b, 7)
	if err != nil || len(seqs) != 2 || seqs[0] != 7 || seqs[1] != 9 {
		t.Fatalf("chunkSeqs: %v %v", seqs, err)
	}
	v, err := chunkEvent(b, 7, 9)
	if err != nil || string(v) != string(v2) {
		t.Fatalf("chunkEvent 9: %v", err)
	}
	if _, err := chunkEvent(b, 7, 8); !errors.Is(err, badger.ErrKeyNotFound) {
		t.Errorf("chunkEvent 8: %v, want not found", err)
	}
	for i := range len(b) {
		if _, err := chunkSeqs(b[:i], 7); err == nil {
			t.Errorf("truncated to %d bytes: no error", i)
		}
	}
	ch := newStoredChunk(nil, 7, seqs, nil, nil)
	if !ch.settle(9, false) || ch.settle(9, false) || ch.live != 1 || !ch.isSettled(9) || ch.isSettled(7) {
		t.Errorf("settle: %+v", ch)
	}
	if again := newStoredChunk(nil, 7, seqs, ch.acked, nil); again.live != 1 {
		t.Errorf("chunk with its ack record: live %d, want 1", again.live)
	}
	if again := newStoredChunk(nil, 7, seqs, ch.acked, []uint64{7}); again.live != 0 {
		t.Errorf("chunk with its ack record and a moved event: live %d, want 0", again.live)
	}
	ch.settle(7, true)
	if got := ch.movedSeqs(); len(got) != 1 || got[0] != 7 || ch.live != 0 {
		t.Errorf("moved: %v, live %d", got, ch.live)
	}
	ch.unsettle(7)
	ch.unsettle(9)
	if ch.live != 2 || ch.isSettled(7) || ch.isSettled(9) {
		t.Errorf("unsettle: %+v", ch)
	}
	k := movedKey(nil, "orders", 7, 9)
	if ns, first, seq, ok := decodeMovedKey(k); !ok || ns != "orders" || first != 7 || seq != 9 {
		t.Errorf("decodeMovedKey: %q %d %d %v", ns, first, seq, ok)
	}
}

func TestBadgerChunkFitsATableBlock(t *testing.T) {
	// A large Enqueue is stored as chunks of at most maxChunkBytes (a single
	// larger event aside), each of which fits in a table block: Badger's
	// table builders then never grow a block, which made them hold two to
	// three times the bytes of their tables.
	if bs := badgerOptions(t.TempDir(), QueueOptions{}).BlockSize; bs < maxChunkBytes+1024 {
		t.Fatalf("BlockSize %d: a chunk of %d bytes and its key do not fit in a block", bs, maxChunkBytes)
	}
	dir := t.TempDir()
	q := openTestBadger(t, dir, QueueOptions{})
	q.segs.disabled.Store(true) // the chunks in Badger, as when no segment can be written
	data := bytes.Repeat([]byte{'x'}, 1000)
	var evs []Event
	for i := range 1000 {
		evs = append(evs, Event{ID: fmt.Sprintf("e%d", i), Namespace: "n", Data: data})
	}
	big := Event{ID: "big", Namespace: "n", Data: bytes.Repeat([]byte{'y'}, 3*maxChunkBytes/2)}
	publishTest(t, q, append(evs, big)...)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	var sizes []int
	withStoredDB(t, dir, func(db *badger.DB) error {
		return db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: nsPrefix(keyEvent, "n")})
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				sizes = append(sizes, int(it.Item().ValueSize()))
			}
			return nil
		})
	})
	if len(sizes) < 8 {
		t.Fatalf("%d chunks of sizes %v for 1 MB of events, want at least 8", len(sizes), sizes)
	}
	for i, n := range sizes[:len(sizes)-1] {
		if n > maxChunkBytes {
			t.Errorf("chunk %d of %d: %d bytes, above maxChunkBytes (%d)", i, len(sizes), n, maxChunkBytes)
		}
	}
	if last := sizes[len(sizes)-1]; last < 3*maxChunkBytes/2 {
		t.Errorf("the large event's chunk: %d bytes, want it whole", last)
	}
	q = openTestBadger(t, dir, QueueOptions{})
	ls := leaseAll(t, q, "h", 1001, "n")
	if len(ls) != 1001 || ls[1000].Event.ID != "big" || !bytes.Equal(ls[1000].Event.Data, big.Data) {
		t.Fatalf("read back %d events", len(ls))
	}
	for i, l := range ls[:1000] {
		if l.Event.ID != evs[i].ID || !bytes.Equal(l.Event.Data, data) {
			t.Fatalf("event %d: %s, want %s", i, l.Event.ID, evs[i].ID)
		}
	}
}

package h3x

import (
	"hash/maphash"
	"log/slog"
	"math/bits"
	"time"
)

// dedupMaxIDs bounds the IDs the dedup index remembers (about 20 bytes
// each, so 40–60 MB at most). A queue publishing faster than
// dedupMaxIDs per DedupWindow (17,000 events/s for the default 2 minutes)
// forgets the oldest IDs early: its effective window shrinks to
// dedupMaxIDs / rate. A retry that arrives after that is stored again,
// which at-least-once delivery tolerates (a duplicate, never a loss); an ID
// is never reported as a duplicate wrongly.
var dedupMaxIDs = 1 << 21

// dedupIndex remembers the IDs published within the dedup window.
//
// It keeps 80-bit fingerprints, not the IDs: two keyed hashes of the whole
// ID (with seeds drawn per process, so no publisher can aim at a
// collision), 64 bits of one and 16 of the other. A false duplicate (two
// IDs with one fingerprint) has a chance of about n/2^80 per publish, for
// n remembered IDs: about 10^-18 with 2 million, never in practice.
// (The bits of a UUID are not used as they are: publishers make UUID-shaped
// IDs of their own, sequential or time-ordered, which differ only in a few
// bits; taking 96 of the 128 made such IDs false duplicates.) Each entry
// is one slot of a dedupTable: 14 bytes, about 21 with the free slots
// (a Go map of 16-byte entries took 24–37 bytes an entry, 36 at the sizes
// a busy index has).
//
// Entries live in generations of half a window or a quarter of the
// capacity each, whichever fills first (a lookup probes three at low rates,
// five or six at the capacity); a generation is dropped whole once its
// newest entry is older than the window, or when the index is over
// capacity, so expiry costs nothing per entry. Not safe for concurrent use (the core's mutex
// guards it).
type dedupIndex struct {
	window int64 // in ticks
	span   int64 // generation span, in ticks
	base   int64 // Unix nanoseconds of tick 0
	max    int
	n      int
	gens   []*dedupGen // oldest first
	seed1  maphash.Seed
	seed2  maphash.Seed
	log    *slog.Logger
	warned bool

	readSum uint64 // a sum of what readAhead read (unused: it keeps the loads)
}

type dedupGen struct {
	start, last int64      // ticks
	t           dedupTable // emptied once the generation is dropped (expired or evicted)
}

const (
	dedupTick    = int64(100 * time.Millisecond)
	dedupGoneBit = 1 << 31
	dedupTimeMax = dedupGoneBit - 1
)

func newDedupIndex(window time.Duration, maxIDs int, log *slog.Logger) *dedupIndex {
	w := max(int64(window)/dedupTick, 1)
	return &dedupIndex{
		window: w,
		span:   max(w/2, 1),
		// Leave room below now for IDs loaded from storage at open.
		base:  time.Now().UnixNano() - int64(window) - int64(time.Minute),
		max:   maxIDs,
		seed1: maphash.MakeSeed(),
		seed2: maphash.MakeSeed(),
		log:   log,
	}
}

func (d *dedupIndex) tick(unixNano int64) int64 {
	t := (unixNano - d.base) / dedupTick
	return min(max(t, 0), dedupTimeMax)
}

// key returns id's fingerprint: the table key (never 0) and 16 more bits.
func (d *dedupIndex) key(id string) (uint64, uint64) {
	return max(maphash.String(d.seed1, id), 1), maphash.String(d.seed2, id) >> 48
}

// expire drops the generations that ended a window ago.
func (d *dedupIndex) expire(now int64) {
	k := 0
	for k < len(d.gens) && now-d.gens[k].last >= d.window {
		d.n -= d.gens[k].t.n
		d.gens[k].t = dedupTable{} // entries still pointing at it keep no memory alive
		d.gens[k] = nil
		k++
	}
	if k > 0 {
		d.gens = append(d.gens[:0], d.gens[k:]...)
	}
}

// find returns the generation and slot holding id's live entry.
func (d *dedupIndex) find(id string, now int64) (*dedupGen, int, bool) {
	k, fp := d.key(id)
	return d.findKey(k, fp, now)
}

func (d *dedupIndex) findKey(k, fp uint64, now int64) (*dedupGen, int, bool) {
	for i := len(d.gens) - 1; i >= 0; i-- {
		g := d.gens[i]
		j, ok := g.t.find(k)
		if !ok || uint64(g.t.fps[j]) != fp {
			continue
		}
		if now-int64(g.t.vals[j]&dedupTimeMax) < d.window {
			return g, j, true
		}
		return nil, 0, false // the newest entry has expired
	}
	return nil, 0, false
}

// dedupKey is an ID's fingerprint, computed once for seen and add.
type dedupKey struct{ k, fp uint64 }

func (d *dedupIndex) keyOf(id string) dedupKey {
	k, fp := d.key(id)
	return dedupKey{k, fp}
}

// seen reports whether the ID of key was published within the window before
// unixNano.
func (d *dedupIndex) seen(key dedupKey, unixNano int64) bool {
	now := d.tick(unixNano)
	d.expire(now)
	_, _, ok := d.findKey(key.k, key.fp, now)
	return ok
}

// stored reports whether id was published within the window and has not
// been acked or dead-lettered since (as far as this process knows).
func (d *dedupIndex) stored(id string, unixNano int64) bool {
	now := d.tick(unixNano)
	g, j, ok := d.find(id, now)
	return ok && g.t.vals[j]&dedupGoneBit == 0
}

// add records id as published at unixNano.
func (d *dedupIndex) add(id string, unixNano int64) { d.addKey(d.keyOf(id), unixNano) }

// addKey records the ID of key as published at unixNano, and returns the
// generation that holds it (for setGoneIn).
func (d *dedupIndex) addKey(key dedupKey, unixNano int64) *dedupGen {
	t := d.tick(unixNano)
	d.expire(t)
	var g *dedupGen
	if n := len(d.gens); n > 0 && t-d.gens[n-1].start < d.span && d.gens[n-1].t.n < max(d.max/4, 1) {
		g = d.gens[n-1] // also for an older time (loading from storage)
	} else {
		g = &dedupGen{start: t}
		d.gens = append(d.gens, g)
	}
	if g.t.put(key.k, uint16(key.fp), uint32(t)) {
		d.n++
	}
	g.last = max(g.last, t)
	for d.n > d.max && len(d.gens) > 1 {
		old := d.gens[0]
		d.n -= old.t.n
		old.t = dedupTable{}
		d.gens = d.gens[1:]
		if !d.warned {
			d.warned = true
			d.log.Warn("h3x: the dedup index is full; the dedup window is shorter than configured at this publish rate",
				"max_ids", d.max, "window_kept", time.Duration((t-d.gens[0].start)*dedupTick))
		}
	}
	return g
}

// setGoneIn sets or clears the gone mark of the ID of key in g, the
// generation addKey put it in: no probing of the others. An entry gone
// with its generation needs no mark.
func (d *dedupIndex) setGoneIn(g *dedupGen, key dedupKey, gone bool) {
	if g == nil {
		d.setGone(key, gone)
		return
	}
	j, ok := g.t.find(key.k) // not found in a dropped generation (empty)
	if !ok || uint64(g.t.fps[j]) != key.fp {
		return
	}
	g.t.setGone(j, gone)
}

// setGone sets or clears the gone mark of the ID of key (its event left
// the queue: acked or dead-lettered).
func (d *dedupIndex) setGone(key dedupKey, gone bool) {
	d.setGoneAt(key, gone, d.tick(time.Now().UnixNano()))
}

// setGoneAt is setGone with the clock read by the caller: markAllGone
// reads it once for all its IDs whose generation is not known, which are
// most of a backlog's (the Badger queue's read-ahead makes entries
// without it).
func (d *dedupIndex) setGoneAt(key dedupKey, gone bool, now int64) {
	if g, j, ok := d.findKey(key.k, key.fp, now); ok {
		g.t.setGone(j, gone)
	}
}

// forgetKey removes the ID of key (its publish did not become durable).
func (d *dedupIndex) forgetKey(key dedupKey) {
	now := d.tick(time.Now().UnixNano())
	if g, j, ok := d.findKey(key.k, key.fp, now); ok {
		g.t.remove(j)
		d.n--
	}
}

// goneMark is an ID for markAllGone: its key, and the generation addKey put
// it in if known.
type goneMark struct {
	key dedupKey
	gen *dedupGen
}

// The tables are megabytes large and a lookup starts at a random slot, so
// each is a cache miss (and a TLB miss), which the processor waits for one
// lookup after the other when a loop does more between them than look up.
// The calls that look up many IDs at once (markAllGone, keysOf) first only
// read each ID's home slot in the tables it may be in: a short loop of
// independent loads, whose misses the processor overlaps. The lookups then
// find those slots in the cache. (In the consume path's profile, marking
// acked IDs one at a time took 10% of the server's CPU.)

// readAhead reads k's home slot in g, or in every generation if g is nil,
// and returns a sum of what it read.
func (d *dedupIndex) readAhead(k uint64, g *dedupGen) uint64 {
	if g != nil {
		return g.t.touchHome(k)
	}
	var sum uint64
	for _, g := range d.gens {
		sum += g.t.touchHome(k)
	}
	return sum
}

// markAllGone sets the gone marks of many IDs, as setGoneIn does for each.
func (d *dedupIndex) markAllGone(marks []goneMark) {
	var sum uint64
	for _, m := range marks {
		sum += d.readAhead(m.key.k, m.gen)
	}
	d.readSum = sum // keeps the loads
	now := d.tick(time.Now().UnixNano())
	for _, m := range marks {
		if m.gen != nil {
			d.setGoneIn(m.gen, m.key, true)
		} else {
			d.setGoneAt(m.key, true, now)
		}
	}
}

// keysOf appends the keys of evs' IDs to dst, for seen and addKey, and reads
// their slots ahead.
func (d *dedupIndex) keysOf(dst []dedupKey, evs []Event) []dedupKey {
	start := len(dst)
	for i := range evs {
		dst = append(dst, d.keyOf(evs[i].ID))
	}
	var sum uint64
	for _, key := range dst[start:] {
		sum += d.readAhead(key.k, nil)
	}
	d.readSum = sum
	return dst
}

// dedupTable is an open-addressing hash table with linear probing, from a
// 64-bit key (never 0: 0 marks a free slot) to 16 more fingerprint bits and
// a value (the gone bit and the publish tick), in three arrays: 14 bytes a
// slot. A key's home slot is its high bits scaled to the table's size, so
// the size need not be a power of two: the table grows by half when it is
// 4/5 full, keeping it 53–80% full (a lookup of a missing key reads about
// a dozen keys, two cache lines, at the fullest). A deleted entry's slot is
// refilled by moving later entries back (no tombstones).
type dedupTable struct {
	keys []uint64
	fps  []uint16
	vals []uint32
	n    int
}

const dedupTableMin = 64

// home returns the slot where probing for k starts.
func (t *dedupTable) home(k uint64) int {
	hi, _ := bits.Mul64(k, uint64(len(t.keys)))
	return int(hi)
}

// touchHome reads k's home slot (nothing for an empty table) and returns
// a sum of what it read (dedupIndex.readAhead).
func (t *dedupTable) touchHome(k uint64) uint64 {
	if len(t.keys) == 0 {
		return 0
	}
	j := t.home(k)
	return t.keys[j] + uint64(t.fps[j]) + uint64(t.vals[j])
}

// find returns the slot holding k.
func (t *dedupTable) find(k uint64) (int, bool) {
	if len(t.keys) == 0 {
		return 0, false
	}
	for j := t.home(k); ; {
		switch t.keys[j] {
		case k:
			return j, true
		case 0:
			return 0, false
		}
		if j++; j == len(t.keys) {
			j = 0
		}
	}
}

// put stores k's entry, replacing the one stored for k (a 64-bit collision
// between two IDs forgets the first: a missed duplicate, never a false
// one). It reports whether the entry is new.
func (t *dedupTable) put(k uint64, fp uint16, val uint32) bool {
	if (t.n+1)*5 > len(t.keys)*4 {
		t.grow()
	}
	j := t.home(k)
	for t.keys[j] != 0 && t.keys[j] != k {
		if j++; j == len(t.keys) {
			j = 0
		}
	}
	added := t.keys[j] == 0
	if added {
		t.n++
	}
	t.keys[j], t.fps[j], t.vals[j] = k, fp, val
	return added
}

// grow moves the entries to a table half as large again.
func (t *dedupTable) grow() {
	old := *t
	size := max(dedupTableMin, len(old.keys)+len(old.keys)/2)
	*t = dedupTable{keys: make([]uint64, size), fps: make([]uint16, size), vals: make([]uint32, size)}
	for i, k := range old.keys {
		if k != 0 {
			t.put(k, old.fps[i], old.vals[i])
		}
	}
}

func (t *dedupTable) setGone(j int, gone bool) {
	if gone {
		t.vals[j] |= dedupGoneBit
	} else {
		t.vals[j] &^= dedupGoneBit
	}
}

// remove deletes the entry in slot i: each later entry of the run that
// would no longer be found (its home slot is not between the hole and it)
// moves into the hole, which moves on to where it was.
func (t *dedupTable) remove(i int) {
	size := len(t.keys)
	for j := i; ; {
		if j++; j == size {
			j = 0
		}
		k := t.keys[j]
		if k == 0 {
			break
		}
		// Cyclic distances from the home slot: the entry at j may fill the
		// hole at i when i is no further from its home than j is.
		h := t.home(k)
		if (i-h+size)%size <= (j-h+size)%size {
			t.keys[i], t.fps[i], t.vals[i] = k, t.fps[j], t.vals[j]
			i = j
		}
	}
	t.keys[i], t.fps[i], t.vals[i] = 0, 0, 0
	t.n--
}

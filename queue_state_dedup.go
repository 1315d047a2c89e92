package h3x

import (
	"hash/maphash"
	"log/slog"
	"time"
)

// dedupMaxIDs bounds the IDs the dedup index remembers (about 30 bytes
// each, so about 60 MB at most). A queue publishing faster than
// dedupMaxIDs per DedupWindow (17,000 events/s for the default 2 minutes)
// forgets the oldest IDs early: its effective window shrinks to
// dedupMaxIDs / rate. A retry that arrives after that is stored again,
// which at-least-once delivery tolerates (a duplicate, never a loss); an ID
// is never reported as a duplicate wrongly.
var dedupMaxIDs = 1 << 21

// dedupIndex remembers the IDs published within the dedup window.
//
// It keeps 96-bit fingerprints, not the IDs: two keyed 64-bit hashes of
// the whole ID (with seeds drawn per process, so no publisher can aim at a
// collision). A false duplicate (two IDs with one fingerprint) has a chance
// of about n/2^90 per publish, for n remembered IDs: never, in practice.
// (The bits of a UUID are not used as they are: publishers make UUID-shaped
// IDs of their own, sequential or time-ordered, which differ only in a few
// bits; taking 96 of the 128 made such IDs false duplicates.) Each entry
// costs one map slot of 16 bytes (plus the map's overhead): the first 64
// bits are the key; the value packs the other 32, a "gone" bit (the event
// was acked or dead-lettered) and the publish time in tenths of a second.
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
}

type dedupGen struct {
	start, last int64             // ticks
	m           map[uint64]uint64 // nil once the generation is dropped (expired or evicted)
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

// key returns id's fingerprint: the map key and the 32 bits kept in the value.
func (d *dedupIndex) key(id string) (uint64, uint64) {
	return maphash.String(d.seed1, id), maphash.String(d.seed2, id) >> 32
}

// expire drops the generations that ended a window ago.
func (d *dedupIndex) expire(now int64) {
	k := 0
	for k < len(d.gens) && now-d.gens[k].last >= d.window {
		d.n -= len(d.gens[k].m)
		d.gens[k].m = nil // entries still pointing at it keep no IDs alive
		d.gens[k] = nil
		k++
	}
	if k > 0 {
		d.gens = append(d.gens[:0], d.gens[k:]...)
	}
}

// find returns the generation and value holding id's live entry.
func (d *dedupIndex) find(id string, now int64) (*dedupGen, uint64, uint64, bool) {
	k, fp := d.key(id)
	return d.findKey(k, fp, now)
}

func (d *dedupIndex) findKey(k, fp uint64, now int64) (*dedupGen, uint64, uint64, bool) {
	for i := len(d.gens) - 1; i >= 0; i-- {
		g := d.gens[i]
		v, ok := g.m[k]
		if !ok || v>>32 != fp {
			continue
		}
		if now-int64(v&dedupTimeMax) < d.window {
			return g, k, v, true
		}
		return nil, 0, 0, false // the newest entry has expired
	}
	return nil, 0, 0, false
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
	_, _, _, ok := d.findKey(key.k, key.fp, now)
	return ok
}

// stored reports whether id was published within the window and has not
// been acked or dead-lettered since (as far as this process knows).
func (d *dedupIndex) stored(id string, unixNano int64) bool {
	now := d.tick(unixNano)
	_, _, v, ok := d.find(id, now)
	return ok && v&dedupGoneBit == 0
}

// add records id as published at unixNano.
func (d *dedupIndex) add(id string, unixNano int64) { d.addKey(d.keyOf(id), unixNano) }

// addKey records the ID of key as published at unixNano, and returns the
// generation that holds it (for setGoneIn).
func (d *dedupIndex) addKey(key dedupKey, unixNano int64) *dedupGen {
	t := d.tick(unixNano)
	d.expire(t)
	var g *dedupGen
	if n := len(d.gens); n > 0 && t-d.gens[n-1].start < d.span && len(d.gens[n-1].m) < max(d.max/4, 1) {
		g = d.gens[n-1] // also for an older time (loading from storage)
	} else {
		g = &dedupGen{start: t, m: make(map[uint64]uint64)}
		d.gens = append(d.gens, g)
	}
	k, fp := key.k, key.fp
	if _, ok := g.m[k]; !ok {
		d.n++
	}
	g.m[k] = fp<<32 | uint64(t)
	g.last = max(g.last, t)
	for d.n > d.max && len(d.gens) > 1 {
		old := d.gens[0]
		d.n -= len(old.m)
		old.m = nil
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
// generation addKey put it in: no probing. An entry gone with its
// generation needs no mark.
func (d *dedupIndex) setGoneIn(g *dedupGen, key dedupKey, gone bool) {
	if g == nil {
		d.setGone(key, gone)
		return
	}
	v, ok := g.m[key.k] // not found in a dropped generation (nil map)
	if !ok || v>>32 != key.fp {
		return
	}
	if gone {
		v |= dedupGoneBit
	} else {
		v &^= dedupGoneBit
	}
	g.m[key.k] = v
}

// setGone sets or clears the gone mark of the ID of key (its event left
// the queue: acked or dead-lettered).
func (d *dedupIndex) setGone(key dedupKey, gone bool) {
	now := d.tick(time.Now().UnixNano())
	g, k, v, ok := d.findKey(key.k, key.fp, now)
	if !ok {
		return
	}
	if gone {
		v |= dedupGoneBit
	} else {
		v &^= dedupGoneBit
	}
	g.m[k] = v
}

// forgetKey removes the ID of key (its publish did not become durable).
func (d *dedupIndex) forgetKey(key dedupKey) {
	now := d.tick(time.Now().UnixNano())
	if g, k, _, ok := d.findKey(key.k, key.fp, now); ok {
		delete(g.m, k)
		d.n--
	}
}

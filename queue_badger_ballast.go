package h3x

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// A disk filled by another process must not crash the server. Badger
// writes its memtable WAL (.mem), its value log (.vlog) and the tables it
// flushes and compacts through memory maps of files it sized with truncate
// (sparse files). When the filesystem is full, the page fault that would
// allocate a block of such a file cannot be served and the process gets
// SIGBUS, which Go cannot recover. The queue's free-space checks (at each
// write group; a reading well above the reserve stands for 10 ms, see
// freeSpaceReader) protect against its own writes, not against another process
// filling the disk between two checks. Two measures narrow that window:
//
//   - Preallocation: the newest .mem and .vlog files are fallocate'd as soon
//     as they appear (checked every ballastInterval while the queue writes,
//     and at once when the first write group after a quiet spell
//     completes: Badger makes a new log file only in a write), so later
//     writes into them need no new blocks.
//   - A ballast file (ballastName) in the data directory, made at open:
//     when free space is below half the reserve and has stopped changing
//     (ballastStable checks: whoever filled the disk has stopped), and at
//     Close when free space is low, it is deleted, which gives Badger's
//     in-flight work (memtable flushes, the tables of a compaction, the
//     flush at Close) room; every write (publishes and acks) is then
//     refused with the retryable disk-full error until the space returns
//     and the ballast is made again.
//
// What remains: a table file written by a flush or compaction is created
// and filled in one Badger call, so it cannot be preallocated; a process
// that keeps filling the disk takes the ballast's space too. The data
// directory belongs on its own filesystem (or under a quota) for a full
// guarantee.

const (
	ballastName = "h3x-ballast"
	// ballastInterval is how often the monitor checks while the queue
	// writes, and for ballastQuiet after its last write and after the open
	// (Badger's flushes and compactions follow the writes).
	ballastInterval = 20 * time.Millisecond
	// ballastStable is how many checks in a row must find the same low
	// free space before the ballast goes: released while another process
	// is still writing, its space would only go to that process.
	ballastStable = 5
	// ballastVlogSlack is how far past ValueLogFileSize a value-log file
	// is preallocated: Badger rotates after the entry that crosses it.
	ballastVlogSlack = 8 << 20
)

// Variables for tests (a ballast takes their values when it starts).
var (
	// ballastQuiet is how long after the queue's last write the monitor
	// keeps checking every ballastInterval.
	ballastQuiet = 10 * time.Second
	// ballastIdleInterval is how often it checks once the queue has
	// written nothing for ballastQuiet. An idle queue's Badger writes
	// nothing and makes no new log file, so the monitor only watches the
	// free space, for the ballast to be gone before the next write; its 50
	// checks a second were three quarters of an idle server's CPU.
	ballastIdleInterval = 250 * time.Millisecond
)

// ballast keeps space in reserve for Badger and preallocates its newest
// log files.
type ballast struct {
	path       string
	size       int64
	low        uint64 // below this much free space, the ballast goes
	bdir, vdir string
	vlogMax    int64
	free       func() (uint64, error)
	writes     func() int64 // the queue's write groups so far: its activity
	inFlight   func() bool  // whether groups are in Badger's hands (a write may be stalled)
	log        *slog.Logger

	// idle is set while the monitor checks every ballastIdleInterval; kick
	// (one slot) then wakes it when a group completes (wake): the first
	// write after a quiet spell is when Badger rotates a full memtable into
	// a new .mem file, which is preallocated at once, not a tick later.
	idle atomic.Bool
	kick chan struct{}

	out  atomic.Bool // released because the disk filled; writes refused
	stop chan struct{}
	done chan struct{}

	present  bool // monitor-owned below
	lastFree uint64
	stable   int       // checks in a row that found lastFree
	memFid   int       // the newest files already preallocated
	seen     int64     // writes() at the last check
	activeAt time.Time // when a check last saw writes() change or groups in flight
	quiet    time.Duration
	idleTick time.Duration
	vlogFid  int
	warned   bool
	noAlloc  bool // fallocate unsupported here: no ballast, no preallocation
	once     sync.Once
}

// startBallast makes the ballast and starts its monitor; a no-op where free
// space cannot be measured.
func (q *badgerQueue) startBallast(vlogFileSize int64) {
	if _, err := (*q.diskFree.Load())(q.dir); err != nil {
		return
	}
	b := &ballast{
		path:     filepath.Join(q.dir, ballastName),
		size:     max(int64(q.reserve/4), 8<<20),
		low:      q.reserve / 2,
		bdir:     q.bdir,
		vdir:     q.vdir,
		vlogMax:  vlogFileSize + ballastVlogSlack,
		free:     func() (uint64, error) { return (*q.diskFree.Load())(q.dir) },
		writes:   q.statGroups.Load,
		inFlight: func() bool { return q.groupsOut.Load() > 0 },
		log:      q.log,
		kick:     make(chan struct{}, 1),
		quiet:    ballastQuiet,
		idleTick: ballastIdleInterval,
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
		memFid:   -1,
		vlogFid:  -1,
	}
	if fi, err := os.Stat(b.path); err == nil && fi.Size() >= b.size {
		b.present = true
	} else {
		b.tryMake()
	}
	b.preallocate()
	b.seen, b.activeAt = b.writes(), time.Now()
	q.ballast = b
	go b.monitor()
}

// stopBallast stops the monitor; before Badger's final flush it releases
// the ballast if the disk is low.
func (q *badgerQueue) stopBallast() {
	b := q.ballast
	if b == nil {
		return
	}
	b.once.Do(func() { close(b.stop) })
	<-b.done
	b.checkForce(true)
}

// ballastOut returns the disk-full error that refuses every write while the
// ballast is released because the disk filled, until there is room to make
// it again (the monitor then does).
func (q *badgerQueue) ballastOut() error {
	b := q.ballast
	if b == nil || !b.out.Load() {
		return nil
	}
	if free, err := b.free(); err == nil && free >= b.resume() {
		return nil
	}
	return diskFullError("write", fmt.Errorf("the disk of %s filled up; writes resume once %d bytes are free", q.dir, b.resume()))
}

// resume is the free space at which the released ballast is made again.
func (b *ballast) resume() uint64 { return b.low + uint64(b.size) + uint64(b.size)/2 }

func (b *ballast) monitor() {
	defer close(b.done)
	t := time.NewTimer(ballastInterval)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
		case <-b.kick:
		}
		b.check()
		now := time.Now()
		if b.active(now) {
			b.preallocate()
		}
		d := b.interval(now)
		b.idle.Store(d == b.idleTick)
		t.Reset(d)
	}
}

// wake makes an idle monitor check now (the queue completed a write group).
func (b *ballast) wake() {
	if b != nil && b.idle.Load() {
		select {
		case b.kick <- struct{}{}:
		default:
		}
	}
}

// active notes whether the queue wrote since the last check, or has groups
// in Badger's hands (a write stalled by Badger counts as activity), and
// reports whether it was active within ballastQuiet before now.
func (b *ballast) active(now time.Time) bool {
	if w := b.writes(); w != b.seen || b.inFlight() {
		b.seen, b.activeAt = w, now
	}
	return now.Sub(b.activeAt) < b.quiet
}

// interval is the time to the next check: ballastInterval while the queue
// is active (as the last call of active found it), the idle interval once
// it is not.
func (b *ballast) interval(now time.Time) time.Duration {
	if now.Sub(b.activeAt) < b.quiet {
		return ballastInterval
	}
	return b.idleTick
}

// check releases the ballast when free space is low, and makes it again
// once there is room for it above the low mark.
func (b *ballast) check() { b.checkForce(false) }

func (b *ballast) checkForce(force bool) {
	free, err := b.free()
	if err != nil {
		return
	}
	if free == b.lastFree {
		b.stable = min(b.stable+1, ballastStable)
	} else {
		b.lastFree, b.stable = free, 0
	}
	switch {
	case b.present && free < b.low && (force || b.stable >= ballastStable):
		b.out.Store(true) // writes refused from now on
		if err := os.Remove(b.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			b.log.Error("h3x: removing the disk ballast", "path", b.path, "err", err)
			return
		}
		b.present = false
		b.log.Warn("h3x: the disk is full: ballast released, writes refused until space returns",
			"free", free, "ballast", b.size)
	case !b.present && !b.noAlloc && free >= b.resume():
		if b.tryMake() {
			b.out.Store(false)
		}
	}
}

// tryMake creates the ballast with its blocks allocated.
func (b *ballast) tryMake() bool {
	f, err := os.OpenFile(b.path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		b.warnOnce("h3x: creating the disk ballast", err)
		return false
	}
	err = allocateFn(f, b.size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(b.path)
		b.noAlloc = errors.Is(err, errors.ErrUnsupported)
		b.warnOnce("h3x: creating the disk ballast", err)
		return false
	}
	b.present = true
	return true
}

func (b *ballast) warnOnce(msg string, err error) {
	if !b.warned {
		b.warned = true
		b.log.Warn(msg, "path", b.path, "err", err)
	}
}

// preallocate allocates the blocks of the newest .mem and .vlog files (up
// to the size Badger gave them, a value-log file up to vlogMax).
func (b *ballast) preallocate() {
	if b.noAlloc {
		return
	}
	// Badger numbers its log files in sequence: the directories are listed
	// only when the file after the last one preallocated has appeared, not
	// on every tick.
	if b.memFid >= 0 && !fileExists(memFilePath(b.bdir, b.memFid+1)) &&
		b.vlogFid >= 0 && !fileExists(vlogFilePath(b.vdir, b.vlogFid+1)) {
		return
	}
	if mem, err := logFiles(b.bdir, ".mem"); err == nil && len(mem) > 0 && mem[len(mem)-1] != b.memFid {
		fid := mem[len(mem)-1]
		if err := preallocateFile(memFilePath(b.bdir, fid), 1<<62); err == nil {
			b.memFid = fid
		} else if errors.Is(err, errors.ErrUnsupported) {
			b.noAlloc = true
			return
		}
	}
	if vlog, err := logFiles(b.vdir, ".vlog"); err == nil && len(vlog) > 0 && vlog[len(vlog)-1] != b.vlogFid {
		fid := vlog[len(vlog)-1]
		if preallocateFile(vlogFilePath(b.vdir, fid), b.vlogMax) == nil {
			b.vlogFid = fid
		}
	}
}

// allocateFn is allocate, a variable so that tests can make fallocate fail
// (queue_badger_durability_test.go).
var allocateFn = allocate

// preallocateFile allocates the blocks of path's first min(size, limit)
// bytes, without changing its size.
func preallocateFile(path string, limit int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if n := min(fi.Size(), limit); n > 0 {
		return allocateFn(f, n)
	}
	return nil
}

package h3x

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestFreeSpaceReader(t *testing.T) {
	const near = 1000
	errFail := errors.New("statfs failed")
	type call struct {
		advance time.Duration // the clock moves this much first
		dir     string
		free    uint64 // what the filesystem says now
		fail    bool
		reads   bool // whether this call reaches the filesystem
		want    uint64
	}
	tests := []struct {
		name  string
		calls []call
	}{
		{"reused while fresh and well above the reserve", []call{
			{dir: "d", free: 5000, reads: true, want: 5000},
			{advance: time.Millisecond, dir: "d", free: 4000, want: 5000},
			{advance: freeSpaceMaxAge - 2*time.Millisecond, dir: "d", free: 3000, want: 5000},
		}},
		{"read again once old", []call{
			{dir: "d", free: 5000, reads: true, want: 5000},
			{advance: freeSpaceMaxAge, dir: "d", free: 4000, reads: true, want: 4000},
			{advance: time.Millisecond, dir: "d", free: 3000, want: 4000},
		}},
		{"always read near the reserve", []call{
			{dir: "d", free: near - 1, reads: true, want: near - 1},
			{dir: "d", free: 500, reads: true, want: 500},
			{advance: time.Millisecond, dir: "d", free: 5000, reads: true, want: 5000},
			{advance: time.Millisecond, dir: "d", free: 100, want: 5000},
		}},
		{"errors are not kept", []call{
			{dir: "d", fail: true, reads: true},
			{dir: "d", free: 5000, reads: true, want: 5000},
		}},
		{"another directory is read", []call{
			{dir: "d", free: 5000, reads: true, want: 5000},
			{dir: "e", free: 7000, reads: true, want: 7000},
		}},
		{"a clock that goes back reads", []call{
			{dir: "d", free: 5000, reads: true, want: 5000},
			{advance: -time.Millisecond, dir: "d", free: 4000, reads: true, want: 4000},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			now := time.Unix(1e9, 0)
			var free uint64
			var fail bool
			reads := 0
			r := newFreeSpaceReader(func(string) (uint64, error) {
				reads++
				if fail {
					return 0, errFail
				}
				return free, nil
			}, near, func() time.Time { return now })
			for i, c := range tt.calls {
				now = now.Add(c.advance)
				free, fail = c.free, c.fail
				before := reads
				got, err := r.read(c.dir)
				if (reads > before) != c.reads {
					t.Fatalf("call %d: read the filesystem: %v, want %v", i, reads > before, c.reads)
				}
				if c.fail {
					if !errors.Is(err, errFail) {
						t.Fatalf("call %d: err %v, want %v", i, err, errFail)
					}
					continue
				}
				if err != nil || got != c.want {
					t.Fatalf("call %d: got %d, %v; want %d", i, got, err, c.want)
				}
			}
		})
	}
}

// TestBadgerQueueReadsFreeSpaceOncePerInterval: the writer's rounds share
// a reading of the free space (on a filesystem with room).
func TestBadgerQueueReadsFreeSpaceOncePerInterval(t *testing.T) {
	q, err := OpenBadgerQueue(t.TempDir(), QueueOptions{Durability: DurabilityNoSync})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	bq := q.(*badgerQueue)
	free, err := diskFree(bq.dir)
	if err != nil {
		t.Skip("no free-space figures here:", err)
	}
	if free < 2*bq.reserve {
		t.Skip("the test filesystem is too full for the reading to be reused")
	}
	// Count what reaches the filesystem (read1 is called with mu held).
	reads := 0
	r := bq.freeSpace
	r.mu.Lock()
	inner := r.read1
	r.read1 = func(dir string) (uint64, error) { reads++; return inner(dir) }
	r.mu.Unlock()
	start := time.Now()
	const n = 200
	for i := range n {
		if _, err := q.Enqueue(context.Background(), []Event{{Namespace: "fs", Type: "t", Data: []byte{byte(i)}}}); err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	r.mu.Lock()
	defer r.mu.Unlock()
	if limit := int(elapsed/freeSpaceMaxAge) + 2; reads > limit {
		t.Fatalf("%d enqueues in %v read the free space %d times, more than once per %v (%d)", n, elapsed, reads, freeSpaceMaxAge, limit)
	}
	t.Logf("%d enqueues in %v: %d readings", n, elapsed, reads)
}

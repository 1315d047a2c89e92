package reliability

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/h3x-io/h3x"
)

// mountTmpfs mounts a tmpfs of size bytes on a new directory, or skips the
// test where the machine does not allow it.
func mountTmpfs(t *testing.T, size int64) string {
	dir := filepath.Join(t.TempDir(), "disk")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", dir).CombinedOutput()
	if err != nil {
		t.Skipf("full disk: cannot mount a tmpfs here (needs root and mount permission): %v: %s", err, strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

func freeBytes(t *testing.T, dir string) int64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * int64(st.Bsize)
}

// TestFullDisk puts the Badger directory on a small tmpfs, fills it, and
// checks: publishes are refused with a clear, retryable error; consumers
// keep fetching and acking; the server keeps serving; publishing resumes
// once space is freed; nothing acknowledged is lost.
func TestFullDisk(t *testing.T) {
	disk := mountTmpfs(t, 96<<20)
	openQueue := func() h3x.Queue {
		q, err := h3x.OpenBadgerQueue(filepath.Join(disk, "data"), h3x.QueueOptions{Badger: func(o *badger.Options) {
			o.ValueLogFileSize = 4 << 20
			o.MemTableSize = 2 << 20
			o.BaseTableSize = 1 << 20
			o.BlockCacheSize = 1 << 20
			o.IndexCacheSize = 1 << 20
		}})
		if err != nil {
			t.Fatal(err)
		}
		return q
	}
	srv := startServer(t, h3x.WithQueue(openQueue()), h3x.WithAckDeadline(3*time.Second)) // refused acks: redelivered soon
	pub := srv.dial(t, srv.addr)
	con := srv.dial(t, srv.addr)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Take most of the space with a filler file, leaving a few MB above
	// the queue's reserve.
	const reserve = 2*(4<<20) + 4*(2<<20) + 32<<20 // as the Badger queue computes it for these options
	filler := filepath.Join(disk, "filler")
	fillerSize := freeBytes(t, disk) - reserve - 6<<20
	if fillerSize > 0 {
		if err := os.WriteFile(filler, make([]byte, fillerSize), 0o644); err != nil {
			t.Fatalf("filler: %v", err)
		}
	}

	// Publish until refused.
	stored := map[string]bool{}
	var refusal *h3x.Error
	payload := make([]byte, 2048)
	for i := 0; refusal == nil; i++ {
		if i > 10000 {
			t.Fatalf("no refusal after %d events; %d bytes free", len(stored), freeBytes(t, disk))
		}
		evs := make([]h3x.Event, 50)
		for j := range evs {
			evs[j] = h3x.Event{ID: fmt.Sprintf("e%d-%d", i, j), Namespace: namespace, Data: payload}
		}
		res, err := pub.Publish(ctx, evs...)
		if err != nil {
			t.Fatalf("publish call failed (want per-event refusals): %v", err)
		}
		for _, r := range res {
			switch r.Status {
			case h3x.PublishStored, h3x.PublishDuplicate:
				stored[r.ID] = true
			default:
				if !errors.As(r.Err, &refusal) {
					t.Fatalf("refusal without an *h3x.Error: %v", r.Err)
				}
			}
		}
	}
	t.Logf("full: %d events stored, then refused: %v (code %v, retryable %v, retry after %v); %d bytes free",
		len(stored), refusal, refusal.Code, refusal.Code.Retryable(), refusal.RetryAfter, freeBytes(t, disk))
	if !refusal.Code.Retryable() || !strings.Contains(refusal.Message, "disk full") {
		t.Errorf("refusal %v: want a retryable error saying the disk is full", refusal)
	}

	// Consumers keep fetching and acking while the disk is full.
	acked := map[string]bool{}
	for range 5 {
		ds, err := con.Fetch(ctx, 100)
		if err != nil {
			t.Fatalf("fetch on a full disk: %v", err)
		}
		res, err := con.Ack(ctx, ds...)
		if err != nil {
			t.Fatalf("ack on a full disk: %v", err)
		}
		for _, r := range res {
			if r.Status == h3x.SettleOK {
				acked[r.ID] = true
			} else {
				t.Errorf("ack of %s on a full disk: %v", r.ID, r.Status)
			}
		}
	}
	// Still refused (acks free little), and the server serves.
	if _, err := pub.Ping(ctx); err != nil {
		t.Fatalf("ping on a full disk: %v", err)
	}

	// Free the space: publishing resumes.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	resumed := time.Now()
	for i := 0; ; i++ {
		res, err := pub.Publish(ctx, h3x.Event{ID: fmt.Sprintf("after-%d", i), Namespace: namespace, Data: payload})
		if err != nil {
			t.Fatal(err)
		}
		if res[0].Status == h3x.PublishStored {
			stored[res[0].ID] = true
			break
		}
		if time.Since(resumed) > 30*time.Second {
			t.Fatalf("publishing did not resume within 30 s of freeing space: %v", res[0].Err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("publishing resumed %v after the filler was removed", time.Since(resumed).Round(time.Millisecond))

	// Another process fills the disk to the last byte while events are
	// being published and acked; then the server is closed on the full
	// disk (Badger flushes its memtable at close), and restarted once the
	// space is back.
	other := filledWhilePublishing(t, ctx, disk, pub, con, stored, acked)
	if err := srv.Close(); err != nil {
		t.Logf("closing on a full disk: %v", err)
	}
	t.Logf("closed on a full disk: %d bytes free", freeBytes(t, disk))
	if err := os.Remove(other); err != nil {
		t.Fatal(err)
	}
	q := openQueue()
	srv = startServer(t, h3x.WithQueue(q), h3x.WithAckDeadline(3*time.Second))
	pub = srv.dial(t, srv.addr)
	con = srv.dial(t, srv.addr)
	if res, err := pub.Publish(ctx, h3x.Event{ID: "after-restart", Namespace: namespace}); err != nil || res[0].Status != h3x.PublishStored {
		t.Fatalf("publishing after the restart: %v %+v", err, res)
	}
	stored["after-restart"] = true

	// Nothing acknowledged is lost: every stored, unacked event is
	// delivered, and no acked one comes back. An event whose acks the full
	// disk refused was nacked and delivered again each time; one that had
	// its MaxAttempts deliveries so comes from its dead-letter namespace
	// (since the lease journal, its attempt counts survive the restart
	// even when the full disk refused their Badger records).
	want := len(stored) - len(acked)
	got := map[string]bool{}
	check := func(id string) {
		if acked[id] {
			t.Errorf("acked event %s delivered again", id)
		}
		if !stored[id] {
			t.Errorf("unknown event %s delivered", id)
		}
		got[id] = true
	}
	dlq := h3x.DeadLetterNamespace(namespace)
	deadLettered := 0
	for len(got)+deadLettered < want {
		fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
		ds, err := con.Fetch(fctx, 1000)
		fcancel()
		if err != nil {
			t.Fatalf("draining: %d of %d delivered, %d dead-lettered: %v", len(got), want, deadLettered, err)
		}
		for _, d := range ds {
			check(d.Event.ID)
		}
		if _, err := con.Ack(ctx, ds...); err != nil {
			t.Fatal(err)
		}
		st, err := q.Stats(ctx, dlq) // the registry grants no dead-letter namespace: read it from the queue
		if err != nil {
			t.Fatal(err)
		}
		deadLettered = st[0].Ready
	}
	dead, err := q.Lease(ctx, h3x.LeaseRequest{Holder: "test", Namespaces: []string{dlq}, Limit: deadLettered + 1, AckDeadline: time.Minute})
	if err != nil || len(dead) != deadLettered {
		t.Fatalf("dead letters: %d of %d, %v", len(dead), deadLettered, err)
	}
	for _, l := range dead {
		check(l.Event.ID)
		if a := l.Event.Metadata[h3x.MetaDeadLetterAttempts]; a != fmt.Sprint(h3x.DefaultMaxAttempts) {
			t.Errorf("event %s dead-lettered after %s attempts, want %d", l.Event.ID, a, h3x.DefaultMaxAttempts)
		}
	}
	if len(got) != want {
		t.Errorf("%d distinct events delivered or dead-lettered, want %d", len(got), want)
	}
	t.Logf("all %d stored and unacked events delivered (%d of them dead-lettered after %d attempts); %d acked on the full disk stayed acked",
		want, deadLettered, h3x.DefaultMaxAttempts, len(acked))
}

// filledWhilePublishing fills the disk to the last byte from outside the
// queue (a file of the test's, written until ENOSPC, as another process
// would) while a publisher and an acker are busy, and returns that file's
// path. Every publish and ack must end stored/applied or refused with a
// retryable *h3x.Error; the process must not crash (Badger writes through
// memory maps: a page fault on a full filesystem is a SIGBUS, see
// queue_badger_ballast.go); the server keeps answering pings.
func filledWhilePublishing(t *testing.T, ctx context.Context, disk string, pub, con *h3x.Client, stored, acked map[string]bool) string {
	var mu sync.Mutex
	refusals, ackRefusals := 0, 0
	var firstRefusal error
	stop := make(chan struct{})
	var wg sync.WaitGroup
	payload := make([]byte, 256) // small: publishes are still stored when the disk fills
	wg.Go(func() {               // publisher: at most 20,000 calls
		for i := 0; i < 20000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			evs := make([]h3x.Event, 10)
			for j := range evs {
				evs[j] = h3x.Event{ID: fmt.Sprintf("z%d-%d", i, j), Namespace: namespace, Data: payload}
			}
			res, err := pub.Publish(ctx, evs...)
			if err != nil {
				t.Errorf("publish call while the disk fills: %v", err)
				return
			}
			mu.Lock()
			for _, r := range res {
				var e *h3x.Error
				switch {
				case r.Status == h3x.PublishStored || r.Status == h3x.PublishDuplicate:
					stored[r.ID] = true
				case errors.As(r.Err, &e) && e.Code.Retryable():
					refusals++
					if firstRefusal == nil {
						firstRefusal = e
					}
				default:
					t.Errorf("publish of %s while the disk fills: %v, want stored or a retryable error", r.ID, r.Err)
				}
			}
			mu.Unlock()
		}
	})
	wg.Go(func() { // acker: at most 20,000 rounds
		for i := 0; i < 20000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			fctx, fcancel := context.WithTimeout(ctx, 200*time.Millisecond)
			ds, err := con.Fetch(fctx, 20)
			fcancel()
			if err != nil && !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("fetch while the disk fills: %v", err)
				return
			}
			if len(ds) == 0 {
				continue
			}
			actx, acancel := context.WithTimeout(ctx, 10*time.Second)
			res, err := con.Ack(actx, ds...)
			acancel()
			var e *h3x.Error
			switch {
			case err == nil:
				mu.Lock()
				for _, r := range res {
					if r.Status == h3x.SettleOK {
						acked[r.ID] = true
					}
				}
				mu.Unlock()
			case errors.As(err, &e) && e.Code.Retryable():
				mu.Lock()
				ackRefusals++
				mu.Unlock()
				// Unacked: they are delivered again later (leases end with
				// the ack deadline or a nack).
				con.Nack(ctx, 0, "disk full", ds...)
			default:
				t.Errorf("ack while the disk fills: %v, want applied or a retryable error", err)
				return
			}
		}
	})

	// Let them run, then fill the disk to zero in 1 MiB writes.
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	storedBefore, refusedBefore := len(stored), refusals
	mu.Unlock()
	filler := filepath.Join(disk, "filler-other")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	written := 0
	for range 1024 {
		n, err := f.Write(chunk)
		written += n
		if err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling: %v", err)
			}
			break
		}
	}
	f.Close()
	t.Logf("another file took %d MiB: %d bytes free (before it: %d events stored, %d refused)", written>>20, freeBytes(t, disk), storedBefore, refusedBefore)
	time.Sleep(2 * time.Second) // publishing and acking on the full disk
	if _, err := pub.Ping(ctx); err != nil {
		t.Errorf("ping on a full disk: %v", err)
	}
	mu.Lock()
	t.Logf("while full: %d publishes refused (first: %v), %d ack calls refused; %d events stored, %d acked so far",
		refusals, firstRefusal, ackRefusals, len(stored), len(acked))
	if refusals == 0 {
		t.Errorf("no publish was refused on a full disk")
	}
	mu.Unlock()
	close(stop)
	wg.Wait()
	return filler
}

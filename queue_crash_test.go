package h3x

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestBadgerQueueCrash kills a process that publishes to a Badger queue at a
// random moment, with SIGKILL, and checks that every publish it had
// acknowledged survives, exactly once, in publish order. It runs a few
// cycles over the same directory, alternating the durability modes (a
// process kill is what both survive), so each cycle also recovers from the
// previous crash. Loopback only, no network.
//
// The child is this test binary, re-executed with crashChildEnv set: it
// publishes from several goroutines (client IDs and queue-assigned ones),
// leases some events without settling them (lease records), and prints one
// line per acknowledged Enqueue with the IDs it stored.
func TestBadgerQueueCrash(t *testing.T) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(dir, os.Getenv(crashCycleEnv), os.Getenv(crashModeEnv))
		return
	}
	cycles := 4
	if testing.Short() {
		cycles = 2
	}
	dir := t.TempDir()
	acked := map[string]bool{}
	for cycle := range cycles {
		mode := []string{"fsync", "nosync"}[cycle%2]
		got := runCrashChild(t, dir, cycle, mode)
		for _, id := range got {
			acked[id] = true
		}
		delivered := verifyCrashDir(t, dir, acked)
		t.Logf("cycle %d (%s): %d publishes acknowledged before the kill; %d events in the queue, all acknowledged ones among them", cycle+1, mode, len(got), delivered)
		if t.Failed() {
			return
		}
	}
}

const (
	crashChildEnv = "H3X_CRASH_CHILD_DIR"
	crashCycleEnv = "H3X_CRASH_CYCLE"
	crashModeEnv  = "H3X_CRASH_MODE"
)

// runCrashChild runs one child until it is killed and returns the IDs it
// reported acknowledged.
func runCrashChild(t *testing.T, dir string, cycle int, mode string) (ids []string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestBadgerQueueCrash$")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir, crashCycleEnv+"="+strconv.Itoa(cycle), crashModeEnv+"="+mode)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		readyOnce := sync.OnceFunc(func() { close(ready) })
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "ready":
				readyOnce()
			case strings.HasPrefix(line, "ok "):
				for id := range strings.SplitSeq(strings.TrimPrefix(line, "ok "), ",") {
					ids = append(ids, id)
				}
			}
		}
		readyOnce()
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		cmd.Wait()
		t.Fatalf("the child did not start: %s", stderr.String())
	}
	time.Sleep(time.Duration(200+rand.IntN(600)) * time.Millisecond)
	if err := cmd.Process.Kill(); err != nil { // SIGKILL
		t.Fatal(err)
	}
	<-done
	err = cmd.Wait()
	if ws := cmd.ProcessState; ws == nil || ws.Success() {
		t.Fatalf("the child exited by itself (%v): %s", err, stderr.String())
	}
	return ids
}

// verifyCrashDir opens dir and checks that every acknowledged ID is there
// exactly once, and that each publisher's events are in publish order.
func verifyCrashDir(t *testing.T, dir string, acked map[string]bool) int {
	t.Helper()
	// Every cycle leases everything once more: never dead-letter here.
	q, err := OpenBadgerQueue(dir, QueueOptions{MaxAttempts: -1})
	if err != nil {
		t.Fatalf("reopen after the kill: %v", err)
	}
	defer q.Close()
	seen := map[string]int{}
	last := map[string]int{} // publisher -> last sequence number seen
	ctx := context.Background()
	for {
		ls, err := q.Lease(ctx, LeaseRequest{Holder: "verify", Namespaces: crashNamespaces, Limit: 1000, AckDeadline: time.Minute})
		if err != nil {
			t.Fatalf("Lease after the kill: %v", err)
		}
		if len(ls) == 0 {
			break
		}
		for _, l := range ls {
			seen[l.Event.ID]++
			pub, n, ok := parseCrashID(l.Event.ID)
			if !ok {
				continue // a queue-assigned ID
			}
			key := l.Event.Namespace + "/" + pub
			if prev, ok := last[key]; ok && n <= prev {
				t.Errorf("%s delivered after %s-%d: publish order broken", l.Event.ID, pub, prev)
			}
			last[key] = n
		}
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("%s is in the queue %d times", id, n)
		}
	}
	missing := 0
	for id := range acked {
		if seen[id] == 0 {
			missing++
			if missing <= 10 {
				t.Errorf("acknowledged publish %s is missing after the kill", id)
			}
		}
	}
	if missing > 0 {
		t.Errorf("%d of %d acknowledged publishes are missing", missing, len(acked))
	}
	// Leave everything for the next cycle: release the leases.
	if err := q.Release(ctx, "verify"); err != nil {
		t.Fatal(err)
	}
	return len(seen)
}

var crashNamespaces = []string{"crash-a", "crash-b"}

// Client IDs are c<cycle>p<publisher>-<n>.
func parseCrashID(id string) (pub string, n int, ok bool) {
	pub, num, ok := strings.Cut(id, "-")
	if !ok || !strings.HasPrefix(pub, "c") {
		return "", 0, false
	}
	n, err := strconv.Atoi(num)
	return pub, n, err == nil
}

// crashChild publishes until it is killed.
func crashChild(dir, cycle, mode string) {
	opts := QueueOptions{Durability: DurabilityNoSync, MaxAttempts: -1}
	if mode == "fsync" {
		opts.Durability = DurabilityFsync
	}
	q, err := OpenBadgerQueue(dir, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		os.Exit(2)
	}
	var out sync.Mutex
	report := func(ids []string) {
		out.Lock()
		defer out.Unlock()
		fmt.Fprintf(os.Stdout, "ok %s\n", strings.Join(ids, ","))
	}
	fmt.Fprintln(os.Stdout, "ready")
	ctx := context.Background()
	var wg sync.WaitGroup
	for p := range 8 {
		wg.Go(func() {
			ns := crashNamespaces[p%2]
			for n := 0; ; {
				batch := make([]Event, 1+rand.IntN(10))
				for i := range batch {
					batch[i] = Event{Namespace: ns, Type: "crash", Data: []byte(`{"payload":"0123456789abcdef"}`)}
					if p%4 != 3 { // publishers 3 and 7 let the queue assign IDs
						batch[i].ID = fmt.Sprintf("c%sp%d-%d", cycle, p, n)
						n++
					}
				}
				res, err := q.Enqueue(ctx, batch)
				if err != nil {
					fmt.Fprintln(os.Stderr, "enqueue:", err)
					os.Exit(3)
				}
				ids := make([]string, 0, len(res))
				for _, r := range res {
					if r.Status != PublishStored {
						fmt.Fprintln(os.Stderr, "not stored:", r.ID, r.Status, r.Err)
						os.Exit(4)
					}
					ids = append(ids, r.ID)
				}
				report(ids)
			}
		})
	}
	// A consumer leases (and lets go of) some events, so lease records and
	// attempt counts are written too.
	wg.Go(func() {
		for {
			if _, err := q.Lease(ctx, LeaseRequest{Holder: "child", Namespaces: crashNamespaces, Limit: 50, AckDeadline: time.Minute}); err != nil {
				return
			}
			time.Sleep(20 * time.Millisecond)
			q.Release(ctx, "child")
		}
	})
	wg.Wait()
}

package h3x_test

// Tests from a review as a first-time embedder (thirteenth session;
// RELIABILITY.md findings 113–118).

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// TestPublishInvalidUTF8FailsAtOnce: an event whose ID, Type, Message or
// metadata is not valid UTF-8 cannot be encoded (protobuf strings). The
// client took the local marshalling error for a failed stream
// (errStreamFailed, retryable) and resent the request every 100 ms until
// the caller's ctx ended: with context.Background() Publish never returns,
// its publish-buffer slot stays taken, and the valid events of the same
// call are never stored. "h3x inject --message $'\xff'" hangs likewise.
// It must fail at once (ErrInvalidArgument, for the call or per event).
func TestPublishInvalidUTF8FailsAtOnce(t *testing.T) {
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	for _, ev := range []h3x.Event{
		{Namespace: "orders", ID: "id-\xff"},
		{Namespace: "orders", Type: "type-\xff"},
		{Namespace: "orders", Message: "message-\xff"},
		{Namespace: "orders", Metadata: map[string]string{"k": "v-\xff"}},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		start := time.Now()
		res, err := c.Publish(ctx, ev, h3x.Event{Namespace: "orders", Message: "valid neighbour"})
		cancel()
		took := time.Since(start)
		if errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Publish(%q/%q/%q/%v) retried until its ctx ended (%v): %v", ev.ID, ev.Type, ev.Message, ev.Metadata, took.Round(time.Millisecond), err)
			continue
		}
		if err == nil && (len(res) != 2 || res[0].Status != h3x.PublishRefused || !errors.Is(res[0].Err, h3x.ErrInvalidArgument)) {
			t.Errorf("Publish of a non-UTF-8 event: %+v, want it refused with ErrInvalidArgument", res)
		}
		if err != nil && !errors.Is(err, h3x.ErrInvalidArgument) {
			t.Errorf("Publish of a non-UTF-8 event: %v, want ErrInvalidArgument", err)
		}
	}
}

// TestNackInvalidUTF8ReasonFailsAtOnce: the same for Client.Nack's reason
// (free text an application may take from an upstream error message): the
// nack was resent every 100 ms until ctx ended, and the delivery stayed
// leased.
func TestNackInvalidUTF8ReasonFailsAtOnce(t *testing.T) {
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, h3x.Event{Namespace: "orders", Message: "x"}); err != nil {
		t.Fatal(err)
	}
	ds, err := c.Fetch(ctx, 1, "orders")
	if err != nil {
		t.Fatal(err)
	}
	nctx, ncancel := context.WithTimeout(ctx, 3*time.Second)
	defer ncancel()
	start := time.Now()
	_, err = c.Nack(nctx, 0, "upstream said \xff", ds...)
	if errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Nack with a non-UTF-8 reason retried until its ctx ended (%v)", time.Since(start).Round(time.Millisecond))
	}
}

// TestMalformedRegistryEnvIsNotCalledMissing: with H3X_REGISTRY set but
// malformed, NewServer said "h3x: no registry: pass WithRegistry or set
// H3X_REGISTRY: ..." — telling the operator to set the variable they did
// set. The error should say the registry is malformed.
func TestMalformedRegistryEnvIsNotCalledMissing(t *testing.T) {
	t.Setenv("H3X_REGISTRY", "orders-svc-without-a-colon=token")
	_, err := h3x.NewServer(h3x.WithAddr("127.0.0.1:0"), h3x.WithQueue(h3x.NewMemoryQueue(h3x.QueueOptions{})))
	if err == nil {
		t.Fatal("NewServer accepted a malformed H3X_REGISTRY")
	}
	if strings.Contains(err.Error(), "no registry") || strings.Contains(err.Error(), "set H3X_REGISTRY") {
		t.Errorf("malformed H3X_REGISTRY reported as missing: %v", err)
	}
}

// TestNoCompiledBinariesTracked: the repository tracks two 19 MB ELF
// binaries, ./h3x and ./cmd/h3x/h3x (last rebuilt 90 commits before
// HEAD, so stale), and has no .gitignore. The README's "go build
// ./cmd/h3x" overwrites the tracked ./h3x, so a newcomer's first step
// leaves a modified tracked file (and an untracked h3x-data/).
func TestNoCompiledBinariesTracked(t *testing.T) {
	out, err := exec.Command("git", "ls-files", "-z").Output()
	if err != nil {
		t.Skipf("git ls-files: %v", err)
	}
	for _, name := range strings.Split(string(out), "\x00") {
		if name == "" {
			continue
		}
		f, err := os.Open(name)
		if err != nil {
			continue
		}
		head := make([]byte, 4)
		n, _ := f.Read(head)
		f.Close()
		if n == 4 && bytes.Equal(head, []byte("\x7fELF")) {
			t.Errorf("%s is a compiled binary tracked by git", name)
		}
	}
}

// TestQueueEventWithInvalidUTF8DoesNotBlockNamespace: the built-in queues
// accept, through the Queue API (h3xtest.Server.Queue, an embedder's
// import tool, a custom Queue's storage), an event whose Message is not
// valid UTF-8, which the wire refuses. Every fetch of its namespace then
// leases it, fails to encode the EventsBatch, gives the lease back unseen
// (no attempt counted, so it is never dead-lettered) and never answers
// the request: Fetch waits until its ctx ends, Subscribe stalls, the valid
// events behind it are never delivered, and nothing is logged. Enqueue
// should refuse such an event (CodeInvalidArgument, like the wire), or the
// server should set the undeliverable lease aside and answer the fetch.
func TestQueueEventWithInvalidUTF8DoesNotBlockNamespace(t *testing.T) {
	srv := h3xtest.NewServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := srv.Queue().Enqueue(ctx, []h3x.Event{
		{Namespace: "orders", Message: "bad \xff"},
		{Namespace: "orders", Message: "good"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Status == h3x.PublishRefused {
		return // refused at the door: fixed that way
	}
	c := srv.Dial(t)
	fctx, fcancel := context.WithTimeout(ctx, 4*time.Second)
	defer fcancel()
	ds, err := c.Fetch(fctx, 10, "orders")
	if errors.Is(err, context.DeadlineExceeded) {
		st, _ := srv.Queue().Stats(ctx, "orders")
		t.Fatalf("Fetch of a namespace holding a non-UTF-8 event got no answer in 4 s (stats %+v): the namespace is blocked", st)
	}
	for _, d := range ds {
		if d.Event.Message == "good" {
			return
		}
	}
	t.Errorf("Fetch returned %d deliveries, err %v; the valid event was not among them", len(ds), err)
}

// TestRefusedResultKeepsTheEventID: PublishResult.ID is documented as
// "the event's ID (assigned if it had none)", and the client knows it, but
// for an event refused for its ID (longer than MaxEventIDLen) or for an
// invalid namespace with a long ID, the server leaves the outcome's id
// empty (PROTOCOL.md §7, so that the answer fits a frame) and the client
// copied that: the result's ID is "", and a caller matching results to
// events by ID cannot find the refused one.
func TestRefusedResultKeepsTheEventID(t *testing.T) {
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	long := strings.Repeat("x", h3x.MaxEventIDLen+1)
	res, err := c.Publish(ctx, h3x.Event{ID: long, Namespace: "orders"})
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Status != h3x.PublishRefused {
		t.Fatalf("an ID of %d bytes was %v", len(long), res[0].Status)
	}
	if res[0].ID != long {
		t.Errorf("refused result's ID is %q, want the event's ID", res[0].ID)
	}
}

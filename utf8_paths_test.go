package h3x_test

// Tests from the review of the thirteenth session's fixes
// (RELIABILITY.md findings 127 and 128), by a helper in its own clone.

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// TestFetchInvalidUTF8NamespaceFailsAtOnce: finding 113's fix made a frame
// that cannot be encoded an ErrInvalidArgument "that is never retried",
// but only Publish (which refuses per event before sending) and Nack
// (whose reason is sanitized) avoid the retry: Client.call hands the
// error to Client.retryable, which retries every local error after
// 100 ms. A Fetch naming a namespace that is not UTF-8 (h3x tail validates
// its own; an embedder passing user input does not) is resent every
// 100 ms until ctx ends — for ever with context.Background().
func TestFetchInvalidUTF8NamespaceFailsAtOnce(t *testing.T) {
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	_, err := c.Fetch(ctx, 1, "orders\xff")
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Fetch of a non-UTF-8 namespace retried until its ctx ended (%v): %v", time.Since(start).Round(time.Millisecond), err)
	}
	if !errors.Is(err, h3x.ErrInvalidArgument) {
		t.Errorf("Fetch of a non-UTF-8 namespace: %v, want ErrInvalidArgument", err)
	}
}

// TestSettleUnencodableFailsAtOnce: the same retry for Client.Ack (and
// Extend, and the batched Delivery.Ack/Nack/Extend, whose flusher then
// retries for a minute and fails the good settlements of the batch with
// it) of a delivery whose ID or Namespace is not valid UTF-8 (the
// application changed d.Event).
func TestSettleUnencodableFailsAtOnce(t *testing.T) {
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	_, err := c.Ack(ctx, &h3x.Delivery{Event: h3x.Event{ID: "id-\xff", Namespace: "orders"}})
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ack of a non-UTF-8 id retried until its ctx ended (%v): %v", time.Since(start).Round(time.Millisecond), err)
	}
}

// refusingQueue is a custom Queue (an embedder's) whose refusals carry
// text from its storage that is not UTF-8.
type refusingQueue struct{ h3x.Queue }

func (q refusingQueue) Enqueue(ctx context.Context, events []h3x.Event) ([]h3x.PublishResult, error) {
	res := make([]h3x.PublishResult, len(events))
	for i, ev := range events {
		res[i] = h3x.PublishResult{ID: ev.ID, Status: h3x.PublishRefused,
			Err: &h3x.Error{Code: h3x.CodeInvalidArgument, Message: "rejected by storage: key \xfe\xff"}}
	}
	return res, nil
}

// TestUnencodableAnswerIsStillAnswered: finding 115's fix answers a batch
// that cannot be encoded with Error{INTERNAL}, but every other answer goes
// through sessionStream.answer's fw.write, whose error is dropped: a
// SendResult (or AckResult, or Error) whose message is not UTF-8 — a
// custom Queue's refusal, or the Badger queue's disk-full error naming a
// data directory that is not UTF-8 — is never sent, and the request is
// never answered: Publish waits until ctx ends (for ever with
// context.Background()).
func TestUnencodableAnswerIsStillAnswered(t *testing.T) {
	srv := h3xtest.NewServer(t, h3xtest.WithQueue(refusingQueue{h3x.NewMemoryQueue(h3x.QueueOptions{})}))
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	res, err := c.Publish(ctx, h3x.Event{Namespace: "orders", Message: "m"})
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Publish refused with a non-UTF-8 message: no answer until ctx ended (%v)", time.Since(start).Round(time.Millisecond))
	}
	if err == nil && (len(res) != 1 || res[0].Status != h3x.PublishRefused) {
		t.Errorf("Publish: %+v, want refused", res)
	}
}

// TestAckFlusherBadItemDoesNotSinkTheBatch: Delivery.Ack batches
// settlements; one whose ID or Namespace is not UTF-8 (the application
// changed d.Event) makes the whole AckEvent unencodable. Today the flusher
// retries it for a minute (the retry of TestSettleUnencodableFailsAtOnce),
// holding up Flush and every later ack; and once that retry stops, the
// good acks of the same batch still fail with it, so their events are
// delivered again. The bad item alone should fail.
func TestAckFlusherBadItemDoesNotSinkTheBatch(t *testing.T) {
	srv := h3xtest.NewServer(t)
	c := srv.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, h3x.Event{Namespace: "orders", Message: "a"}, h3x.Event{Namespace: "orders", Message: "b"}); err != nil {
		t.Fatal(err)
	}
	var ds []*h3x.Delivery
	for len(ds) < 2 {
		got, err := c.Fetch(ctx, 2-len(ds), "orders")
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, got...)
	}
	good, bad := ds[0], ds[1]
	bad.Event.ID += "\xff"
	good.Ack()
	bad.Ack()
	fctx, fcancel := context.WithTimeout(ctx, 3*time.Second)
	defer fcancel()
	start := time.Now()
	ferr := c.Flush(fctx)
	if errors.Is(ferr, context.DeadlineExceeded) {
		t.Errorf("Flush: the batch with a non-UTF-8 id was retried until Flush's ctx ended (%v)", time.Since(start).Round(time.Millisecond))
	}
	// Was the good delivery acked? A second ack of it says so.
	res, err := c.Ack(ctx, good)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) == 1 && res[0].Status == h3x.SettleOK {
		t.Errorf("the good delivery's batched ack was not applied (it went down with the bad one): it will be delivered again")
	}
}

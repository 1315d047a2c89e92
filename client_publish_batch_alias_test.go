package h3x

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// dataQueue records the Data of every event that reaches the queue.
type dataQueue struct {
	*gateQueue
	mu   sync.Mutex
	data map[string]string
}

func (q *dataQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	q.mu.Lock()
	for _, ev := range events {
		q.data[ev.ID] = string(ev.Data)
	}
	q.mu.Unlock()
	return q.gateQueue.Enqueue(ctx, events)
}

// A caller whose ctx ends while its chunk waits for a shared request gets
// its error back at once, while its event is still in the pending request.
// Once Publish has returned the caller may reuse its Data and Metadata: the
// request, sent later for the callers that stayed, must carry the event as
// it was, and must not read the caller's buffers meanwhile (with Metadata,
// a concurrent map iteration and write is fatal).
func TestReviewSharedAbandonedCallerBuffersReused(t *testing.T) {
	cases := []struct {
		name  string
		reuse func(data []byte, meta map[string]string, i int)
	}{
		{"Data", func(data []byte, _ map[string]string, i int) { copy(data, fmt.Sprintf("reused-%09d", i)) }},
		{"Metadata", func(_ []byte, meta map[string]string, i int) {
			meta[fmt.Sprint("k", i%50)] = "v"
			delete(meta, fmt.Sprint("k", (i+25)%50))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			q := &dataQueue{gateQueue: newGateQueue(), data: map[string]string{}}
			c, firsts := filledOver(t, q, q.gateQueue)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()

			buf := []byte("original-payload")
			meta := map[string]string{"k": "v"}
			gone, leave := context.WithCancel(ctx)
			goneErr := make(chan error, 1)
			go func() {
				_, err := c.Publish(gone, Event{Namespace: "orders", Type: "t", ID: "gone-0", Data: buf, Metadata: meta})
				goneErr <- err
			}()
			waitSends(t, c, sharedSendsInFlight, 1)
			stays := make(chan error, 1)
			go func() {
				_, err := c.Publish(ctx, Event{Namespace: "orders", Type: "t", ID: "stays-0"})
				stays <- err
			}()
			waitSends(t, c, sharedSendsInFlight, 2)
			leave()
			if err := <-goneErr; !errors.Is(err, context.Canceled) {
				t.Fatalf("the caller that gave up: %v", err)
			}
			// Publish has returned: the caller reuses its buffers, as it may.
			stop := make(chan struct{})
			reused := make(chan struct{})
			go func() {
				defer close(reused)
				for i := 0; ; i++ {
					tc.reuse(buf, meta, i)
					select {
					case <-stop:
						return
					default:
					}
				}
			}()
			close(q.open)
			for range sharedSendsInFlight {
				<-firsts
			}
			if err := <-stays; err != nil {
				t.Fatal(err)
			}
			close(stop)
			<-reused
			q.mu.Lock()
			got, sent := q.data["gone-0"]
			q.mu.Unlock()
			if sent && got != "original-payload" {
				t.Errorf("the event of a Publish that had returned was sent with Data %q (the caller's reused buffer), not %q", got, "original-payload")
			}
		})
	}
}

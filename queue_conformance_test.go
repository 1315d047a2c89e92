package h3x_test

import (
	"testing"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// TestQueueConformance runs the exported Queue suite against both built-in
// queues.
func TestQueueConformance(t *testing.T) {
	t.Run("Memory", func(t *testing.T) {
		h3xtest.TestQueue(t, func(t testing.TB, opts h3x.QueueOptions) (h3x.Queue, func() h3x.Queue) {
			return h3x.NewMemoryQueue(opts), nil
		})
	})
	t.Run("Badger", func(t *testing.T) {
		h3xtest.TestQueue(t, func(t testing.TB, opts h3x.QueueOptions) (h3x.Queue, func() h3x.Queue) {
			dir := t.TempDir()
			open := func() h3x.Queue {
				q, err := h3x.OpenBadgerQueue(dir, opts)
				if err != nil {
					t.Fatalf("OpenBadgerQueue: %v", err)
				}
				return q
			}
			cur := open()
			reopen := func() h3x.Queue {
				if err := cur.Close(); err != nil {
					t.Fatalf("Close before reopen: %v", err)
				}
				cur = open()
				return cur
			}
			return cur, reopen
		})
	})
}

package h3x_test

import (
	"testing"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// TestQueueConformance runs the exported Queue suite against the built-in
// queues.
func TestQueueConformance(t *testing.T) {
	t.Run("Memory", func(t *testing.T) {
		h3xtest.TestQueue(t, func(t testing.TB, opts h3x.QueueOptions) (h3x.Queue, func() h3x.Queue) {
			return h3x.NewMemoryQueue(opts), nil
		})
	})
}

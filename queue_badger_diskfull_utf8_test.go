package h3x

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// TestDiskFullAnswerWithNonUTF8DataDir: the Badger queue's disk-full
// refusal (diskFullError) quotes the data directory, which on Linux need
// not be UTF-8 (a Latin-1 name, say). The server's SendResult carries that
// message as a protobuf string, cannot be encoded, and is dropped by
// sessionStream.answer (fw.write's error is ignored): the client gets no
// answer and Publish waits until its ctx ends instead of getting the
// retryable disk-full refusal at once.
func TestDiskFullAnswerWithNonUTF8DataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "file-d\xe9j\xe0")
	q := openTestBadger(t, dir, QueueOptions{})
	full := func(string) (uint64, error) { return 0, nil }
	q.diskFree.Store(&full)
	s := testServer(t, WithQueue(q))
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	res, err := c.Publish(ctx, Event{Namespace: "orders", Message: "m"})
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Publish on a full disk (data dir not UTF-8): no answer until ctx ended (%v)", time.Since(start).Round(time.Millisecond))
	}
	t.Logf("Publish: %+v %v", res, err)
}

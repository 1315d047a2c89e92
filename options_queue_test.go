package h3x

import (
	"strings"
	"testing"
)

// TestQueueOptionsWithQueueRefused: NewServer reports every bad
// option at once, and WithMaxAttempts together with WithQueue is an error
// ("with WithQueue set it on that queue"). WithQueueOptions together with
// WithQueue is silently ignored instead, so a dedup window, a max-attempts
// count or namespace limits given this way never take effect.
func TestQueueOptionsWithQueueRefused(t *testing.T) {
	reg, err := ParseRegistry("a:*=t")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(WithAddr("127.0.0.1:0"), WithRegistry(reg),
		WithQueue(NewMemoryQueue(QueueOptions{})),
		WithQueueOptions(QueueOptions{MaxAttempts: 1, MaxEventsPerNamespace: 1}))
	if err == nil {
		srv.Close()
		t.Fatal("NewServer accepted WithQueueOptions with WithQueue; the options are silently unused")
	}
	if !strings.Contains(err.Error(), "WithQueueOptions") {
		t.Errorf("error %q does not name WithQueueOptions", err)
	}
}

package h3xtest_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// exampleT stands in for the *testing.T a real test has.
type exampleT struct {
	testing.TB
	cleanups []func()
	dirs     []string
}

func (t *exampleT) Helper()                        {}
func (t *exampleT) Cleanup(f func())               { t.cleanups = append(t.cleanups, f) }
func (t *exampleT) Fatalf(format string, a ...any) { log.Fatalf(format, a...) }
func (t *exampleT) Errorf(format string, a ...any) { log.Printf(format, a...) }
func (t *exampleT) TempDir() string {
	d, err := os.MkdirTemp("", "h3xtest")
	if err != nil {
		log.Fatal(err)
	}
	t.dirs = append(t.dirs, d)
	return d
}
func (t *exampleT) finish() {
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
	for _, d := range t.dirs {
		os.RemoveAll(d)
	}
}

func ExampleNewServer() {
	t := &exampleT{} // in a test: the test's *testing.T
	defer t.finish()

	srv := h3xtest.NewServer(t) // random loopback port, in-memory queue, stopped by t.Cleanup
	client := srv.Dial(t)       // connected as the ready test client, closed by t.Cleanup

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := client.Publish(ctx, h3x.Event{Namespace: "orders", Message: "order 42 created"}); err != nil {
		t.Fatalf("publish: %v", err)
	}
	deliveries, err := client.Fetch(ctx, 10, "orders")
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	for _, d := range deliveries {
		fmt.Println(d.Event.Message, "attempt", d.Attempt())
	}
	client.Ack(ctx, deliveries...)
	// Output: order 42 created attempt 1
}

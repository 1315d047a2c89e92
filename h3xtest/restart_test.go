package h3xtest_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// Restart may run while other goroutines use the server. It used to
// rewrite the address Addr reads, range over the handlers Handle writes
// (both data races under -race), and leave a moment in which Handle and
// DropConnections dereferenced a nil server.
func TestRestartWhileInUse(t *testing.T) {
	srv := h3xtest.NewServer(t)
	addr := srv.Addr()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	use := func(f func(i int)) {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
					f(i)
				}
			}
		})
	}
	use(func(int) {
		if a := srv.Addr(); a != addr {
			t.Errorf("Addr %s, want %s for the server's life", a, addr)
		}
	})
	use(func(i int) {
		if i < 64 { // each type once: a second registration panics, as in http.ServeMux
			srv.Handle(h3x.FrameType(0x80+i), h3x.HandlerFunc(func(context.Context, *h3x.Stream) error { return nil }))
			time.Sleep(time.Millisecond)
		}
	})
	use(func(int) { srv.DropConnections() })
	for range 10 {
		srv.Restart()
	}
	close(stop)
	wg.Wait()
	c := srv.Dial(t)
	if _, err := c.Ping(context.Background()); err != nil {
		t.Fatalf("after the Restarts: %v", err)
	}
}

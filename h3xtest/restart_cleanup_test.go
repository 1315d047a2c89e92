package h3xtest

import (
	"testing"
	"time"
)

// Restart racing the test's cleanup: close() did not take restartMu, so a
// Restart between stop and start when the cleanup ran started a new
// instance after it (left running), or reported to a finished test.
func TestRestartVsCleanup(t *testing.T) {
	for i := 0; i < 20; i++ {
		var s *Server
		done := make(chan struct{})
		t.Run("sub", func(t *testing.T) {
			s = NewServer(t)
			go func() {
				defer close(done)
				for j := 0; j < 50; j++ {
					s.Restart()
				}
			}()
			time.Sleep(time.Duration(i) * time.Millisecond)
		})
		<-done
		if srv := s.Server(); srv != nil {
			t.Errorf("iteration %d: a server instance is running after the test's cleanup", i)
			srv.Close()
			return
		}
	}
}

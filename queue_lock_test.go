package h3x

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestBadgerQueueDirectoryInUseByAnotherProcess opens a directory in a child
// process (this test binary, re-executed) and checks that the parent's open
// is refused with an error that says so and that callers can recognize.
func TestBadgerQueueDirectoryInUseByAnotherProcess(t *testing.T) {
	const env = "H3X_LOCK_CHILD_DIR"
	if dir := os.Getenv(env); dir != "" {
		q, err := OpenBadgerQueue(dir, QueueOptions{})
		if err != nil {
			os.Stdout.WriteString("open: " + err.Error() + "\n")
			os.Exit(2)
		}
		defer q.Close()
		os.Stdout.WriteString("ready\n")
		time.Sleep(time.Minute) // killed by the parent
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestBadgerQueueDirectoryInUseByAnotherProcess$")
	cmd.Env = append(os.Environ(), env+"="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	sc := bufio.NewScanner(out)
	if !sc.Scan() || sc.Text() != "ready" {
		t.Fatalf("child did not open the queue: %q", sc.Text())
	}
	q, err := OpenBadgerQueue(dir, QueueOptions{})
	if err == nil {
		q.Close()
		t.Fatal("OpenBadgerQueue of a directory another process has open succeeded")
	}
	if !errors.Is(err, ErrQueueInUse) {
		t.Errorf("error %q does not match ErrQueueInUse", err)
	}
	if !strings.Contains(err.Error(), "in use by another process") || !strings.Contains(err.Error(), dir) {
		t.Errorf("error %q does not say the directory is in use", err)
	}
	// Once the other process is gone, the directory opens.
	cmd.Process.Kill()
	cmd.Wait()
	q, err = OpenBadgerQueue(dir, QueueOptions{})
	if err != nil {
		t.Fatalf("open after the other process died: %v", err)
	}
	q.Close()
}

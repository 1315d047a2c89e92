package main

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A server that dies mid-run ends the run at once, with its log as the
// cause: before, its clients retried until the run's deadline (a crashing
// H3X server hung the harness).
func TestUntilExitEndsTheRunWhenTheServerDies(t *testing.T) {
	p, _, err := startProc("dying", filepath.Join(t.TempDir(), "log"), false, "/bin/sh", "-c", "echo 'panic: boom' >&2; exit 3")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := untilExit(context.Background(), p)
	defer stop()
	select {
	case <-ctx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the context outlived the server by 10 s")
	}
	cause := context.Cause(ctx)
	if !errors.Is(cause, errServerExited) || !strings.Contains(cause.Error(), "panic: boom") || !strings.Contains(cause.Error(), "exit status 3") {
		t.Fatalf("cause %q: want errServerExited with the exit status and the log", cause)
	}
	if err := exitCause(ctx, context.Canceled); err != cause {
		t.Errorf("exitCause = %v, want the server's exit", err)
	}
}

// stop releases the watcher without cancelling anything for a server that
// still runs, and errors other than a server exit pass through.
func TestUntilExitStopWhileTheServerRuns(t *testing.T) {
	p, _, err := startProc("sleeper", filepath.Join(t.TempDir(), "log"), false, "/bin/sh", "-c", "sleep 30")
	if err != nil {
		t.Fatal(err)
	}
	defer p.stop()
	ctx, stop := untilExit(context.Background(), p)
	stop()
	if cause := context.Cause(ctx); errors.Is(cause, errServerExited) {
		t.Fatalf("cause %v for a server still running", cause)
	}
	if p.exited() {
		t.Fatal("stop ended the server")
	}
	other := errors.New("publish refused")
	if err := exitCause(ctx, other); err != other {
		t.Errorf("exitCause = %v, want %v", err, other)
	}
}

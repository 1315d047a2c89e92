package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// h3xBinary is the h3x command built once by TestMain.
var h3xBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "h3x-cli-test-*")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	h3xBinary = filepath.Join(dir, "h3x")
	args := []string{"build", "-o", h3xBinary}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, ".")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building h3x:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	goleak.VerifyTestMain(m, goleak.Cleanup(func(int) { os.RemoveAll(dir) }))
}

// cleanEnv is the test process's environment without H3X_* variables, plus
// extra.
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "H3X_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// result is a finished run of the binary.
type result struct {
	stdout, stderr string
	code           int
}

// runH3X runs the binary to completion (killing it after a bound) with
// stdin and the H3X_* variables in env.
func runH3X(t *testing.T, stdin string, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, h3xBinary, args...)
	cmd.Env = cleanEnv(env...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok || ctx.Err() != nil {
			t.Fatalf("h3x %s: %v (stderr: %s)", strings.Join(args, " "), err, errb.String())
		}
		code = ee.ExitCode()
	}
	return result{out.String(), errb.String(), code}
}

// syncBuffer is a bytes.Buffer safe for a writer and readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is a running h3x process. t.Cleanup kills it if it is still running.
type proc struct {
	t      *testing.T
	cmd    *exec.Cmd
	stdout *syncBuffer
	stderr *syncBuffer
	done   chan struct{}
	err    error
}

func startH3X(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, cmd: exec.Command(h3xBinary, args...), stdout: new(syncBuffer), stderr: new(syncBuffer), done: make(chan struct{})}
	p.cmd.Env = cleanEnv(env...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// signal sends sig and waits (bounded) for the exit; it returns the exit
// code.
func (p *proc) stop(sig syscall.Signal, within time.Duration) int {
	p.t.Helper()
	p.cmd.Process.Signal(sig)
	return p.wait(within)
}

func (p *proc) wait(within time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(within):
		p.cmd.Process.Kill()
		<-p.done
		p.t.Fatalf("h3x %s did not exit within %v; stderr:\n%s", strings.Join(p.cmd.Args[1:], " "), within, p.stderr.String())
	}
	return p.cmd.ProcessState.ExitCode()
}

// waitFor polls cond every 20 ms until it holds or within passes.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// served is an "h3x serve" process and what its ready line says.
type served struct {
	*proc
	addr, fingerprint, metrics string
}

// serve starts "h3x serve" on a random loopback port with JSON logs and
// waits until it is ready.
func serve(t *testing.T, env []string, args ...string) *served {
	t.Helper()
	all := append([]string{"serve", "--addr", "127.0.0.1:0", "--log-format", "json"}, args...)
	p := startH3X(t, env, all...)
	s := &served{proc: p}
	waitFor(t, 20*time.Second, "h3x serve to be ready", func() bool {
		select {
		case <-p.done:
			t.Fatalf("h3x serve exited early: %v\n%s", p.err, p.stderr.String())
		default:
		}
		sc := bufio.NewScanner(strings.NewReader(p.stderr.String()))
		for sc.Scan() {
			var line map[string]any
			if json.Unmarshal(sc.Bytes(), &line) != nil || line["msg"] != "h3x serve: ready" {
				continue
			}
			s.addr, _ = line["addr"].(string)
			s.fingerprint, _ = line["sha256"].(string)
			s.metrics, _ = line["metrics"].(string)
			return true
		}
		return false
	})
	return s
}

// clientEnv returns the variables that connect a client command to s.
func (s *served) clientEnv(client, token string) []string {
	return []string{"H3X_ADDR=" + s.addr, "H3X_FINGERPRINT=" + s.fingerprint, "H3X_CLIENT_ID=" + client, "H3X_TOKEN=" + token}
}

// closedUDPPort returns a loopback UDP address nothing listens on.
func closedUDPPort(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := c.LocalAddr().String()
	c.Close()
	return addr
}

func lines(s string) []string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// checkOneLineError checks the shape of every failure: one line on stderr,
// prefixed with the command, no stack trace.
func checkOneLineError(t *testing.T, r result, prefix string) {
	t.Helper()
	if l := lines(r.stderr); len(l) != 1 {
		t.Errorf("stderr has %d lines, want 1:\n%s", len(l), r.stderr)
	}
	if !strings.HasPrefix(r.stderr, prefix) {
		t.Errorf("stderr %q does not start with %q", r.stderr, prefix)
	}
	for _, bad := range []string{"goroutine ", "panic", ".go:"} {
		if strings.Contains(r.stderr, bad) {
			t.Errorf("stderr looks like a stack trace (%q):\n%s", bad, r.stderr)
		}
	}
}

var _ io.Writer = (*syncBuffer)(nil)

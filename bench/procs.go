package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// aptHint is what to run when a peer's server is missing.
const aptHint = "apt-get update && apt-get install -y nats-server redis-server"

// lookPeer finds a peer server binary or says how to install it. The harness
// installs nothing by itself.
func lookPeer(name, override string) (string, error) {
	if override != "" {
		if _, err := os.Stat(override); err != nil {
			return "", fmt.Errorf("%s: %w", name, err)
		}
		return override, nil
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%s not found in PATH: install the Debian packages first (%s)", name, aptHint)
	}
	return p, nil
}

// proc is a server process the harness started.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string // its stderr (and stdout, unless read)
	done chan struct{}
	err  error
}

func startProc(name, logFile string, stdout bool, bin string, args ...string) (*proc, *bufio.Reader, error) {
	lf, err := os.Create(logFile)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = lf
	var out *bufio.Reader
	if stdout {
		r, err := cmd.StdoutPipe()
		if err != nil {
			lf.Close()
			return nil, nil, err
		}
		out = bufio.NewReader(r)
	} else {
		cmd.Stdout = lf
	}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, out, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits (then SIGKILL after 15 s).
func (p *proc) stop() {
	if p == nil || p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// tail returns the end of the process's log, for error messages.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// statusKiB reads the "Name: value kB" lines of /proc/<pid>/status.
func statusKiB(pid int) (map[string]int64, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return nil, err
	}
	m := make(map[string]int64)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		m[f[0]] = v
	}
	return m, nil
}

// memKiB reads VmRSS and VmHWM (peak RSS) of pid from /proc, in KiB.
func memKiB(pid int) (rss, hwm int64, err error) {
	m, err := statusKiB(pid)
	if err != nil {
		return 0, 0, err
	}
	if m["VmRSS:"] == 0 {
		return 0, 0, fmt.Errorf("no VmRSS for pid %d", pid)
	}
	return m["VmRSS:"], m["VmHWM:"], nil
}

// rssSplitKiB reads the anonymous and file-backed parts of pid's RSS, in
// KiB: file-backed pages (such as Badger's memory-mapped files) are page
// cache the kernel can reclaim, anonymous ones are the process's own.
func rssSplitKiB(pid int) (anon, file int64) {
	m, err := statusKiB(pid)
	if err != nil {
		return 0, 0
	}
	return m["RssAnon:"], m["RssFile:"] + m["RssShmem:"]
}

// freeTCPPort returns a loopback TCP port that was free a moment ago.
func freeTCPPort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitTCP waits until addr accepts TCP connections or p exits.
func waitTCP(ctx context.Context, p *proc, addr string) error {
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if p.exited() {
			return fmt.Errorf("%s exited: %v\n%s", p.name, p.err, p.tail())
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), fmt.Errorf("%s not listening on %s\n%s", p.name, addr, p.tail()))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// errServerExited is the cause of a run's context cancelled by untilExit.
var errServerExited = errors.New("the server exited")

// untilExit returns a context that is cancelled once p exits, with
// errServerExited, its exit status and the end of its log as the cause.
// stop releases the goroutine that watches p; call it before stopping p.
func untilExit(ctx context.Context, p *proc) (_ context.Context, stop func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case <-p.done:
			cancel(fmt.Errorf("%w (%s: %v):\n%s", errServerExited, p.name, p.err, p.tail()))
		case <-ctx.Done():
		}
	}()
	return ctx, func() {
		cancel(nil)
		<-watched
	}
}

// exitCause returns the cause of ctx's end in place of err when the server
// exited: the error a client returned is then only its consequence.
func exitCause(ctx context.Context, err error) error {
	if cause := context.Cause(ctx); errors.Is(cause, errServerExited) {
		return cause
	}
	return err
}

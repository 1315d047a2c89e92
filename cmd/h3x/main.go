package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"sort"
	"strings"
	"syscall"
)

// command is one subcommand.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, e *cmdEnv, args []string) error
}

var commands = []*command{
	{"serve", "run a broker", runServe},
	{"inject", "publish events from flags, JSON lines or a synthetic load", runInject},
	{"tail", "follow namespaces and print deliveries", runTail},
	{"bench", "measure publish and consume throughput and latency", runBench},
	{"stats", "show per-namespace queue counts", runStats},
	{"version", "print the version", runVersion},
}

// cmdEnv is what a command may touch outside itself, so tests and main
// agree on it.
type cmdEnv struct {
	name   string // the subcommand, for messages
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
}

// usageError is a mistake in the command line: exit status 2.
type usageError struct{ err error }

func (u usageError) Error() string { return u.err.Error() }
func (u usageError) Unwrap() error { return u.err }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// With SIGPIPE caught, a write to a closed pipe (h3x tail | head) fails
	// with EPIPE instead of killing the process, so leases are released.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}

// run runs the command line args and returns the exit status: 0, 1 for a
// failure, 2 for a usage error. Errors are printed as one line on stderr.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) int {
	if len(args) == 0 {
		mainUsage(stderr)
		return 2
	}
	name := args[0]
	switch name {
	case "-h", "-help", "--help", "help":
		if len(args) > 1 && name == "help" {
			if c := lookup(args[1]); c != nil {
				return run(ctx, []string{c.name, "-h"}, stdin, stdout, stderr, getenv)
			}
			fmt.Fprintf(stderr, "h3x help: unknown command %q\n", args[1])
			return 2
		}
		mainUsage(stdout)
		return 0
	case "-version", "--version":
		name, args = "version", []string{"version"}
	}
	c := lookup(name)
	if c == nil {
		fmt.Fprintf(stderr, "h3x: unknown command %q (commands: %s; see h3x -h)\n", name, commandNames())
		return 2
	}
	e := &cmdEnv{name: c.name, stdin: stdin, stdout: stdout, stderr: stderr, getenv: getenv}
	err := c.run(ctx, e, args[1:])
	switch {
	case err == nil, errors.Is(err, errHelp):
		return 0
	case errors.As(err, new(usageError)):
		fmt.Fprintf(stderr, "h3x %s: %s (see h3x %s -h)\n", c.name, oneLine(err), c.name)
		return 2
	default:
		fmt.Fprintf(stderr, "h3x %s: %s\n", c.name, oneLine(err))
		return 1
	}
}

func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

func commandNames() string {
	names := make([]string, len(commands))
	for i, c := range commands {
		names[i] = c.name
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

func mainUsage(w io.Writer) {
	fmt.Fprintf(w, "h3x is the command-line tool of H3X, structured events over QUIC.\n\nUsage:\n\n\th3x <command> [flags]\n\nCommands:\n\n")
	for _, c := range commands {
		fmt.Fprintf(w, "\t%-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun \"h3x <command> -h\" for a command's flags. Flags override the H3X_*\nenvironment variables named in their help. Flags may come before or after\na command's arguments; \"--\" ends the flags.\n")
}

// oneLine flattens an error into one line: joined errors are separated by
// "; ", and the "h3x: " prefixes of library errors are dropped (the
// command already names itself). A prefix is an "h3x: " that starts the
// message or a part of it: after "; " or after the ": " of an error that
// wraps it ("malformed registry: h3x: ..."). Elsewhere "h3x: " is text to
// keep, such as the end of a path ("open /etc/h3x: no such file").
func oneLine(err error) string {
	s := strings.ReplaceAll(err.Error(), "\n", "; ")
	s = libPrefix.ReplaceAllString(s, "$1")
	return strings.TrimSpace(s)
}

// libPrefix matches the "h3x: " prefixes of an error message, repeated or
// not, and what precedes them.
var libPrefix = regexp.MustCompile(`(^|: |; )(?:h3x: )+`)

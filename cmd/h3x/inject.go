package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/h3x-io/h3x"
)

const injectAbout = `
Inject publishes events and prints each stored event's id on its own line,
in input order, once the server has made it durable.

Events come from flags (--ns with --type, --message, --data, --meta; --count
copies of it, each with its own id), or from JSON lines (--file, "-" for
stdin; read from stdin by default when it is not a terminal and no event
flag is given). A JSON line looks like

    {"namespace":"orders","type":"order.created","message":"new order",
     "data":{"sku":"A-1"},"metadata":{"env":"dev"}}

where "data" is any JSON value (a string stands for its text; binary bodies
go in "data_base64"), "id" and "time" (RFC 3339 or Unix seconds) are
optional, and --ns fills a missing namespace. A JSON "data" value is stored
compacted. tail's JSON output is valid input and gives back the same bytes:
tail writes a body as JSON only when it is already compact JSON, otherwise
as a string (or in base64).

--count and --rate make a synthetic load (--size bytes of data each); on a
terminal, long runs show a progress bar. Events refused by the server make
inject exit with status 1 after the rest are published. A malformed JSON
line stops inject with status 1; the lines before it are published. So does
a failure to write the ids (h3x inject ... | head -1): the error says how
many events were published.`

type injectFlags struct {
	client                 clientFlags
	ns, typ, msg, data, id string
	meta                   mapFlag
	file                   string
	count, size            int
	batch, inflight        int
	rate                   float64
	quiet                  bool
}

func runInject(ctx context.Context, e *cmdEnv, args []string) error {
	f := injectFlags{meta: mapFlag{}}
	fs := newFlagSet(e, "[flags]", injectAbout)
	f.client.register(fs)
	fs.stringVar(&f.ns, "ns", "H3X_NAMESPACE", "", "`namespace` of the events (the default for JSON lines)")
	fs.stringVar(&f.typ, "type", "", "", "event `type`, such as order.created")
	fs.stringVar(&f.msg, "message", "", "", "event `message`")
	fs.stringVar(&f.data, "data", "", "", "event `body` (JSON or any text)")
	fs.value(f.meta, "meta", "", "event metadata `key=value` (repeatable)")
	fs.stringVar(&f.id, "id", "", "", "event `id` (default: a new UUID; publishing the same id again is deduplicated)")
	fs.stringVar(&f.file, "file", "", "", "read JSON-lines events from `path` (\"-\": stdin)")
	fs.intVar(&f.count, "count", "", 0, "publish `n` events made from the flags (default 1)")
	fs.floatVar(&f.rate, "rate", "", 0, "publish at most this many `events/s` (0: as fast as possible)")
	fs.intVar(&f.size, "size", "", 0, "with no --data, give each event a body of this many `bytes`")
	fs.intVar(&f.batch, "batch", "", 100, "events per publish request (at most 1000)")
	fs.intVar(&f.inflight, "inflight", "", 4, "publish requests in flight at once")
	fs.boolVar(&f.quiet, "quiet", "", false, "do not print the ids")
	if err := fs.parse(args); err != nil {
		return err
	}
	if err := fs.noArgs(); err != nil {
		return err
	}
	switch {
	case f.batch < 1 || f.batch > h3x.DefaultMaxEventsPerSend:
		return usagef("--batch must be between 1 and %d", h3x.DefaultMaxEventsPerSend)
	case f.inflight < 1:
		return usagef("--inflight must be at least 1")
	case f.count < 0, f.size < 0, f.rate < 0:
		return usagef("--count, --size and --rate must not be negative")
	case fs.cli["count"] && f.count == 0:
		return usagef("--count must be at least 1")
	case f.rate > 0 && f.rate < minRate:
		return usagef("--rate must be 0 (as fast as possible) or at least %g events/s", minRate)
	}
	eventFlags := false
	for _, name := range []string{"type", "message", "data", "meta", "id", "count", "size"} {
		eventFlags = eventFlags || fs.cli[name]
	}
	if fs.cli["data"] && fs.cli["size"] {
		return usagef("--size makes a body for events without --data: give one of them")
	}
	if f.file != "" && eventFlags {
		return usagef("--file excludes --type, --message, --data, --meta, --id, --count and --size")
	}
	if f.file == "" && !eventFlags {
		if isTerminal(e.stdin) {
			return usagef("nothing to publish: give --message, --data or --type (with --ns), --count, or JSON lines with --file")
		}
		f.file = "-"
	}

	var src eventSource
	var total int64
	if f.file != "" {
		r := e.stdin
		if f.file != "-" {
			file, err := os.Open(f.file)
			if err != nil {
				return fmt.Errorf("events file: %w", err)
			}
			defer file.Close()
			r = file
		}
		if f.ns != "" {
			if err := h3x.ValidateNamespace(f.ns); err != nil {
				return badNamespace(fs.source("ns"), err)
			}
		}
		src = newLineSource(r, f.ns)
	} else {
		if f.ns == "" {
			return usagef("--ns is required")
		}
		if err := h3x.ValidateNamespace(f.ns); err != nil {
			return badNamespace(fs.source("ns"), err)
		}
		if f.count == 0 {
			f.count = 1
		}
		if f.id != "" && f.count > 1 {
			return usagef("--id names one event; it cannot be used with --count above 1")
		}
		total = int64(f.count)
		src = newFlagSource(f)
	}

	c, err := f.client.dial(ctx, e)
	if err != nil {
		return err
	}
	defer c.Close()
	return publishAll(ctx, e, c, src, total, f)
}

// eventSource yields the events to publish; next returns io.EOF at the
// end. label names an event in messages ("line 3", "event 7").
type eventSource interface {
	next() (ev h3x.Event, label string, err error)
}

type flagSource struct {
	f    injectFlags
	n    int
	data []byte
}

func newFlagSource(f injectFlags) *flagSource {
	s := &flagSource{f: f, data: []byte(f.data)}
	if f.data == "" && f.size > 0 {
		s.data = make([]byte, f.size)
		for i := range s.data {
			s.data[i] = 'a' + byte(i%26)
		}
	}
	return s
}

func (s *flagSource) next() (h3x.Event, string, error) {
	if s.n >= s.f.count {
		return h3x.Event{}, "", io.EOF
	}
	s.n++
	ev := h3x.Event{ID: s.f.id, Namespace: s.f.ns, Type: s.f.typ, Message: s.f.msg, Data: s.data}
	if len(s.f.meta) > 0 {
		ev.Metadata = s.f.meta
	}
	return ev, fmt.Sprintf("event %d", s.n), nil
}

// maxEventLine is the longest JSON line inject reads: the longest encoding
// (every byte escaped as \u00XX) of an event that fits a frame.
const maxEventLine = 6*h3x.DefaultMaxFrameSize + 64<<10

type lineSource struct {
	sc        *bufio.Scanner
	defaultNS string
	line      int
}

func newLineSource(r io.Reader, defaultNS string) *lineSource {
	sc := bufio.NewScanner(r)
	// A line is the JSON form of an event of at most a frame: base64 makes
	// a body 4/3 as long, and JSON escapes a control character in 6 bytes.
	sc.Buffer(make([]byte, 64<<10), maxEventLine)
	return &lineSource{sc: sc, defaultNS: defaultNS}
}

func (s *lineSource) next() (h3x.Event, string, error) {
	for s.sc.Scan() {
		s.line++
		b := s.sc.Bytes()
		if len(strings.TrimSpace(string(b))) == 0 {
			continue
		}
		label := fmt.Sprintf("line %d", s.line)
		ev, err := parseEventLine(b, s.defaultNS)
		if err != nil {
			return h3x.Event{}, label, fmt.Errorf("%s: %w", label, err)
		}
		return ev, label, nil
	}
	if err := s.sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return h3x.Event{}, "", fmt.Errorf("line %d: longer than %d bytes, more than any event that fits the maximum frame size", s.line+1, maxEventLine)
		}
		return h3x.Event{}, "", fmt.Errorf("reading events: %w", err)
	}
	return h3x.Event{}, "", io.EOF
}

// pendingBatch is a publish in flight and the labels of its events.
type pendingBatch struct {
	call   *h3x.PublishCall
	labels []string
}

// publishAll publishes src's events in batches, up to f.inflight batches
// at once and at most f.rate events/s, and prints the ids in order.
// injectDrain bounds the wait for the publishes in flight when inject is
// interrupted.
const injectDrain = 5 * time.Second

// minRate is the lowest --rate of inject and bench, one event every 10,000
// s: the interval between events must fit a time.Duration many times over.
const minRate = 1e-4

func publishAll(ctx context.Context, e *cmdEnv, c *h3x.Client, src eventSource, total int64, f injectFlags) error {
	out := newProgressOut(e.stdout, total)
	defer out.finish()
	// The publishes in flight when inject is interrupted are not cancelled
	// with ctx: the server may have stored them, and inject prints what was
	// stored. They get injectDrain to finish, then are cancelled.
	pubCtx, cancelPubs := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelPubs()
	stopDrain := context.AfterFunc(ctx, func() { time.AfterFunc(injectDrain, cancelPubs) })
	defer stopDrain()

	batchSize := f.batch
	var interval time.Duration // per event, with --rate
	if f.rate > 0 {
		interval = time.Duration(float64(time.Second) / f.rate)
		// Batches of at most 10 ms worth of events keep the pace even.
		batchSize = max(1, min(f.batch, int(f.rate/100)))
	}

	var published, refused int
	var firstRefusal string
	var fifo []pendingBatch
	settle := func() error {
		p := fifo[0]
		fifo = fifo[1:]
		res, err := p.call.Result()
		if err != nil {
			return err
		}
		for i, r := range res {
			if r.Status == h3x.PublishRefused {
				refused++
				msg := fmt.Sprintf("%s refused: %v", p.labels[i], r.Err)
				if firstRefusal == "" {
					firstRefusal = msg
				}
				if f.client.verbose {
					fmt.Fprintf(e.stderr, "h3x inject: %s\n", oneLine(errors.New(msg)))
				}
				continue
			}
			published++
			if !f.quiet {
				out.line(r.ID)
			}
		}
		out.add(len(res))
		if err := out.flush(); err != nil {
			return outputError{err}
		}
		return nil
	}
	// stoppedAt adds to a failure to write out the ids how many events
	// were published: inject sends no more, but those published are stored
	// whether or not their ids were printed.
	stoppedAt := func(err error) error {
		count := fmt.Sprint(published)
		if total > 0 {
			count = fmt.Sprintf("%d of %d", published, total)
		}
		noun := "events were"
		if published == 1 {
			noun = "event was"
		}
		return fmt.Errorf("%w (%s %s published; not all of their ids were printed)", err, count, noun)
	}

	// stop settles what is in flight, printing the ids stored, and
	// returns err.
	stop := func(err error) error {
		for len(fifo) > 0 {
			if serr := settle(); serr != nil && err == nil {
				err = serr
			}
		}
		if errors.As(err, new(outputError)) {
			return stoppedAt(err)
		}
		if errors.Is(err, context.Canceled) {
			return fmt.Errorf("interrupted after %d events were published", published)
		}
		return err
	}

	start := time.Now()
	sent := 0
	var srcErr error // a malformed line: the loop ends after publishing the lines before it
	for done := false; !done; {
		batch := make([]h3x.Event, 0, batchSize)
		labels := make([]string, 0, batchSize)
		for len(batch) < batchSize {
			ev, label, err := src.next()
			if errors.Is(err, io.EOF) {
				done = true
				break
			}
			if err != nil {
				// The events before a malformed line are published: what
				// is stored does not depend on where a batch ends.
				srcErr, done = err, true
				break
			}
			batch = append(batch, ev)
			labels = append(labels, label)
		}
		if len(batch) == 0 {
			break
		}
		if interval > 0 {
			if err := sleepUntil(ctx, start.Add(time.Duration(sent)*interval)); err != nil {
				return stop(err)
			}
		}
		if len(fifo) == f.inflight {
			if err := settle(); err != nil {
				return stop(err)
			}
		}
		if err := ctx.Err(); err != nil {
			return stop(err) // interrupted: nothing new goes out
		}
		fifo = append(fifo, pendingBatch{call: c.PublishAsync(pubCtx, batch...), labels: labels})
		sent += len(batch)
	}
	if err := stop(srcErr); err != nil {
		return err
	}
	if err := out.finish(); err != nil {
		return stoppedAt(outputError{err})
	}
	if refused > 0 {
		return fmt.Errorf("%d of %d events refused; first: %s", refused, refused+published, firstRefusal)
	}
	return nil
}

// outputError is a failure to write the ids out (a closed pipe, as in
// "h3x inject ... | head -1").
type outputError struct{ err error }

func (o outputError) Error() string { return "writing ids: " + o.err.Error() }
func (o outputError) Unwrap() error { return o.err }

func sleepUntil(ctx context.Context, t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

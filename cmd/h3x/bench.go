package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"

	"github.com/h3x-io/h3x"
)

const benchAbout = `
Bench runs --publishers publishing clients and --consumers consuming
clients, each on its own connection, for --duration or --count events, and
reports events/s for publishing and consuming and latency percentiles from
HDR histograms:

  publish→ack       from sending a publish until the server acknowledged it
                    as durable (per event: its batch's time);
  publish→delivery  from sending an event until a consumer received it.

Each event's body starts with a run id and its send time, so the latency
needs the clocks of the bench and its consumers to agree: run them on one
machine. With --rate the load follows a fixed schedule and latencies count
from each event's scheduled time, so a stall shows up in them instead of
silently slowing the load (no coordinated omission).

Without --addr, bench starts an embedded server on a random loopback port
with a temporary data directory (--durability, --queue); with --addr it
targets a running server with the usual client flags, in namespace --ns.
A flag that would be ignored is a usage error: a client flag (--client,
--token, --fingerprint, --ca-file, --insecure) without --addr, an
embedded-server flag with it, --data-dir or --durability with --queue
memory. (Their environment variables are not refused, only ignored.)
Consumers ack what they receive and ignore (but ack) events of other runs.

On a terminal, a live progress line is shown on stderr. --json prints the
results as one JSON object. Events refused by the server (a namespace the
client may not publish to, say) make bench exit with status 1 after its
results; their publish→ack time is not counted.`

type benchFlags struct {
	client     clientFlags
	durability *choiceFlag
	queue      *choiceFlag
	dataDir    string
	ns         string
	publishers int
	consumers  int
	size       int
	duration   time.Duration
	count      int64
	rate       float64
	batch      int
	inflight   int
	fetch      int
	drain      time.Duration
	jsonOut    bool
	serverLogs bool
	cpuProfile string
}

// benchResult is the --json output.
type benchResult struct {
	Target            string      `json:"target"` // "embedded" or the address
	Queue             string      `json:"queue,omitempty"`
	Durability        string      `json:"durability,omitempty"`
	Publishers        int         `json:"publishers"`
	Consumers         int         `json:"consumers"`
	EventSize         int         `json:"event_size"`
	Batch             int         `json:"batch"`
	Inflight          int         `json:"inflight"`
	Rate              float64     `json:"rate,omitempty"`
	Duration          string      `json:"duration,omitempty"`
	Count             int64       `json:"count,omitempty"`
	Published         int64       `json:"published"`
	PublishSeconds    float64     `json:"publish_seconds"`
	PublishRate       float64     `json:"publish_events_per_sec"`
	Consumed          int64       `json:"consumed"`
	ConsumeSeconds    float64     `json:"consume_seconds"`
	ConsumeRate       float64     `json:"consume_events_per_sec"`
	Redelivered       int64       `json:"redelivered"`
	Duplicates        int64       `json:"duplicates"`
	Refused           int64       `json:"refused"`
	PublishErrors     int64       `json:"publish_errors"`
	Interrupted       bool        `json:"interrupted,omitempty"`
	Drained           bool        `json:"drained"`
	PublishToAck      latencySumm `json:"publish_to_ack_us"`
	PublishToDelivery latencySumm `json:"publish_to_delivery_us"`
}

// latencySumm summarizes a histogram, in microseconds.
type latencySumm struct {
	Count int64   `json:"count"`
	Mean  float64 `json:"mean"`
	P50   int64   `json:"p50"`
	P90   int64   `json:"p90"`
	P99   int64   `json:"p99"`
	P999  int64   `json:"p99_9"`
	Max   int64   `json:"max"`
}

// Latencies are recorded in microseconds, from 1 µs to 10 minutes, with 3
// significant digits.
const histMax = int64(10 * time.Minute / time.Microsecond)

func newHist() *hdrhistogram.Histogram { return hdrhistogram.New(1, histMax, 3) }

func summarize(h *hdrhistogram.Histogram) latencySumm {
	return latencySumm{
		Count: h.TotalCount(),
		Mean:  float64(int64(h.Mean()*10)) / 10,
		P50:   h.ValueAtQuantile(50),
		P90:   h.ValueAtQuantile(90),
		P99:   h.ValueAtQuantile(99),
		P999:  h.ValueAtQuantile(99.9),
		Max:   h.Max(),
	}
}

func record(h *hdrhistogram.Histogram, d time.Duration, n int64) {
	us := min(max(int64(d/time.Microsecond), 1), histMax)
	h.RecordValues(us, n)
}

// stampSize is the run id and send time at the start of each body.
const stampSize = 16

func runBench(ctx context.Context, e *cmdEnv, args []string) error {
	f := benchFlags{
		durability: newChoice("fsync", "fsync", "nosync"),
		queue:      newChoice("badger", "badger", "memory"),
	}
	fs := newFlagSet(e, "[flags]", benchAbout)
	fs.stringVar(&f.client.addr, "addr", "", "", "target the running server at `address` instead of an embedded one")
	f.client.registerCommon(fs)
	fs.value(f.durability, "durability", "", "embedded server: durability `mode`, fsync or nosync")
	fs.value(f.queue, "queue", "", "embedded server: queue `kind`, badger or memory")
	fs.stringVar(&f.dataDir, "data-dir", "", "", "embedded server: data `directory` (default: a temporary one, removed afterwards)")
	fs.boolVar(&f.serverLogs, "server-logs", "", false, "embedded server: log warnings and errors to stderr")
	fs.stringVar(&f.ns, "ns", "", "bench", "`namespace` to publish to and consume from")
	fs.intVar(&f.publishers, "publishers", "", 1, "publishing clients")
	fs.intVar(&f.consumers, "consumers", "", 1, "consuming clients (0: publish only)")
	fs.intVar(&f.size, "size", "", 256, "event body size in `bytes` (at least 16)")
	fs.durationVar(&f.duration, "duration", "", 10*time.Second, "how long to publish")
	fs.int64Var(&f.count, "count", "", 0, "publish this many events in all instead of for --duration")
	fs.floatVar(&f.rate, "rate", "", 0, "total publish rate in `events/s` on a fixed schedule (0: as fast as possible)")
	fs.intVar(&f.batch, "batch", "", 100, "events per publish request (at most 1000)")
	fs.intVar(&f.inflight, "inflight", "", 0, "publish requests in flight per publisher (default 4; with --rate 64, enough that slow answers do not hold back the schedule)")
	fs.intVar(&f.fetch, "fetch", "", 256, "events per fetch of a consumer")
	fs.durationVar(&f.drain, "drain", "", 30*time.Second, "after publishing, wait at most this long for consumers to catch up")
	fs.boolVar(&f.jsonOut, "json", "", false, "print the results as JSON")
	fs.stringVar(&f.cpuProfile, "cpuprofile", "", "", "write a CPU profile of the run (embedded server included) to `file`")
	if err := fs.parse(args); err != nil {
		return err
	}
	if err := fs.noArgs(); err != nil {
		return err
	}
	if !fs.cli["inflight"] {
		f.inflight = 4
		if f.rate > 0 {
			f.inflight = 64
		}
	}
	switch {
	case f.publishers < 1:
		return usagef("--publishers must be at least 1")
	case f.consumers < 0:
		return usagef("--consumers must not be negative")
	case f.size < stampSize:
		return usagef("--size must be at least %d: each body carries a run id and a send time", stampSize)
	case f.size > h3x.DefaultMaxFrameSize/2:
		return usagef("--size must be at most %d", h3x.DefaultMaxFrameSize/2)
	case f.batch < 1 || f.batch > h3x.DefaultMaxEventsPerSend:
		return usagef("--batch must be between 1 and %d", h3x.DefaultMaxEventsPerSend)
	case f.batch*(f.size+64) > h3x.DefaultMaxFrameSize:
		return usagef("--batch × --size exceeds the maximum frame size (1 MiB)")
	case f.inflight < 1:
		return usagef("--inflight must be at least 1")
	case f.fetch < 1 || f.fetch > h3x.DefaultMaxFetchLimit:
		return usagef("--fetch must be between 1 and %d", h3x.DefaultMaxFetchLimit)
	case f.count < 0 || f.rate < 0:
		return usagef("--count and --rate must not be negative")
	case f.rate > 0 && f.rate < minRate:
		return usagef("--rate must be 0 (as fast as possible) or at least %g events/s", minRate)
	case f.count > 0 && fs.cli["duration"]:
		return usagef("give --duration or --count, not both")
	case f.count == 0 && f.duration <= 0:
		return usagef("--duration must be positive")
	}
	// Flags given on the command line that would be ignored. (Their
	// variables are not refused: they may be set for the other commands.)
	if f.client.addr == "" {
		if err := fs.ignoredFlags("for a running server (--addr); the embedded server makes its own",
			"client", "token", "fingerprint", "ca-file", "insecure"); err != nil {
			return err
		}
		if f.queue.v == "memory" {
			if err := fs.ignoredFlags("for the badger queue, not --queue memory", "durability", "data-dir"); err != nil {
				return err
			}
		}
	} else if err := fs.ignoredFlags("for the embedded server, not a running one (--addr)",
		"queue", "durability", "data-dir", "server-logs"); err != nil {
		return err
	}
	if err := h3x.ValidateNamespace(f.ns); err != nil {
		return badNamespace(fs.source("ns"), err)
	}

	res := benchResult{
		Publishers: f.publishers, Consumers: f.consumers, EventSize: f.size,
		Batch: f.batch, Inflight: f.inflight, Rate: f.rate, Count: f.count,
	}
	if f.count == 0 {
		res.Duration = f.duration.String()
	}
	stderrLog := slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if f.client.addr == "" {
		stop, err := startEmbedded(&f, stderrLog)
		if err != nil {
			return err
		}
		defer stop()
		res.Target, res.Queue, res.Durability = "embedded", f.queue.v, f.durability.v
		if f.queue.v == "memory" {
			res.Durability = ""
		}
	} else {
		res.Target = f.client.addr
	}
	opts, err := f.client.options(e)
	if err != nil {
		return err
	}
	quietStdLog(stderrLog) // quic-go's UDP buffer warning matters to a benchmark
	opts = append(opts, h3x.WithPublishBuffer(max(h3x.DefaultPublishBuffer, 2*f.inflight)),
		h3x.WithMaxReconnects(3)) // a benchmark that lost its server should end

	if f.cpuProfile != "" {
		pf, err := os.Create(f.cpuProfile)
		if err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	b := &bench{f: f, e: e}
	if err := b.dial(ctx, opts); err != nil {
		return err
	}
	defer b.closeClients()
	if err := b.run(ctx, &res); err != nil {
		return err
	}
	if f.jsonOut {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return err
		}
	} else {
		printBench(e.stdout, &res)
	}
	return b.refusedError(&res)
}

// startEmbedded starts the embedded server and points f.client at it.
func startEmbedded(f *benchFlags, logger *slog.Logger) (stop func(), err error) {
	var tok [16]byte
	rand.Read(tok[:])
	token := hex.EncodeToString(tok[:])
	reg, err := h3x.ParseRegistry("bench:*=" + token)
	if err != nil {
		return nil, err
	}
	dir := f.dataDir
	removeDir := false
	if dir == "" && f.queue.v == "badger" {
		if dir, err = os.MkdirTemp("", "h3x-bench-*"); err != nil {
			return nil, fmt.Errorf("making a data directory: %w", err)
		}
		removeDir = true
	}
	srvLog := slog.New(slog.DiscardHandler)
	if f.serverLogs {
		srvLog = logger
	}
	qopts := h3x.QueueOptions{Logger: srvLog}
	if f.durability.v == "nosync" {
		qopts.Durability = h3x.DurabilityNoSync
	}
	opts := []h3x.ServerOption{h3x.WithAddr("127.0.0.1:0"), h3x.WithRegistry(reg), h3x.WithLogger(srvLog)}
	if f.queue.v == "memory" {
		opts = append(opts, h3x.WithQueue(h3x.NewMemoryQueue(qopts)))
	} else {
		opts = append(opts, h3x.WithDataDir(dir), h3x.WithQueueOptions(qopts))
	}
	cleanup := func() {
		if removeDir {
			os.RemoveAll(dir)
		}
	}
	srv, err := h3x.NewServer(opts...)
	if err != nil {
		cleanup()
		return nil, err
	}
	if err := srv.Start(context.Background()); err != nil {
		srv.Close()
		cleanup()
		return nil, err
	}
	f.client.addr = srv.Addr().String()
	f.client.clientID, f.client.token = "bench", token
	f.client.fingerprint, f.client.caFile, f.client.insecure = srv.Fingerprint(), "", false
	return func() {
		srv.Close()
		cleanup()
	}, nil
}

type bench struct {
	f     benchFlags
	e     *cmdEnv
	runID uint64

	pubs, cons []*h3x.Client

	published, duplicates, refused, pubErrors atomic.Int64
	consumed, redelivered                     atomic.Int64
	lastConsumed                              atomic.Int64 // UnixNano of the latest counted delivery
	target                                    atomic.Int64 // consumers are done at this many; 0: not known yet
	consDone                                  chan struct{}
	consDoneOnce                              sync.Once

	firstErr     atomic.Pointer[error]  // the first failed publish
	firstRefusal atomic.Pointer[string] // why the first refused event was refused

	mu                   sync.Mutex
	ackHist, deliverHist *hdrhistogram.Histogram
}

func (b *bench) dial(ctx context.Context, opts []h3x.ClientOption) error {
	dialOne := func() (*h3x.Client, error) {
		dctx, cancel := context.WithTimeout(ctx, b.f.client.timeout)
		defer cancel()
		c, err := h3x.Dial(dctx, b.f.client.addr, opts...)
		if err != nil {
			return nil, b.f.client.explain(ctx, err)
		}
		return c, nil
	}
	for range b.f.publishers {
		c, err := dialOne()
		if err != nil {
			return err
		}
		b.pubs = append(b.pubs, c)
	}
	for range b.f.consumers {
		c, err := dialOne()
		if err != nil {
			return err
		}
		b.cons = append(b.cons, c)
	}
	return nil
}

func (b *bench) closeClients() {
	var wg sync.WaitGroup
	for _, c := range append(b.pubs, b.cons...) {
		wg.Go(func() { c.Close() })
	}
	wg.Wait()
	b.pubs, b.cons = nil, nil
}

func (b *bench) merge(into **hdrhistogram.Histogram, h *hdrhistogram.Histogram) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if *into == nil {
		*into = newHist()
	}
	(*into).Merge(h)
}

func (b *bench) run(ctx context.Context, res *benchResult) error {
	var id [8]byte
	rand.Read(id[:])
	b.runID = binary.LittleEndian.Uint64(id[:])
	b.consDone = make(chan struct{})
	b.ackHist, b.deliverHist = newHist(), newHist()

	// Consumers first, so they wait for the first events.
	cctx, stopConsumers := context.WithCancel(ctx)
	defer stopConsumers()
	var cwg sync.WaitGroup
	var subErr atomic.Pointer[error]
	for _, c := range b.cons {
		sub, err := c.Subscribe(cctx, []string{b.f.ns}, h3x.SubscribeOptions{BatchSize: b.f.fetch, MaxUnacked: 4 * b.f.fetch})
		if err != nil {
			return fmt.Errorf("subscribing to %q: %w", b.f.ns, err)
		}
		cwg.Go(func() {
			b.consume(sub)
			if err := sub.Err(); err != nil && cctx.Err() == nil {
				subErr.Store(&err)
			}
		})
	}
	if len(b.cons) == 0 {
		b.consDoneOnce.Do(func() { close(b.consDone) })
	}

	start := time.Now()
	progressDone := b.progress(ctx, start)

	// Publishers.
	pctx, stopPublishers := context.WithCancel(ctx)
	defer stopPublishers()
	var end time.Time
	if b.f.count == 0 {
		end = start.Add(b.f.duration)
		if b.f.rate == 0 { // a schedule ends by itself, after its last due time
			t := time.AfterFunc(b.f.duration, stopPublishers)
			defer t.Stop()
		}
	}
	var pwg sync.WaitGroup
	for i, c := range b.pubs {
		quota := int64(-1)
		if b.f.count > 0 {
			quota = b.f.count / int64(len(b.pubs))
			if int64(i) < b.f.count%int64(len(b.pubs)) {
				quota++
			}
		}
		pwg.Go(func() { b.publisher(ctx, pctx, c, start, end, quota) })
	}
	pwg.Wait()
	pubEnd := time.Now()

	// Let the consumers catch up with what was stored (when nothing was,
	// there is nothing to wait for).
	stored := b.published.Load() + b.duplicates.Load()
	b.target.Store(max(stored, 1))
	if stored == 0 || b.consumed.Load() >= b.target.Load() {
		b.consDoneOnce.Do(func() { close(b.consDone) })
	}
	drained := true
	if len(b.cons) > 0 && stored > 0 {
		t := time.NewTimer(b.f.drain)
		select {
		case <-b.consDone:
		case <-t.C:
			drained = false
		case <-ctx.Done():
			drained = false
		}
		t.Stop()
	}
	stopConsumers()
	cwg.Wait()
	progressDone()
	if p := subErr.Load(); p != nil {
		return fmt.Errorf("consuming: %w", *p)
	}

	res.Published = b.published.Load()
	res.Duplicates = b.duplicates.Load()
	res.Refused = b.refused.Load()
	res.PublishErrors = b.pubErrors.Load()
	res.PublishSeconds = round3(pubEnd.Sub(start).Seconds())
	res.PublishRate = round1(float64(res.Published) / pubEnd.Sub(start).Seconds())
	res.Consumed = b.consumed.Load()
	res.Redelivered = b.redelivered.Load()
	if last := b.lastConsumed.Load(); last > 0 {
		secs := time.Unix(0, last).Sub(start).Seconds()
		res.ConsumeSeconds = round3(secs)
		res.ConsumeRate = round1(float64(res.Consumed) / secs)
	}
	res.Drained = drained && len(b.cons) > 0
	res.Interrupted = ctx.Err() != nil
	res.PublishToAck = summarize(b.ackHist)
	res.PublishToDelivery = summarize(b.deliverHist)
	if p := b.firstErr.Load(); p != nil {
		if res.Published == 0 {
			return fmt.Errorf("publishing: %w", *p)
		}
		fmt.Fprintf(b.e.stderr, "h3x bench: warning: %d publish requests failed; first: %s\n", res.PublishErrors, oneLine(*p))
	}
	return nil
}

// refusedError is the failure of a bench whose server refused events, as
// inject's: the results are printed, then this, with status 1.
func (b *bench) refusedError(res *benchResult) error {
	if res.Refused == 0 {
		return nil
	}
	first := ""
	if p := b.firstRefusal.Load(); p != nil {
		first = "; first: " + *p
	}
	return fmt.Errorf("%d of %d events refused%s", res.Refused, res.Refused+res.Published+res.Duplicates, first)
}

func round1(v float64) float64 { return float64(int64(v*10+0.5)) / 10 }
func round3(v float64) float64 { return float64(int64(v*1000+0.5)) / 1000 }

// publisher runs one client's publishing workers until pctx ends or its
// quota (when not negative) is published. Requests run under ctx, which
// outlives pctx: those in flight at the deadline finish and are counted.
func (b *bench) publisher(ctx, pctx context.Context, c *h3x.Client, start, end time.Time, quota int64) {
	var left atomic.Int64
	left.Store(quota)
	// claim takes up to n events of the quota; with no quota, n.
	claim := func(n int) int {
		if quota < 0 {
			return n
		}
		for {
			l := left.Load()
			if l <= 0 {
				return 0
			}
			k := min(int64(n), l)
			if left.CompareAndSwap(l, l-k) {
				return int(k)
			}
		}
	}
	// With --rate, a scheduler hands out due times; workers stamp events
	// with them, so latency counts from when an event should have gone.
	var tickets chan time.Time
	batch := b.f.batch
	if b.f.rate > 0 {
		perPub := b.f.rate / float64(len(b.pubs))
		batch = max(1, min(b.f.batch, int(perPub/1000))) // at most 1 ms of events per request
		interval := time.Duration(float64(batch) / perPub * float64(time.Second))
		tickets = make(chan time.Time, 1<<14)
		maxTickets := int64(-1) // with a quota, enough tickets for it and no more
		if quota >= 0 {
			maxTickets = (quota + int64(batch) - 1) / int64(batch)
		}
		go func() {
			defer close(tickets)
			for i := int64(0); i != maxTickets; i++ {
				due := start.Add(time.Duration(i) * interval)
				if !end.IsZero() && !due.Before(end) {
					return
				}
				if err := sleepUntil(pctx, due); err != nil {
					return
				}
				select {
				case tickets <- due:
				case <-pctx.Done():
					return
				}
			}
		}()
	}
	var wg sync.WaitGroup
	for range b.f.inflight {
		wg.Go(func() {
			h := newHist()
			defer b.merge(&b.ackHist, h)
			bodies := make([][]byte, batch)
			for i := range bodies {
				bodies[i] = make([]byte, b.f.size)
				for j := stampSize; j < b.f.size; j++ {
					bodies[i][j] = 'a' + byte(j%26)
				}
				binary.LittleEndian.PutUint64(bodies[i], b.runID)
			}
			events := make([]h3x.Event, batch)
			for {
				var due time.Time
				if tickets != nil {
					var ok bool
					if due, ok = <-tickets; !ok {
						return
					}
				} else if pctx.Err() != nil {
					return
				}
				n := claim(batch)
				if n == 0 {
					return
				}
				stamp := due
				if stamp.IsZero() {
					stamp = time.Now()
				}
				for i := range n {
					binary.LittleEndian.PutUint64(bodies[i][8:], uint64(stamp.UnixNano()))
					events[i] = h3x.Event{Namespace: b.f.ns, Type: "bench", Data: bodies[i]}
				}
				results, err := c.Publish(ctx, events[:n]...)
				took := time.Since(stamp)
				if err != nil {
					// Publish retries what can be retried: this worker is done.
					if ctx.Err() == nil {
						b.pubErrors.Add(1)
						b.firstErr.CompareAndSwap(nil, &err)
					}
					return
				}
				var stored, dups int64
				for _, r := range results {
					switch r.Status {
					case h3x.PublishStored:
						stored++
					case h3x.PublishDuplicate:
						dups++
					default:
						b.refused.Add(1)
						if b.firstRefusal.Load() == nil {
							msg := fmt.Sprint(r.Err)
							b.firstRefusal.CompareAndSwap(nil, &msg)
						}
					}
				}
				b.published.Add(stored)
				b.duplicates.Add(dups)
				// Only events acknowledged as durable have a publish→ack
				// time (a duplicate's is: the server has it).
				if stored+dups > 0 {
					record(h, took, stored+dups)
				}
			}
		})
	}
	wg.Wait()
}

// consume reads one subscription until it closes.
func (b *bench) consume(sub *h3x.Subscription) {
	h := newHist()
	defer b.merge(&b.deliverHist, h)
	for d := range sub.Events() {
		now := time.Now()
		data := d.Event.Data
		if len(data) >= stampSize && binary.LittleEndian.Uint64(data) == b.runID {
			sent := time.Unix(0, int64(binary.LittleEndian.Uint64(data[8:])))
			if d.Attempt() > 1 {
				b.redelivered.Add(1)
			} else {
				record(h, now.Sub(sent), 1)
				n := b.consumed.Add(1)
				b.lastConsumed.Store(now.UnixNano())
				if t := b.target.Load(); t > 0 && n >= t {
					b.consDoneOnce.Do(func() { close(b.consDone) })
				}
			}
		}
		d.Ack()
	}
}

// progress shows a live line on stderr when it is a terminal; the returned
// func stops it and erases the line.
func (b *bench) progress(ctx context.Context, start time.Time) func() {
	if !isTerminal(b.e.stderr) {
		return func() {}
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		var lastPub, lastCon int64
		last := start
		for {
			select {
			case <-stop:
				fmt.Fprint(b.e.stderr, "\r\033[K")
				return
			case now := <-t.C:
				pub, con := b.published.Load(), b.consumed.Load()
				dt := now.Sub(last).Seconds()
				fmt.Fprintf(b.e.stderr, "\r\033[K%5.1fs  published %s (%s/s)  consumed %s (%s/s)  backlog %s",
					now.Sub(start).Seconds(), groupDigits(pub), groupDigits(int64(float64(pub-lastPub)/dt)),
					groupDigits(con), groupDigits(int64(float64(con-lastCon)/dt)), groupDigits(max(pub-con, 0)))
				lastPub, lastCon, last = pub, con, now
			}
		}
	}()
	return func() {
		close(stop)
		<-done
	}
}

func printBench(w io.Writer, r *benchResult) {
	target := r.Target
	if r.Target == "embedded" {
		target = "embedded server (" + r.Queue
		if r.Durability != "" {
			target += ", " + r.Durability
		}
		target += ")"
	}
	load := r.Duration
	if r.Count > 0 {
		load = groupDigits(r.Count) + " events"
	}
	if r.Rate > 0 {
		load += fmt.Sprintf(" at %s ev/s", groupDigits(int64(r.Rate)))
	}
	fmt.Fprintf(w, "target     %s\n", target)
	fmt.Fprintf(w, "load       %d publisher(s) × %d in flight × batch %d, %d consumer(s), %d-byte events, %s\n",
		r.Publishers, r.Inflight, r.Batch, r.Consumers, r.EventSize, load)
	fmt.Fprintf(w, "publish    %s events in %.2fs: %s ev/s", groupDigits(r.Published), r.PublishSeconds, groupDigits(int64(r.PublishRate)))
	if r.Refused+r.PublishErrors+r.Duplicates > 0 {
		fmt.Fprintf(w, " (%d refused, %d failed requests, %d duplicates)", r.Refused, r.PublishErrors, r.Duplicates)
	}
	fmt.Fprintln(w)
	if r.Consumers > 0 {
		fmt.Fprintf(w, "consume    %s events in %.2fs: %s ev/s", groupDigits(r.Consumed), r.ConsumeSeconds, groupDigits(int64(r.ConsumeRate)))
		if r.Redelivered > 0 {
			fmt.Fprintf(w, " (%d redelivered)", r.Redelivered)
		}
		if !r.Drained {
			fmt.Fprint(w, " (consumers did not catch up)")
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\n%-18s %9s %9s %9s %9s %9s %9s\n", "latency (µs)", "mean", "p50", "p90", "p99", "p99.9", "max")
	row := func(name string, s latencySumm) {
		fmt.Fprintf(w, "%-18s %9.0f %9d %9d %9d %9d %9d\n", name, s.Mean, s.P50, s.P90, s.P99, s.P999, s.Max)
	}
	row("publish→ack", r.PublishToAck)
	if r.Consumers > 0 {
		row("publish→delivery", r.PublishToDelivery)
	}
	if r.Interrupted {
		fmt.Fprintln(w, "\n(interrupted)")
	}
}

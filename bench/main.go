// Command bench runs H3X side by side with NATS JetStream and Redis Streams
// on this machine and writes a markdown table of the results.
//
// It installs nothing: Debian's nats-server and redis-server must be in
// PATH (apt-get install nats-server redis-server). It builds the H3X bench
// server (./cmd/h3x-bench-server) and starts every server as a process of
// its own on loopback, with its data in a temporary directory, fresh for
// every run. Run it from this directory:
//
//	go run . -reps 5 -out ../BENCHMARKS-table.md
//
// Each repetition runs every system in both durability classes, the
// systems interleaved (their order rotating between repetitions). A run
// measures, with 256-byte events:
//
//   - publish throughput with a pipelining publisher, -pub-count events;
//   - consume+ack throughput from that backlog (at most -consume-max
//     events);
//   - publish→delivery latency p50/p99 at -lat-rate events/s for -lat-dur
//     (after a warm-up), the send time carried in the payload;
//   - the server's peak RSS (VmHWM) at the end of the run.
//
// -scale N then measures N idle authenticated H3X clients on one server
// (see scale.go). -fairness-only runs instead a calm publisher beside a
// full-speed flood in every system (see fairness.go).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"
)

type config struct {
	reps       int
	out        string
	pubCount   int
	consumeMax int
	latRate    int
	latWarm    time.Duration
	latDur     time.Duration
	classes    []class
	systems    []string
	scale      int
	scaleOnly  bool
	scalePubs  int  // the new client's sequential publishes
	scaleBare  bool // measure bare quic-go instead of H3X
	scaleGOGC  int  // the scale test server's GOGC (0: default)
	probeBin   string
	profileDir string
	natsBin    string
	redisBin   string
	h3xBin     string
	workDir    string
	h3x        h3xParams
	nats       natsParams
	redis      redisParams
	syncAlways bool // nats-server supports sync_interval: always
	fairOnly   bool // run only the fairness comparison (fairness.go)
	fairRate   int
	fairDur    time.Duration
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("bench: ")
	var cfg config
	var classes, systems string
	flag.IntVar(&cfg.reps, "reps", 5, "repetitions")
	flag.StringVar(&cfg.out, "out", "", "also write the markdown table to this file")
	flag.IntVar(&cfg.pubCount, "pub-count", 300_000, "publish phase: events published (the same backlog for every system)")
	flag.IntVar(&cfg.consumeMax, "consume-max", 300_000, "consume at most this many events of the backlog")
	flag.IntVar(&cfg.latRate, "lat-rate", 5000, "latency phase: events per second")
	flag.DurationVar(&cfg.latWarm, "lat-warm", 500*time.Millisecond, "latency phase: warm-up not counted")
	flag.DurationVar(&cfg.latDur, "lat-dur", 3*time.Second, "latency phase: measured duration")
	flag.StringVar(&classes, "classes", "crash,fsync", "durability classes to run: crash, fsync")
	flag.StringVar(&systems, "systems", "h3x,nats,redis", "systems to run")
	flag.IntVar(&cfg.scale, "scale", 10_000, "idle H3X clients for the scale test (0: skip it)")
	flag.BoolVar(&cfg.scaleOnly, "scale-only", false, "run only the scale test")
	flag.IntVar(&cfg.scalePubs, "scale-publishes", 1000, "scale test: the new client's sequential publishes")
	flag.IntVar(&cfg.scaleGOGC, "scale-gogc", 0, "scale test: the server's GOGC percentage (0: the runtime default, 100)")
	flag.BoolVar(&cfg.scaleBare, "scale-bare", false, "scale test: bare quic-go connections instead of H3X clients (the per-connection floor)")
	flag.StringVar(&cfg.profileDir, "profile", "", "capture CPU profiles of the H3X server's publish, consume and latency phases into this directory (first repetition), and heap and goroutine profiles in the scale test")
	flag.StringVar(&cfg.natsBin, "nats-server", "", "nats-server binary (default: from PATH)")
	flag.StringVar(&cfg.redisBin, "redis-server", "", "redis-server binary (default: from PATH)")
	flag.StringVar(&cfg.h3xBin, "h3x-server", "", "prebuilt h3x-bench-server binary (default: go build ./cmd/h3x-bench-server)")
	flag.StringVar(&cfg.workDir, "workdir", "", "where the servers keep their data (default: a new temporary directory, removed afterwards)")
	flag.IntVar(&cfg.h3x.batch, "h3x-batch", 256, "H3X publisher: events per PublishAsync")
	flag.IntVar(&cfg.h3x.inflight, "h3x-inflight", 32, "H3X publisher: PublishAsync calls in flight")
	flag.IntVar(&cfg.h3x.unacked, "h3x-unacked", 4096, "H3X consumer: SubscribeOptions.MaxUnacked")
	flag.IntVar(&cfg.h3x.fetchSize, "h3x-fetch", 1000, "H3X consumer: SubscribeOptions.BatchSize")
	flag.IntVar(&cfg.nats.maxPending, "nats-pending", 1024, "JetStream publisher: PublishAsync max pending")
	flag.IntVar(&cfg.nats.maxAckPending, "nats-ack-pending", 4096, "JetStream consumer: MaxAckPending")
	flag.IntVar(&cfg.nats.pullBatch, "nats-pull", 1000, "JetStream consumer: PullMaxMessages")
	flag.IntVar(&cfg.redis.pipeline, "redis-pipeline", 256, "Redis publisher: XADDs per pipeline")
	flag.IntVar(&cfg.redis.conns, "redis-conns", 4, "Redis publisher: pipelines in flight")
	flag.IntVar(&cfg.redis.readCount, "redis-count", 1000, "Redis consumer: XREADGROUP COUNT")
	flag.BoolVar(&cfg.fairOnly, "fairness-only", false, "run only the fairness comparison: a calm namespace's p99 alone and beside a full-speed flood, every system (first class of -classes)")
	flag.IntVar(&cfg.fairRate, "fair-rate", 1000, "fairness: the calm publisher's events per second")
	flag.DurationVar(&cfg.fairDur, "fair-dur", 2*time.Second, "fairness: each calm run's measured duration (after -lat-warm)")
	flag.Parse()
	for _, c := range strings.Split(classes, ",") {
		switch strings.TrimSpace(c) {
		case "crash":
			cfg.classes = append(cfg.classes, crashSafe)
		case "fsync":
			cfg.classes = append(cfg.classes, fsyncAck)
		default:
			log.Fatalf("-classes: unknown class %q", c)
		}
	}
	for _, s := range strings.Split(systems, ",") {
		s = strings.TrimSpace(s)
		if !slices.Contains([]string{"h3x", "nats", "redis"}, s) {
			log.Fatalf("-systems: unknown system %q", s)
		}
		cfg.systems = append(cfg.systems, s)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, &cfg); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, cfg *config) error {
	var err error
	if cfg.fairOnly {
		cfg.scale = 0
	}
	if !cfg.scaleOnly {
		if slices.Contains(cfg.systems, "nats") {
			if cfg.natsBin, err = lookPeer("nats-server", cfg.natsBin); err != nil {
				return err
			}
		}
		if slices.Contains(cfg.systems, "redis") {
			if cfg.redisBin, err = lookPeer("redis-server", cfg.redisBin); err != nil {
				return err
			}
		}
	}
	if cfg.workDir == "" {
		if cfg.workDir, err = os.MkdirTemp("", "h3x-bench-"); err != nil {
			return err
		}
		defer os.RemoveAll(cfg.workDir)
	}
	if cfg.h3xBin == "" {
		cfg.h3xBin = filepath.Join(cfg.workDir, "h3x-bench-server")
		build := exec.CommandContext(ctx, "go", "build", "-o", cfg.h3xBin, "./cmd/h3x-bench-server")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("building the H3X bench server (run from the bench directory): %w", err)
		}
	}
	if cfg.scale > 0 {
		cfg.probeBin = filepath.Join(cfg.workDir, "h3x-scale-probe")
		build := exec.CommandContext(ctx, "go", "build", "-o", cfg.probeBin, "./cmd/h3x-scale-probe")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("building the scale probe (run from the bench directory): %w", err)
		}
	}
	raiseFileLimit()
	env := describeEnv(cfg)
	var out io.Writer = os.Stdout
	var file *os.File
	if cfg.out != "" {
		if file, err = os.Create(cfg.out); err != nil {
			return err
		}
		defer file.Close()
		out = io.MultiWriter(os.Stdout, file)
	}
	started := time.Now()
	if cfg.fairOnly {
		fr, err := fairness(ctx, cfg)
		if err != nil {
			return err
		}
		writeFairness(out, cfg, fr)
		fmt.Fprintf(out, "\nMachine: %d CPUs, %s RAM, %s, %s. Peers: %s; %s. Whole run: %v.\n", env.cpus, env.mem, env.kernel, env.goVersion, env.nats, env.redis, time.Since(started).Round(time.Second))
		return nil
	}
	var res *results
	if !cfg.scaleOnly {
		if res, err = compare(ctx, cfg); err != nil {
			return err
		}
	}
	var sc *scaleResult
	if cfg.scale > 0 {
		log.Printf("scale test: %d idle clients", cfg.scale)
		if sc, err = scaleTest(ctx, cfg); err != nil {
			return fmt.Errorf("scale test: %w", err)
		}
	}
	writeReport(out, cfg, env, res, sc, time.Since(started))
	return nil
}

// env describes the machine and versions for the report.
type envInfo struct {
	cpus         int
	mem, kernel  string
	goVersion    string
	nats, redis  string
	natsSyncNote string
}

func describeEnv(cfg *config) envInfo {
	e := envInfo{cpus: runtime.NumCPU(), goVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if l, _, ok := strings.Cut(string(b), "\n"); ok {
			e.mem = strings.Join(strings.Fields(l)[1:], " ")
		}
	}
	if b, err := exec.Command("uname", "-sr").Output(); err == nil {
		e.kernel = strings.TrimSpace(string(b))
	}
	if cfg.natsBin != "" {
		b, _ := exec.Command(cfg.natsBin, "--version").Output()
		e.nats = strings.TrimSpace(string(b))
		cfg.syncAlways = natsSyncAlways(cfg.natsBin, cfg.workDir)
		if !cfg.syncAlways {
			e.natsSyncNote = "this nats-server rejects `jetstream { sync_interval: always }` (the option arrived in 2.10) and has no other per-message fsync setting, so its fsync-class runs use the defaults (fsync every 2 min): they are an upper bound for JetStream in that class, not a like-for-like figure"
		}
	}
	if cfg.redisBin != "" {
		b, _ := exec.Command(cfg.redisBin, "--version").Output()
		e.redis = strings.TrimSpace(string(b))
	}
	return e
}

// raiseFileLimit lifts RLIMIT_NOFILE to its hard limit: the scale test
// holds one UDP socket per client.
func raiseFileLimit() {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return
	}
	r.Cur = r.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
}

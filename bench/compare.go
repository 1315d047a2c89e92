package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"
)

// runResult is one run of one system in one class.
type runResult struct {
	published int
	pubRate   float64 // events/s
	consumed  int
	consRate  float64 // events/s
	p50, p99  time.Duration
	latN      int
	// latAchieved is the rate the latency run's publisher kept up (events/s).
	latAchieved float64
	hwmKiB      int64 // peak RSS of the server
	// anonKiB and fileKiB split the server's RSS at the end of the run.
	anonKiB, fileKiB int64
	// CPU time per event (user+system) of the server process and of the
	// clients (the harness process), in the publish and consume phases:
	// a measure that holds even when other work shares the machine.
	pubSrvCPU, pubCliCPU   time.Duration
	consSrvCPU, consCliCPU time.Duration
	latSrvCPU, latCliCPU   time.Duration // at the latency run's fixed rate, one event per publish
}

type key struct {
	cls class
	sys string
}

type results struct {
	runs map[key][]runResult
}

var systemNames = map[string]string{"h3x": "H3X", "nats": "JetStream", "redis": "Redis"}

// compare runs every repetition, interleaving the systems.
func compare(ctx context.Context, cfg *config) (*results, error) {
	res := &results{runs: map[key][]runResult{}}
	for rep := range cfg.reps {
		for _, cls := range cfg.classes {
			// Rotate the order so that no system always runs first.
			order := slices.Clone(cfg.systems)
			for range (rep + int(cls)) % len(order) {
				order = append(order[1:], order[0])
			}
			for _, sys := range order {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				dir := filepath.Join(cfg.workDir, fmt.Sprintf("%s-%d-%s", sys, rep, map[class]string{crashSafe: "crash", fsyncAck: "fsync"}[cls]))
				if err := os.MkdirAll(dir, 0o755); err != nil {
					return nil, err
				}
				profile := ""
				if cfg.profileDir != "" && rep == 0 && sys == "h3x" {
					profile = cfg.profileDir
				}
				r, err := runOne(ctx, cfg, cls, sys, dir, profile)
				if err != nil {
					return nil, fmt.Errorf("rep %d, %s, %s: %w", rep+1, cls, systemNames[sys], err)
				}
				os.RemoveAll(dir)
				res.runs[key{cls, sys}] = append(res.runs[key{cls, sys}], r)
				log.Printf("rep %d %-18s %-9s publish %7.0f/s (CPU/event %4.1f+%4.1fµs)  consume+ack %7.0f/s (%d; %4.1f+%4.1fµs)  p50 %5dµs p99 %6dµs (%d)  peak RSS %4d MiB  load %s",
					rep+1, cls, systemNames[sys], r.pubRate, us(r.pubSrvCPU), us(r.pubCliCPU), r.consRate, r.consumed, us(r.consSrvCPU), us(r.consCliCPU),
					r.p50.Microseconds(), r.p99.Microseconds(), r.latN, r.hwmKiB>>10, loadAvg())
			}
		}
	}
	return res, nil
}

// startTarget starts system sys's server in dir, in class cls, with its
// clients; pprof serves the H3X server's profiles.
func startTarget(ctx context.Context, cfg *config, cls class, sys, dir string, pprof bool) (target, error) {
	switch sys {
	case "h3x":
		return startH3X(ctx, cfg.h3xBin, dir, cls, cfg.h3x, pprof)
	case "nats":
		return startNATS(ctx, cfg.natsBin, dir, cls == fsyncAck && cfg.syncAlways, cfg.nats)
	case "redis":
		return startRedis(ctx, cfg.redisBin, dir, cls, cfg.redis)
	}
	return nil, fmt.Errorf("unknown system %q", sys)
}

func runOne(ctx context.Context, cfg *config, cls class, sys, dir, profileDir string) (runResult, error) {
	t, err := startTarget(ctx, cfg, cls, sys, dir, profileDir != "")
	if err != nil {
		return runResult{}, err
	}
	defer t.Close()
	h, _ := t.(*h3xTarget)
	pid := t.Proc().pid()
	// Cancelled, with the server's log as the cause, if the server dies:
	// its clients would otherwise retry until the run's deadline.
	ctx, stop := untilExit(ctx, t.Proc())
	defer stop()
	var r runResult
	tag := fmt.Sprintf("%s-%s", sys, map[class]string{crashSafe: "crash", fsyncAck: "fsync"}[cls])

	// Publish.
	var prof func() error
	if profileDir != "" {
		prof = captureProfiles(h.srv.pprofAddr, time.Second, filepath.Join(profileDir, tag+"-publish"))
	}
	s0, c0 := procCPU(pid), selfCPU()
	n, el, err := t.Publish(ctx, cfg.pubCount)
	if err != nil {
		return r, fmt.Errorf("publish: %w", exitCause(ctx, err))
	}
	if n > 0 {
		r.pubSrvCPU = (procCPU(pid) - s0) / time.Duration(n)
		r.pubCliCPU = (selfCPU() - c0) / time.Duration(n)
	}
	if prof != nil {
		if err := prof(); err != nil {
			log.Printf("profile: %v", err)
		}
	}
	r.published, r.pubRate = n, float64(n)/el.Seconds()

	// Consume+ack from the backlog.
	r.consumed = min(n, cfg.consumeMax)
	if profileDir != "" {
		prof = captureProfiles(h.srv.pprofAddr, 2*time.Second, filepath.Join(profileDir, tag+"-consume"))
	}
	s0, c0 = procCPU(pid), selfCPU()
	el, err = t.Consume(ctx, r.consumed)
	if err != nil {
		return r, fmt.Errorf("consume: %w", exitCause(ctx, err))
	}
	if r.consumed > 0 {
		r.consSrvCPU = (procCPU(pid) - s0) / time.Duration(r.consumed)
		r.consCliCPU = (selfCPU() - c0) / time.Duration(r.consumed)
	}
	if prof != nil {
		if err := prof(); err != nil {
			log.Printf("profile: %v", err)
		}
	}
	r.consRate = float64(r.consumed) / el.Seconds()

	// Latency at a fixed rate, on a subject of its own.
	prof = nil
	if profileDir != "" {
		prof = captureProfiles(h.srv.pprofAddr, cfg.latWarm+cfg.latDur, filepath.Join(profileDir, tag+"-latency"))
	}
	s0, c0 = procCPU(pid), selfCPU()
	lat, achieved, err := t.Latency(ctx, cfg.latRate, cfg.latWarm, cfg.latDur)
	if err != nil {
		return r, fmt.Errorf("latency: %w", exitCause(ctx, err))
	}
	r.latAchieved = achieved
	if achieved < 0.98*float64(cfg.latRate) {
		log.Printf("%s: the latency run's publisher fell behind: %.0f events/s of %d (its latencies count from the schedule)", tag, achieved, cfg.latRate)
	}
	if sent := time.Duration(float64(cfg.latRate) * (cfg.latWarm + cfg.latDur).Seconds()); sent > 0 {
		r.latSrvCPU = (procCPU(pid) - s0) / sent
		r.latCliCPU = (selfCPU() - c0) / sent
	}
	if prof != nil {
		if err := prof(); err != nil {
			log.Printf("profile: %v", err)
		}
	}
	if len(lat) == 0 {
		return r, fmt.Errorf("latency: nothing delivered")
	}
	slices.Sort(lat)
	r.latN = len(lat)
	r.p50 = lat[len(lat)/2]
	r.p99 = lat[min(len(lat)-1, len(lat)*99/100)]

	_, hwm, err := memKiB(pid)
	if err != nil {
		return r, err
	}
	r.hwmKiB = hwm
	r.anonKiB, r.fileKiB = rssSplitKiB(pid)
	return r, nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// loadAvg returns the 1-minute load average.
func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

// selfCPU returns the harness process's user+system CPU time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// captureProfiles profiles the server (prefix.pprof) and the harness, that
// is the clients (prefix-client.pprof), for about d; the returned function
// waits for both and writes them.
func captureProfiles(addr string, d time.Duration, prefix string) func() error {
	server := captureProfile(addr, d, prefix+".pprof")
	f, err := os.Create(prefix + "-client.pprof")
	if err == nil {
		if err = pprof.StartCPUProfile(f); err != nil {
			f.Close()
		}
	}
	return func() error {
		serr := server()
		if err == nil {
			pprof.StopCPUProfile()
			err = f.Close()
		}
		return errors.Join(serr, err)
	}
}

// captureProfile starts a CPU profile of d from the server's pprof
// endpoint; the returned function waits for it and writes it to file.
func captureProfile(addr string, d time.Duration, file string) func() error {
	done := make(chan error, 1)
	go func() {
		done <- fetchPprof(addr, fmt.Sprintf("profile?seconds=%d", max(1, int(d.Seconds()))), file)
	}()
	return func() error { return <-done }
}

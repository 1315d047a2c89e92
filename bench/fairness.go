package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// The fairness comparison (issue 6, requirement 6, side by side): a calm
// publisher sends -fair-rate events/s to one namespace (subject, stream)
// while a consumer takes them, first alone, then while a flood publishes to
// another at full speed, with the pipelining publisher of the throughput
// runs on a connection of its own. The figure is the calm events'
// publish→delivery p99 flooded over alone. The flood has no consumer: its
// events pile up, the same for every system.

// fairResult is one fairness run of one system.
type fairResult struct {
	aloneP50, aloneP99     time.Duration
	floodedP50, floodedP99 time.Duration
	floodRate              float64 // events/s stored by the flood
}

func (r fairResult) ratio() float64 { return float64(r.floodedP99) / float64(r.aloneP99) }

// fairness runs cfg.reps repetitions of the comparison, the systems
// interleaved, in the first class of cfg.classes.
func fairness(ctx context.Context, cfg *config) (map[string][]fairResult, error) {
	cls := cfg.classes[0]
	res := map[string][]fairResult{}
	for rep := range cfg.reps {
		order := slices.Clone(cfg.systems)
		for range rep % len(order) {
			order = append(order[1:], order[0])
		}
		for _, sys := range order {
			dir := filepath.Join(cfg.workDir, fmt.Sprintf("fair-%s-%d", sys, rep))
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return nil, err
			}
			r, err := fairOne(ctx, cfg, cls, sys, dir)
			os.RemoveAll(dir)
			if err != nil {
				return nil, fmt.Errorf("fairness rep %d, %s: %w", rep+1, systemNames[sys], err)
			}
			res[sys] = append(res[sys], r)
			log.Printf("fairness rep %d %-9s calm p50/p99 alone %5d/%6dµs, flooded %5d/%6dµs: ratio %.2f; flood %7.0f events/s  load %s",
				rep+1, systemNames[sys], r.aloneP50.Microseconds(), r.aloneP99.Microseconds(),
				r.floodedP50.Microseconds(), r.floodedP99.Microseconds(), r.ratio(), r.floodRate, loadAvg())
		}
	}
	return res, nil
}

func fairOne(ctx context.Context, cfg *config, cls class, sys, dir string) (fairResult, error) {
	t, err := startTarget(ctx, cfg, cls, sys, dir, false)
	if err != nil {
		return fairResult{}, err
	}
	defer t.Close()
	ctx, stop := untilExit(ctx, t.Proc())
	defer stop()
	var r fairResult
	lat, _, err := t.Latency(ctx, cfg.fairRate, cfg.latWarm, cfg.fairDur)
	if err != nil {
		return r, fmt.Errorf("alone: %w", exitCause(ctx, err))
	}
	if r.aloneP50, r.aloneP99, err = p50p99(lat); err != nil {
		return r, fmt.Errorf("alone: %w", err)
	}

	floodCtx, cancel := context.WithCancel(ctx)
	type flood struct {
		n   int
		err error
	}
	done := make(chan flood, 1)
	start := time.Now()
	go func() {
		n, err := t.Flood(floodCtx)
		done <- flood{n, err}
	}()
	select { // the flood at full speed before the calm run starts
	case <-time.After(300 * time.Millisecond):
	case <-ctx.Done():
	}
	lat, _, err = t.Latency(ctx, cfg.fairRate, cfg.latWarm, cfg.fairDur)
	cancel()
	f := <-done
	elapsed := time.Since(start)
	if err != nil {
		return r, fmt.Errorf("flooded: %w", exitCause(ctx, err))
	}
	if f.err != nil {
		return r, fmt.Errorf("flood: %w", exitCause(ctx, f.err))
	}
	if r.floodedP50, r.floodedP99, err = p50p99(lat); err != nil {
		return r, fmt.Errorf("flooded: %w", err)
	}
	r.floodRate = float64(f.n) / elapsed.Seconds()
	return r, nil
}

// writeFairness writes the comparison's table.
func writeFairness(w io.Writer, cfg *config, res map[string][]fairResult) {
	fmt.Fprintf(w, "\n### Fairness: a calm namespace at %d events/s, alone and beside a flood (%s)\n\n", cfg.fairRate, cfg.classes[0])
	fmt.Fprintf(w, "%d repetitions, systems interleaved, each on a fresh server. The calm publisher sends one event per publish for %v after a %v warm-up, once alone and once while a pipelining publisher (the throughput runs' settings, on a connection of its own) floods another namespace with no consumer. Medians, min–max in parentheses.\n\n", cfg.reps, cfg.fairDur, cfg.latWarm)
	fmt.Fprintln(w, "| system | calm p99 alone (µs) | calm p99 flooded (µs) | ratio flooded/alone | calm p50 alone / flooded (µs) | flood (events/s) |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, sys := range cfg.systems {
		rs := res[sys]
		if len(rs) == 0 {
			continue
		}
		get := func(f func(fairResult) float64) []float64 {
			var v []float64
			for _, r := range rs {
				v = append(v, f(r))
			}
			return v
		}
		whole := func(d time.Duration) float64 { return float64(d.Microseconds()) } // as the log lines print them
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s / %s | %s |\n", systemNames[sys],
			spreadF(get(func(r fairResult) float64 { return whole(r.aloneP99) }), "%.0f"),
			spreadF(get(func(r fairResult) float64 { return whole(r.floodedP99) }), "%.0f"),
			spreadF(get(func(r fairResult) float64 { return r.ratio() }), "%.2f"),
			fmt.Sprintf("%.0f", statOf(get(func(r fairResult) float64 { return whole(r.aloneP50) })).med),
			fmt.Sprintf("%.0f", statOf(get(func(r fairResult) float64 { return whole(r.floodedP50) })).med),
			spreadF(get(func(r fairResult) float64 { return r.floodRate }), "%.0f"))
	}
}

// spreadF formats the median of v with its min–max.
func spreadF(v []float64, format string) string {
	st := statOf(v)
	return fmt.Sprintf(format+" ("+format+"–"+format+")", st.med, st.lo, st.hi)
}

// p50p99 returns the median and 99th percentile of lat (sorted in place),
// as the latency runs report them.
func p50p99(lat []time.Duration) (p50, p99 time.Duration, err error) {
	if len(lat) == 0 {
		return 0, 0, fmt.Errorf("nothing delivered")
	}
	slices.Sort(lat)
	return lat[len(lat)/2], lat[min(len(lat)-1, len(lat)*99/100)], nil
}

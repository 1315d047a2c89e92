package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/h3x-io/h3x"
)

// scaleResult is the outcome of the scale test: many idle authenticated
// clients on one H3X server (default fsync durability), then a new client's
// publishes.
type scaleResult struct {
	clients             int
	connected           int
	connectTook         time.Duration
	rssBefore, rssAfter int64 // KiB
	hwm                 int64 // KiB
	newDial             time.Duration
	p50, p99, pmax      time.Duration
	publishes           int
	mem                 *runtime.MemStats // the server's, after connecting, if profiled
	goroutines          int               // added by the connections
	memBefore           *runtime.MemStats
	idleCPU             float64  // the server's CPU use while the clients idle, in cores
	newDialErrs         []string // failed attempts of the new client
}

// fetchMemStats reads the server's runtime.MemStats from expvar.
func fetchMemStats(addr string) (*runtime.MemStats, error) {
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/vars", addr))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var v struct{ Memstats runtime.MemStats }
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return nil, err
	}
	return &v.Memstats, nil
}

func scaleTest(ctx context.Context, cfg *config) (*scaleResult, error) {
	dir := filepath.Join(cfg.workDir, "scale")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	srv, err := startH3XServer(ctx, cfg.h3xBin, dir, h3x.DurabilityFsync, true)
	if err != nil {
		return nil, err
	}
	defer srv.p.stop()
	sr := &scaleResult{clients: cfg.scale}

	// Warm the server up (queue open, first commits) with one client, so
	// that the baseline holds everything but the idle connections.
	warm, err := srv.dial(ctx)
	if err != nil {
		return nil, err
	}
	for range 100 {
		if _, err := warm.Publish(ctx, h3x.Event{Namespace: "scale", Type: "bench", Data: payload}); err != nil {
			warm.Close()
			return nil, err
		}
	}
	warm.Close()
	time.Sleep(2 * time.Second)
	if sr.rssBefore, _, err = memKiB(srv.p.pid()); err != nil {
		return nil, err
	}
	fetchPprof(srv.pprofAddr, "heap?gc=1", filepath.Join(dir, "heap-before.pprof"))
	sr.memBefore, _ = fetchMemStats(srv.pprofAddr)
	gBefore := countGoroutines(srv.pprofAddr)

	// Connect the idle clients, 32 handshakes at a time (the server's
	// accept queue holds 32).
	clients := make([]*h3x.Client, cfg.scale)
	var (
		wg     sync.WaitGroup
		failed atomic.Int64
		first  atomic.Value
		next   atomic.Int64
	)
	start := time.Now()
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(clients) || ctx.Err() != nil {
					return
				}
				dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				c, err := srv.dial(dctx, h3x.WithMaxReconnects(1))
				cancel()
				if err != nil {
					if failed.Add(1) == 1 {
						first.Store(err)
					}
					continue
				}
				clients[i] = c
			}
		}()
	}
	wg.Wait()
	sr.connectTook = time.Since(start)
	sr.connected = cfg.scale - int(failed.Load())
	defer func() {
		var wg sync.WaitGroup
		sem := make(chan struct{}, 64)
		for _, c := range clients {
			if c == nil {
				continue
			}
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				c.Close()
				<-sem
			}()
		}
		wg.Wait()
	}()
	log.Printf("scale: %d of %d clients connected in %s", sr.connected, cfg.scale, sr.connectTook.Round(time.Millisecond))
	if err, _ := first.Load().(error); err != nil {
		log.Printf("scale: first dial error: %v", err)
	}
	if sr.connected == 0 {
		return nil, fmt.Errorf("no client connected")
	}

	// Let the server settle (handshake garbage collected, keep-alives
	// flowing), then measure.
	cpu0 := procCPU(srv.p.pid())
	time.Sleep(5 * time.Second)
	sr.idleCPU = float64(procCPU(srv.p.pid())-cpu0) / float64(5*time.Second)
	if sr.rssAfter, sr.hwm, err = memKiB(srv.p.pid()); err != nil {
		return nil, err
	}
	// The breakdown comes after a forced GC (heap?gc=1), so that the heap
	// figure is what the connections keep alive.
	profDir := cfg.profileDir
	if profDir == "" {
		profDir = dir
	}
	for _, name := range []string{"heap?gc=1", "goroutine"} {
		file := filepath.Join(profDir, "scale-"+strings.TrimSuffix(name, "?gc=1")+".pprof")
		if err := fetchPprof(srv.pprofAddr, name, file); err != nil {
			log.Printf("scale: %s profile: %v", name, err)
		}
	}
	sr.mem, _ = fetchMemStats(srv.pprofAddr)
	sr.goroutines = countGoroutines(srv.pprofAddr) - gBefore

	// A new client's publishes while the idle ones stay connected.
	var c *h3x.Client
	for attempt := 1; ; attempt++ {
		dstart := time.Now()
		c, err = srv.dial(ctx, h3x.WithMaxReconnects(1))
		sr.newDial = time.Since(dstart)
		if err == nil {
			break
		}
		sr.newDialErrs = append(sr.newDialErrs, fmt.Sprintf("%v after %s", err, sr.newDial.Round(time.Millisecond)))
		if attempt == 3 {
			return sr, nil
		}
	}
	defer c.Close()
	var lat []time.Duration
	for range 100 {
		t0 := time.Now()
		if _, err := c.Publish(ctx, h3x.Event{Namespace: "scale", Type: "bench", Data: payload}); err != nil {
			return nil, fmt.Errorf("new client publish: %w", err)
		}
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	sr.publishes = len(lat)
	sr.p50, sr.p99, sr.pmax = lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
	return sr, nil
}

// fetchPprof saves one of the server's pprof profiles.
func fetchPprof(addr, name, file string) error {
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/%s", addr, name))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func writeScale(w io.Writer, sr *scaleResult) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	per := float64(sr.rssAfter-sr.rssBefore) / float64(max(1, sr.connected))
	p("### Scale: %d idle authenticated clients on one server\n\n", sr.clients)
	p("H3X server with the default durability (fsync), `WithMaxConnections(11000)`; clients in the harness process, one UDP socket each, 32 handshakes at a time.\n\n")
	p("| measure | value | target |\n|---|---|---|\n")
	p("| clients connected and authenticated | %d of %d, in %s | |\n", sr.connected, sr.clients, sr.connectTook.Round(100*time.Millisecond))
	p("| server RSS before → after | %.1f → %.1f MiB (peak %.1f MiB) | |\n", float64(sr.rssBefore)/1024, float64(sr.rssAfter)/1024, float64(sr.hwm)/1024)
	verdict := "met"
	if per > 64 {
		verdict = fmt.Sprintf("**missed** (%.0f%% over)", 100*(per/64-1))
	}
	p("| server memory per idle connection | %.1f KiB | ≤ 64 KiB: %s |\n", per, verdict)
	if m, b := sr.mem, sr.memBefore; m != nil && b != nil {
		n := float64(max(1, sr.connected))
		d := func(after, before uint64) float64 { return (float64(after) - float64(before)) / 1024 / n }
		p("| the server's Go runtime per connection (growth, each after a forced GC) | live heap %.1f KiB, goroutine stacks %.1f KiB (%.1f goroutines), heap spans in use but free %.1f KiB, heap idle not yet returned to the OS %.1f KiB | |\n",
			d(m.HeapAlloc, b.HeapAlloc), d(m.StackInuse, b.StackInuse), float64(sr.goroutines)/n,
			d(m.HeapInuse-m.HeapAlloc, b.HeapInuse-b.HeapAlloc), d(m.HeapIdle-m.HeapReleased, b.HeapIdle-b.HeapReleased))
	}
	p("| server CPU while they idle (keep-alives) | %.0f%% of a core | |\n", 100*sr.idleCPU)
	for i, e := range sr.newDialErrs {
		p("| new client: attempt %d failed | %s | |\n", i+1, e)
	}
	if sr.publishes == 0 {
		p("\n")
		return
	}
	p("| new client: dial + authenticate | %s | |\n", sr.newDial.Round(10*time.Microsecond))
	verdict = "met"
	if sr.p99 > 10*time.Millisecond {
		verdict = fmt.Sprintf("**missed** (%.0f%% over)", 100*(float64(sr.p99)/float64(10*time.Millisecond)-1))
	}
	p("| new client: publish round trip p50 / p99 / max (%d sequential, fsync) | %s / %s / %s | p99 ≤ 10 ms: %s |\n\n",
		sr.publishes, sr.p50.Round(time.Microsecond), sr.p99.Round(time.Microsecond), sr.pmax.Round(time.Microsecond), verdict)
}

// procCPU returns the user+system CPU time of pid so far.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b)[strings.LastIndex(string(b), ")")+2:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+st) * time.Second / 100 // USER_HZ
}

// countGoroutines reads the server's goroutine count.
func countGoroutines(addr string) int {
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/goroutine?debug=1", addr))
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var n int
	fmt.Fscanf(resp.Body, "goroutine profile: total %d", &n)
	return n
}

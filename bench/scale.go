package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

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
	rssHeldBefore       int64 // KiB, after debug.FreeOSMemory
	rssHeld             int64 // KiB, after debug.FreeOSMemory
	bare                bool  // bare quic-go connections, no H3X
	gogc                int   // the server's GOGC, if set
	newDial             time.Duration
	probe0, probe       latStats          // a new client in its own process, with none and with the idle clients connected
	inproc              latStats          // a new client in the harness process, with the idle clients
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
	var extra []string
	if cfg.scaleBare {
		extra = append(extra, "-bare-quic")
	}
	if cfg.scaleGOGC != 0 {
		extra = append(extra, "-gogc", strconv.Itoa(cfg.scaleGOGC))
	}
	srv, err := startH3XServer(ctx, cfg.h3xBin, dir, h3x.DurabilityFsync, true, extra...)
	if err != nil {
		return nil, err
	}
	defer srv.p.stop()
	sr := &scaleResult{clients: cfg.scale, bare: cfg.scaleBare, gogc: cfg.scaleGOGC}

	// Warm the server up (queue open, first commits) with one client, so
	// that the baseline holds everything but the idle connections; then
	// measure a new client's publishes with no idle client connected.
	if cfg.scaleBare {
		c, err := dialBare(ctx, srv)
		if err != nil {
			return nil, err
		}
		c.close()
	} else {
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
		if sr.probe0, err = runProbe(ctx, cfg, srv); err != nil {
			return nil, fmt.Errorf("probe with no idle clients: %w", err)
		}
	}
	time.Sleep(2 * time.Second)
	if sr.rssBefore, _, err = memKiB(srv.p.pid()); err != nil {
		return nil, err
	}
	if resp, err := http.Get(fmt.Sprintf("http://%s/debug/freeosmemory", srv.pprofAddr)); err == nil {
		resp.Body.Close()
		sr.rssHeldBefore, _, _ = memKiB(srv.p.pid())
	}
	fetchPprof(srv.pprofAddr, "heap?gc=1", filepath.Join(dir, "heap-before.pprof"))
	sr.memBefore, _ = fetchMemStats(srv.pprofAddr)
	gBefore := countGoroutines(srv.pprofAddr)

	// Connect the idle clients, 32 handshakes at a time (the server's
	// accept queue holds 32).
	clients := make([]func(), cfg.scale)
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
				var closer func()
				var err error
				if cfg.scaleBare {
					var c *bareConn
					if c, err = dialBare(dctx, srv); err == nil {
						closer = c.close
					}
				} else {
					var c *h3x.Client
					if c, err = srv.dial(dctx, h3x.WithMaxReconnects(1)); err == nil {
						closer = func() { c.Close() }
					}
				}
				cancel()
				if err != nil {
					if failed.Add(1) == 1 {
						first.Store(err)
					}
					continue
				}
				clients[i] = closer
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
				c()
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
	// The breakdown comes after forced GCs (/debug/freeosmemory, then
	// heap?gc=1), so that the heap figure is what the connections keep
	// alive, without sync.Pool caches.
	profDir := cfg.profileDir
	if profDir == "" {
		profDir = dir
	}
	// The memory the connections hold: RSS once the runtime has collected
	// twice (so that sync.Pool caches are gone) and returned its free
	// pages (the baseline was taken the same way).
	if resp, err := http.Get(fmt.Sprintf("http://%s/debug/freeosmemory", srv.pprofAddr)); err == nil {
		resp.Body.Close()
		sr.rssHeld, _, _ = memKiB(srv.p.pid())
	}
	for _, name := range []string{"heap?gc=1", "goroutine"} {
		file := filepath.Join(profDir, "scale-"+strings.TrimSuffix(name, "?gc=1")+".pprof")
		if err := fetchPprof(srv.pprofAddr, name, file); err != nil {
			log.Printf("scale: %s profile: %v", name, err)
		}
	}
	sr.mem, _ = fetchMemStats(srv.pprofAddr)
	sr.goroutines = countGoroutines(srv.pprofAddr) - gBefore
	if cfg.scaleBare {
		return sr, nil
	}

	// A new client's publishes while the idle ones stay connected: first
	// from a process of its own, then from the harness process (which
	// holds the idle clients). The harness's garbage collector, whose heap
	// holds every idle client, is paused while the probe runs: on another
	// machine, as those clients would be in production, it would not take
	// the server's CPU.
	gc := debug.SetGCPercent(-1)
	sr.probe, err = runProbe(ctx, cfg, srv)
	debug.SetGCPercent(gc)
	if err != nil {
		return nil, fmt.Errorf("probe with %d idle clients: %w", sr.connected, err)
	}
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
	for range cfg.scalePubs {
		t0 := time.Now()
		if _, err := c.Publish(ctx, h3x.Event{Namespace: "scale", Type: "bench", Data: payload}); err != nil {
			return nil, fmt.Errorf("new client publish: %w", err)
		}
		lat = append(lat, time.Since(t0))
	}
	sr.inproc = latStatsOf(lat)
	return sr, nil
}

// latStats summarizes sequential publish round trips.
type latStats struct {
	n              int
	dial           time.Duration
	p50, p99, pmax time.Duration
}

func latStatsOf(lat []time.Duration) latStats {
	if len(lat) == 0 {
		return latStats{}
	}
	slices.Sort(lat)
	return latStats{n: len(lat), p50: lat[len(lat)/2], p99: lat[len(lat)*99/100], pmax: lat[len(lat)-1]}
}

func (l latStats) String() string {
	return fmt.Sprintf("%s / %s / %s", l.p50.Round(time.Microsecond), l.p99.Round(time.Microsecond), l.pmax.Round(time.Microsecond))
}

// runProbe runs h3x-scale-probe against srv and reads its publish round
// trips.
func runProbe(ctx context.Context, cfg *config, srv *h3xServer) (latStats, error) {
	cmd := exec.CommandContext(ctx, cfg.probeBin, "-addr", srv.addr, "-fp", srv.fp, "-n", strconv.Itoa(cfg.scalePubs))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return latStats{}, err
	}
	var (
		lat  []time.Duration
		dial time.Duration
	)
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if v, ok := strings.CutPrefix(l, "dial "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			dial = time.Duration(n)
			continue
		}
		n, err := strconv.ParseInt(l, 10, 64)
		if err != nil {
			return latStats{}, fmt.Errorf("probe output %q: %w", l, err)
		}
		lat = append(lat, time.Duration(n))
	}
	st := latStatsOf(lat)
	st.dial = dial
	return st, nil
}

// bareConn is a bare quic-go client connection of the -scale-bare floor.
type bareConn struct {
	tr *quic.Transport
	qc *quic.Conn
}

// dialBare connects to a bench server started with -bare-quic the way an
// H3X client connects (its own UDP socket, the client's quic.Config), opens
// a stream, and exchanges 8 bytes on it, as Auth and AuthResult would.
func dialBare(ctx context.Context, srv *h3xServer) (*bareConn, error) {
	addr, err := net.ResolveUDPAddr("udp", srv.addr)
	if err != nil {
		return nil, err
	}
	u, err := net.ListenUDP("udp", nil)
	if err != nil {
		return nil, err
	}
	c := &bareConn{tr: &quic.Transport{Conn: u}}
	idle := h3x.DefaultIdleTimeout
	c.qc, err = c.tr.Dial(ctx, addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h3x-bare"}, MinVersion: tls.VersionTLS13},
		&quic.Config{HandshakeIdleTimeout: 10 * time.Second, MaxIdleTimeout: idle, KeepAlivePeriod: idle / 3, MaxIncomingStreams: -1, MaxIncomingUniStreams: -1})
	if err != nil {
		c.tr.Close()
		u.Close()
		return nil, err
	}
	st, err := c.qc.OpenStreamSync(ctx)
	if err == nil {
		stop := context.AfterFunc(ctx, func() { st.SetReadDeadline(time.Now()) })
		var b [8]byte
		if _, err = st.Write(b[:]); err == nil {
			_, err = io.ReadFull(st, b[:])
		}
		stop()
	}
	if err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

func (c *bareConn) close() {
	c.qc.CloseWithError(0, "")
	c.tr.Close()
	c.tr.Conn.Close()
}

// fetchPprof saves one of the server's pprof profiles.
func fetchPprof(addr, name, file string) error {
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/%s", addr, name))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("pprof %s: %s", name, resp.Status)
	}
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
	if sr.bare {
		p("### Scale floor: %d idle bare quic-go connections on one server\n\n", sr.clients)
		p("The bench server with `-bare-quic`: quic-go alone, with H3X's quic.Config and certificate type, one stream per connection left open after an 8-byte exchange, no application goroutine per connection; clients in the harness process, one UDP socket each, 32 handshakes at a time.\n\n")
	} else {
		p("### Scale: %d idle authenticated clients on one server\n\n", sr.clients)
		p("H3X server with the default durability (fsync), `WithMaxConnections(11000)`; clients in the harness process, one UDP socket each, 32 handshakes at a time. The new client runs from a process of its own (`h3x-scale-probe`, with the harness's garbage collector paused meanwhile), and again from the harness process.\n\n")
	}
	if sr.gogc != 0 {
		p("The server ran with GOGC=%d (`-scale-gogc`).\n\n", sr.gogc)
	}
	p("| measure | value | target |\n|---|---|---|\n")
	p("| clients connected (and authenticated) | %d of %d, in %s | |\n", sr.connected, sr.clients, sr.connectTook.Round(100*time.Millisecond))
	p("| server RSS before → after | %.1f → %.1f MiB (peak %.1f MiB) | |\n", float64(sr.rssBefore)/1024, float64(sr.rssAfter)/1024, float64(sr.hwm)/1024)
	verdict := "met"
	if per > 64 {
		verdict = fmt.Sprintf("**missed** (%.0f%% over)", 100*(per/64-1))
	}
	p("| server memory per idle connection (RSS growth / connections) | %.1f KiB | ≤ 64 KiB: %s |\n", per, verdict)
	if sr.rssHeld > 0 && sr.rssHeldBefore > 0 {
		held := float64(sr.rssHeld-sr.rssHeldBefore) / float64(max(1, sr.connected))
		p("| memory the connections hold: RSS growth per connection, each RSS read after two forced GCs and `debug.FreeOSMemory` (%.1f → %.1f MiB) | %.1f KiB | |\n", float64(sr.rssHeldBefore)/1024, float64(sr.rssHeld)/1024, held)
	}
	if m, b := sr.mem, sr.memBefore; m != nil && b != nil {
		n := float64(max(1, sr.connected))
		d := func(after, before uint64) float64 { return (float64(after) - float64(before)) / 1024 / n }
		p("| the server's Go runtime per connection (growth, each after forced GCs) | live heap %.1f KiB, goroutine stacks %.1f KiB (%.1f goroutines), heap spans in use but free %.1f KiB, heap idle not yet returned to the OS %.1f KiB | |\n",
			d(m.HeapAlloc, b.HeapAlloc), d(m.StackInuse, b.StackInuse), float64(sr.goroutines)/n,
			d(m.HeapInuse-m.HeapAlloc, b.HeapInuse-b.HeapAlloc), d(m.HeapIdle-m.HeapReleased, b.HeapIdle-b.HeapReleased))
	}
	p("| server CPU while they idle (keep-alives) | %.0f%% of a core | |\n", 100*sr.idleCPU)
	if sr.bare {
		p("\n")
		return
	}
	verdictOf := func(l latStats) string {
		if l.p99 > 10*time.Millisecond {
			return fmt.Sprintf("**missed** (%.0f%% over)", 100*(float64(l.p99)/float64(10*time.Millisecond)-1))
		}
		return "met"
	}
	if l := sr.probe0; l.n > 0 {
		p("| with no idle client: a new client (own process): dial + authenticate; publish round trip p50 / p99 / max (%d sequential, fsync) | %s; %s | |\n", l.n, l.dial.Round(10*time.Microsecond), l)
	}
	if l := sr.probe; l.n > 0 {
		p("| with the idle clients: a new client (own process): dial + authenticate; publish round trip p50 / p99 / max (%d sequential, fsync) | %s; %s | p99 ≤ 10 ms: %s |\n", l.n, l.dial.Round(10*time.Microsecond), l, verdictOf(l))
	}
	for i, e := range sr.newDialErrs {
		p("| with the idle clients: a new client in the harness process: attempt %d failed | %s | |\n", i+1, e)
	}
	if l := sr.inproc; l.n > 0 {
		p("| with the idle clients: a new client in the harness process (beside the idle ones): dial + authenticate; publish round trip p50 / p99 / max (%d sequential, fsync) | %s; %s | p99 ≤ 10 ms: %s |\n", l.n, sr.newDial.Round(10*time.Microsecond), l, verdictOf(l))
	}
	p("\n")
}

// procCPU returns the user+system CPU time of pid so far.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b)[strings.LastIndex(string(b), ")")+2:])
	if len(f) < 15 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	// With the children it has waited for: Redis forks to rewrite its
	// append-only file, its compaction, as Badger's runs in H3X's process.
	cu, _ := strconv.ParseInt(f[13], 10, 64)
	cs, _ := strconv.ParseInt(f[14], 10, 64)
	return time.Duration(u+st+cu+cs) * time.Second / 100 // USER_HZ
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

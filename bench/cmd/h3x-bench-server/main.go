// Command h3x-bench-server runs an H3X server for the side-by-side benchmark
// harness (see ../../README.md), as a process of its own so that its memory
// can be measured like the peers'.
//
// It serves one client, "bench" with token "bench-token", on every
// namespace, stores events in a Badger queue in -data with the durability
// given by -durability, and prints two lines on stdout once listening:
//
//	fingerprint <hex SHA-256 of its self-signed certificate>
//	listening <address>
//
// It stops gracefully on SIGINT or SIGTERM, writing the CPU profile if
// -cpuprofile was given. -pprof serves net/http/pprof and expvar on a
// loopback address (profiles of a chosen window:
// /debug/pprof/profile?seconds=N; memory statistics: /debug/vars).
package main

import (
	"context"
	_ "expvar" // /debug/vars: runtime.MemStats, for the scale test
	"flag"
	"fmt"
	"log"
	"net/http"
	_ "net/http/pprof"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/h3x-io/h3x"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "UDP listen address")
	data := flag.String("data", "", "Badger data directory (required)")
	durability := flag.String("durability", "fsync", "fsync (an fsync per group commit) or nosync (page cache: survives a process crash)")
	maxConns := flag.Int("max-conns", 11000, "WithMaxConnections")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	pprofAddr := flag.String("pprof", "", "serve net/http/pprof on this loopback address")
	gogc := flag.Int("gogc", 0, "set the garbage collector's GOGC percentage (0: the runtime's default, 100, or $GOGC)")
	bare := flag.Bool("bare-quic", false, "serve bare quic-go instead of H3X (the scale test's quic-go floor; see bare.go)")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("h3x-bench-server: ")
	if *gogc != 0 {
		debug.SetGCPercent(*gogc)
	}
	// /debug/freeosmemory runs two collections (the second drops what
	// sync.Pools kept through the first, such as quic-go's packet buffers)
	// and returns every free page to the OS, for the scale test's "memory
	// the connections hold" figure.
	http.HandleFunc("/debug/freeosmemory", func(w http.ResponseWriter, r *http.Request) {
		runtime.GC()
		debug.FreeOSMemory()
	})
	if *bare {
		if *pprofAddr != "" {
			go func() { log.Print(http.ListenAndServe(*pprofAddr, nil)) }()
		}
		serveBare(*addr)
		return
	}
	if *data == "" {
		log.Fatal("-data is required")
	}
	var qo h3x.QueueOptions
	switch *durability {
	case "fsync":
		qo.Durability = h3x.DurabilityFsync
	case "nosync":
		qo.Durability = h3x.DurabilityNoSync
	default:
		log.Fatalf("-durability %q: want fsync or nosync", *durability)
	}
	reg, err := h3x.ParseRegistry("bench:*=bench-token")
	if err != nil {
		log.Fatal(err)
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			log.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			log.Fatal(err)
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	if *pprofAddr != "" {
		go func() { log.Print(http.ListenAndServe(*pprofAddr, nil)) }()
	}
	srv, err := h3x.NewServer(
		h3x.WithAddr(*addr),
		h3x.WithDataDir(*data),
		h3x.WithQueueOptions(qo),
		h3x.WithRegistry(reg),
		h3x.WithMaxConnections(*maxConns),
		// The scale benchmark connects thousands of clients from one
		// address as fast as it can: no new-connection rate limit.
		h3x.WithConnectionRate(h3x.RateLimit{}),
	)
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := srv.Start(context.Background()); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("fingerprint %s\nlistening %s\n", srv.Fingerprint(), srv.Addr())
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Print(err)
	}
}

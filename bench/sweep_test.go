package main

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"
)

func sweepRun(t *testing.T, name string, start func() (target, error)) {
	tg, err := start()
	if err != nil {
		t.Fatal(err)
	}
	n, el, err := tg.Publish(context.Background(), 2*time.Second)
	tg.Close()
	la, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("%-40s %8.0f/s %v load %s", name, float64(n)/el.Seconds(), err, la)
}

func TestSweep(t *testing.T) {
	ctx := context.Background()
	cls := crashSafe
	if os.Getenv("FSYNC") != "" {
		cls = fsyncAck
	}
	for range 2 {
		for _, bk := range [][2]int{{64, 64}, {128, 16}, {128, 64}, {128, 256}, {256, 32}, {256, 128}} {
			sweepRun(t, fmt.Sprintf("h3x batch %d inflight %d", bk[0], bk[1]), func() (target, error) {
				return startH3X(ctx, os.Getenv("H3XBIN"), t.TempDir(), cls, h3xParams{bk[0], bk[1], 4096, 1000}, false)
			})
		}
		for _, p := range []int{256, 1024, 4096, 16384} {
			sweepRun(t, fmt.Sprintf("nats pending %d", p), func() (target, error) {
				return startNATS(ctx, "/usr/sbin/nats-server", t.TempDir(), false, natsParams{p, 4096, 1000})
			})
		}
		for _, pc := range [][2]int{{64, 4}, {256, 1}, {256, 4}, {256, 8}, {1000, 2}, {1000, 4}} {
			sweepRun(t, fmt.Sprintf("redis pipeline %d conns %d", pc[0], pc[1]), func() (target, error) {
				return startRedis(ctx, "/usr/bin/redis-server", t.TempDir(), cls, redisParams{pc[0], pc[1], 1000})
			})
		}
	}
}

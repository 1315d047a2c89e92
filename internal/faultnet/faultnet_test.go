package faultnet

import (
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echo starts a UDP echo server on loopback.
func echo(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			c.WriteToUDP(buf[:n], from)
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return c
}

// roundTrips sends n numbered packets through p and returns the numbers
// echoed back within wait, in arrival order.
func roundTrips(t *testing.T, p *Proxy, n int, wait time.Duration) []int {
	t.Helper()
	c, err := net.Dial("udp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range n {
		c.Write([]byte{byte(i >> 8), byte(i)})
	}
	var got []int
	buf := make([]byte, 16)
	c.SetReadDeadline(time.Now().Add(wait))
	for {
		k, err := c.Read(buf)
		if err != nil {
			return got
		}
		if k == 2 {
			got = append(got, int(buf[0])<<8|int(buf[1]))
		}
	}
}

func TestProxyFaults(t *testing.T) {
	srv := echo(t)
	p, err := New(srv.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	if got := roundTrips(t, p, 100, 300*time.Millisecond); len(got) != 100 {
		t.Fatalf("clean: %d of 100 echoed", len(got))
	}

	p.SetBlackhole(true)
	if got := roundTrips(t, p, 50, 200*time.Millisecond); len(got) != 0 {
		t.Fatalf("black hole: %d echoed", len(got))
	}
	p.Reset()

	p.SetDuplication(1)
	if got := roundTrips(t, p, 50, 300*time.Millisecond); len(got) < 150 {
		// Duplicated in both directions: 4 copies each.
		t.Fatalf("duplication: %d echoed, want ~200", len(got))
	}
	p.Reset()

	p.SetLoss(0.5)
	got := roundTrips(t, p, 400, 300*time.Millisecond)
	// Two passes at 50% loss: ~100 of 400 come back.
	if len(got) < 40 || len(got) > 180 {
		t.Fatalf("loss: %d of 400 echoed, want ~100", len(got))
	}
	p.Reset()

	p.SetReordering(0.3)
	got = roundTrips(t, p, 200, 500*time.Millisecond)
	inversions := 0
	for i := 1; i < len(got); i++ {
		if got[i] < got[i-1] {
			inversions++
		}
	}
	if len(got) != 200 || inversions == 0 {
		t.Fatalf("reordering: %d echoed, %d inversions", len(got), inversions)
	}
	p.Reset()

	p.SetDelay(30 * time.Millisecond)
	c, err := net.Dial("udp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.Write([]byte{0, 1})
	c.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := c.Read(make([]byte, 16)); err != nil {
		t.Fatalf("delay: no echo: %v", err)
	}
	if rtt := time.Since(start); rtt < 60*time.Millisecond || rtt > 500*time.Millisecond {
		t.Fatalf("delay: 30 ms each way gave a round trip of %v", rtt)
	}
	if s := p.Stats(); s.Dropped == 0 || s.Duplicated == 0 || s.Reordered == 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestProxyRefusesNonLoopback(t *testing.T) {
	if _, err := New(&net.UDPAddr{IP: net.IPv4(8, 8, 8, 8), Port: 53}); err == nil {
		t.Fatal("a non-loopback server was accepted")
	}
}

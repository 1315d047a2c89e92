package h3x

import (
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// udpProxy relays datagrams between clients and a server on loopback and
// injects faults: a black hole, random loss, duplication and delay. Each
// client address gets its own upstream socket.
type udpProxy struct {
	t      testing.TB
	front  *net.UDPConn
	server *net.UDPAddr

	blackhole atomic.Bool
	lossPPM   atomic.Int64 // packets lost per million
	dupPPM    atomic.Int64 // packets duplicated per million
	delay     atomic.Int64 // added one-way delay, in nanoseconds

	mu    sync.Mutex
	backs map[string]*net.UDPConn
	wg    sync.WaitGroup
	done  chan struct{}
}

func newUDPProxy(t testing.TB, server *net.UDPAddr) *udpProxy {
	front, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	p := &udpProxy{t: t, front: front, server: server, backs: make(map[string]*net.UDPConn), done: make(chan struct{})}
	p.wg.Add(1)
	go p.readFront()
	t.Cleanup(p.close)
	return p
}

func (p *udpProxy) addr() string { return p.front.LocalAddr().String() }

func (p *udpProxy) close() {
	select {
	case <-p.done:
		return
	default:
	}
	close(p.done)
	p.front.Close()
	p.mu.Lock()
	for _, b := range p.backs {
		b.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// pass decides a packet's fate: how many copies go through (0, 1 or 2).
func (p *udpProxy) copies() int {
	if p.blackhole.Load() {
		return 0
	}
	if l := p.lossPPM.Load(); l > 0 && rand.Int64N(1_000_000) < l {
		return 0
	}
	if d := p.dupPPM.Load(); d > 0 && rand.Int64N(1_000_000) < d {
		return 2
	}
	return 1
}

func (p *udpProxy) send(write func([]byte), b []byte) {
	n := p.copies()
	if n == 0 {
		return
	}
	if d := time.Duration(p.delay.Load()); d > 0 {
		pkt := append([]byte(nil), b...)
		time.AfterFunc(d+time.Duration(rand.Int64N(int64(d)/4+1)), func() {
			select {
			case <-p.done:
			default:
				for range n {
					write(pkt)
				}
			}
		})
		return
	}
	for range n {
		write(b)
	}
}

func (p *udpProxy) readFront() {
	defer p.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := p.front.ReadFromUDP(buf)
		if err != nil {
			return
		}
		back := p.backFor(from)
		if back == nil {
			return
		}
		p.send(func(b []byte) { back.Write(b) }, buf[:n])
	}
}

func (p *udpProxy) backFor(client *net.UDPAddr) *net.UDPConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		return nil
	default:
	}
	if b := p.backs[client.String()]; b != nil {
		return b
	}
	b, err := net.DialUDP("udp", nil, p.server)
	if err != nil {
		p.t.Errorf("proxy: %v", err)
		return nil
	}
	p.backs[client.String()] = b
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, err := b.Read(buf)
			if err != nil {
				return
			}
			p.send(func(pkt []byte) { p.front.WriteToUDP(pkt, client) }, buf[:n])
		}
	}()
	return b
}

// Package faultnet is a UDP relay for tests that injects network faults
// between QUIC clients and a server on loopback: loss, duplication,
// reordering, added delay and black holes.
package faultnet

import (
	"errors"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy relays datagrams between clients and a server and injects faults.
// Each client address gets its own upstream socket, so the server sees one
// peer per client. Faults apply to both directions. The zero fault settings
// relay everything unchanged. All setters are safe to call at any time.
type Proxy struct {
	front  *net.UDPConn
	server *net.UDPAddr

	blackhole  atomic.Bool
	lossPPM    atomic.Int64 // packets dropped per million
	dupPPM     atomic.Int64 // packets duplicated per million
	reorderPPM atomic.Int64 // packets held back per million
	delay      atomic.Int64 // added one-way delay, in nanoseconds

	relayed, dropped, duplicated, reordered atomic.Int64

	mu    sync.Mutex
	backs map[string]*net.UDPConn
	wg    sync.WaitGroup
	done  chan struct{}
	timer sync.WaitGroup // delayed sends in flight
}

// New starts a proxy on a random loopback port relaying to server, which
// must be a loopback address.
func New(server *net.UDPAddr) (*Proxy, error) {
	if server == nil || !server.IP.IsLoopback() {
		return nil, errors.New("faultnet: the server must be on loopback")
	}
	front, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	p := &Proxy{front: front, server: server, backs: make(map[string]*net.UDPConn), done: make(chan struct{})}
	p.wg.Add(1)
	go p.readFront()
	return p, nil
}

// Addr returns the address clients dial.
func (p *Proxy) Addr() string { return p.front.LocalAddr().String() }

// SetBlackhole drops every packet while on.
func (p *Proxy) SetBlackhole(on bool) { p.blackhole.Store(on) }

// SetLoss drops each packet with probability f (0 to 1).
func (p *Proxy) SetLoss(f float64) { p.lossPPM.Store(ppm(f)) }

// SetDuplication sends each packet twice with probability f.
func (p *Proxy) SetDuplication(f float64) { p.dupPPM.Store(ppm(f)) }

// SetReordering holds each packet back with probability f, by a random 1
// to 10 ms, so packets sent after it overtake it.
func (p *Proxy) SetReordering(f float64) { p.reorderPPM.Store(ppm(f)) }

// SetDelay adds d, plus up to a quarter of d of jitter, to every packet.
func (p *Proxy) SetDelay(d time.Duration) { p.delay.Store(int64(d)) }

// Reset turns every fault off.
func (p *Proxy) Reset() {
	p.SetBlackhole(false)
	p.SetLoss(0)
	p.SetDuplication(0)
	p.SetReordering(0)
	p.SetDelay(0)
}

// Stats are the proxy's packet counts since it started.
type Stats struct {
	Relayed, Dropped, Duplicated, Reordered int64
}

// Stats returns the packet counts.
func (p *Proxy) Stats() Stats {
	return Stats{p.relayed.Load(), p.dropped.Load(), p.duplicated.Load(), p.reordered.Load()}
}

func ppm(f float64) int64 { return int64(min(max(f, 0), 1) * 1_000_000) }

func chance(v int64) bool { return v > 0 && rand.Int64N(1_000_000) < v }

// Close stops relaying and waits for the proxy's goroutines. It is safe to
// call more than once.
func (p *Proxy) Close() error {
	p.mu.Lock()
	select {
	case <-p.done:
		p.mu.Unlock()
		return nil
	default:
	}
	close(p.done)
	p.front.Close()
	for _, b := range p.backs {
		b.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	p.timer.Wait()
	return nil
}

// send applies the faults to one packet and writes what survives.
func (p *Proxy) send(write func([]byte), b []byte) {
	if p.blackhole.Load() || chance(p.lossPPM.Load()) {
		p.dropped.Add(1)
		return
	}
	n := 1
	if chance(p.dupPPM.Load()) {
		n = 2
		p.duplicated.Add(1)
	}
	wait := time.Duration(0)
	if d := time.Duration(p.delay.Load()); d > 0 {
		wait = d + time.Duration(rand.Int64N(int64(d)/4+1))
	}
	if chance(p.reorderPPM.Load()) {
		wait += time.Millisecond + time.Duration(rand.Int64N(int64(9*time.Millisecond)))
		p.reordered.Add(1)
	}
	p.relayed.Add(1)
	if wait == 0 {
		for range n {
			write(b)
		}
		return
	}
	pkt := append([]byte(nil), b...)
	p.timer.Add(1)
	time.AfterFunc(wait, func() {
		defer p.timer.Done()
		select {
		case <-p.done:
		default:
			for range n {
				write(pkt)
			}
		}
	})
}

func (p *Proxy) readFront() {
	defer p.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := p.front.ReadFromUDP(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		back := p.backFor(from)
		if back == nil {
			continue
		}
		p.send(func(b []byte) { back.Write(b) }, buf[:n])
	}
}

func (p *Proxy) backFor(client *net.UDPAddr) *net.UDPConn {
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
		return nil
	}
	p.backs[client.String()] = b
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, err := b.Read(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				// ICMP errors (the server not listening for a moment)
				// surface here on a connected socket; keep relaying.
				time.Sleep(time.Millisecond)
				continue
			}
			p.send(func(pkt []byte) { p.front.WriteToUDP(pkt, client) }, buf[:n])
		}
	}()
	return b
}

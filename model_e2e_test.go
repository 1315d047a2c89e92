package h3x_test

// A randomized end-to-end model test over real QUIC on loopback: several
// clients publish, fetch, ack, nack, extend, subscribe, close and re-dial;
// the server restarts on the same data directory (Badger); a model checks
// the delivery contracts as it goes and after a final drain.
//
//	H3X_E2E_SEEDS=200 H3X_E2E_FIRST=1 H3X_E2E_STEPS=150 go test -run TestModelE2E -v .

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"go.uber.org/goleak"
)

func e2eEnvInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

const (
	e2eMaxAttempts = 3
	e2eSlack       = 25 * time.Millisecond
)

var e2eNamespaces = []string{"a", "b"}

type e2eServer struct {
	t      *testing.T
	badger bool
	dir    string
	addr   string
	ackDL  time.Duration
	srv    *h3x.Server
	q      h3x.Queue
	opens  int
	logger *slog.Logger
}

func (m *e2eServer) start() {
	m.t.Helper()
	var q h3x.Queue
	opts := h3x.QueueOptions{MaxAttempts: e2eMaxAttempts}
	if m.badger {
		opts.Durability = h3x.DurabilityNoSync
		var err error
		q, err = h3x.OpenBadgerQueue(m.dir, opts)
		if err != nil {
			m.t.Fatalf("open badger: %v", err)
		}
	} else {
		q = h3x.NewMemoryQueue(opts)
	}
	reg, err := h3x.ParseRegistry("m:*=m-token")
	if err != nil {
		m.t.Fatal(err)
	}
	addr := m.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var srv *h3x.Server
	for try := 0; ; try++ {
		srv, err = h3x.NewServer(h3x.WithQueue(q), h3x.WithRegistry(reg), h3x.WithAddr(addr),
			h3x.WithAckDeadline(m.ackDL), h3x.WithConnectionRate(h3x.RateLimit{}),
			h3x.WithAuthFailureSlowdown(false), h3x.WithLogger(m.logger))
		if err != nil {
			m.t.Fatalf("NewServer: %v", err)
		}
		err = srv.Start(context.Background())
		if err == nil {
			break
		}
		srv.Close() // closes q too
		if try > 20 {
			m.t.Fatalf("Start: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
		if m.badger {
			q, err = h3x.OpenBadgerQueue(m.dir, opts)
			if err != nil {
				m.t.Fatalf("open badger: %v", err)
			}
		} else {
			m.t.Fatalf("Start: %v", err)
		}
	}
	m.srv, m.q = srv, q
	m.addr = srv.Addr().String()
	m.opens++
}

func (m *e2eServer) stop() {
	if m.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.srv.Shutdown(ctx); err != nil {
		m.t.Errorf("Shutdown: %v", err)
	}
	m.srv = nil
}

type e2eEvent struct {
	id, ns, msg string
	stored      bool
	gone        bool      // an ack of it was confirmed OK
	ackSent     time.Time // when the confirmed ack was sent
	ackDone     time.Time // when its answer arrived
	last        map[string]*e2eDel
	dels        []*e2eDel
	inDLQ       bool
	maybeGone   bool      // an async ack whose outcome is unknown
	nackReady   time.Time // not ready before this (a nack with delay)
	nackSent    time.Time
	dlqStart    time.Time
}

type e2eDel struct {
	d         *h3x.Delivery
	ev        *e2eEvent
	ns        string
	client    int
	gen       int // the client slot's generation
	start     time.Time
	recv      time.Time
	deadline  time.Time // a lower bound of the lease's deadline
	end       time.Time // a lower bound of when the lease ended; zero: maybe live
	settled   bool      // acked or nacked by us (OK or not)
	disturb   int       // the disturbance counter when it was received
	inv       int
	viaSub    bool
	sub       *h3x.Subscription
	uncertain bool      // an extension of unknown outcome
	loose     bool      // observed during a burst: the model's order of events is not the server's
	endSure   time.Time // when an end by a connection's close is certain to have been processed
}

type e2eClient struct {
	c        *h3x.Client
	gen      int
	held     []*e2eDel
	sub      *h3x.Subscription
	connLost time.Time
	subMax   int
	subNS    []string
}

type e2eRun struct {
	t         *testing.T
	seed      int64
	rng       *rand.Rand
	srv       *e2eServer
	clients   []*e2eClient
	events    map[string]*e2eEvent
	order     []string
	nextID    int
	disturb   int
	invisible int
	orphans   []*e2eDel
	log       []string
	ctx       context.Context
	failed    bool
	counts    map[string]int
	restarts  [][2]time.Time // [shutdown begun, done]
	mu        sync.Mutex     // guards the model during a burst
	inBurst   bool
}

func (r *e2eRun) logf(format string, args ...any) {
	r.log = append(r.log, fmt.Sprintf("%s "+format, append([]any{time.Now().Format("15:04:05.000")}, args...)...))
}

func (r *e2eRun) fail(format string, args ...any) {
	r.t.Helper()
	msg := fmt.Sprintf(format, args...)
	r.logf("FAIL: %s", msg)
	if !r.failed {
		r.failed = true
		tail := r.log
		if len(tail) > 80 && os.Getenv("H3X_E2E_FULLLOG") == "" {
			tail = tail[len(tail)-80:]
		}
		r.t.Errorf("seed %d: %s\nlast ops:\n%s", r.seed, msg, strings.Join(tail, "\n"))
	} else {
		r.t.Errorf("seed %d: %s", r.seed, msg)
	}
}

func (r *e2eRun) dial(i int) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := h3x.Dial(ctx, r.srv.addr, h3x.WithCredentials("m", "m-token"), h3x.WithInsecureSkipVerify(),
		h3x.WithBackoff(&h3x.ExponentialBackoff{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond, Multiplier: 2}))
	if err != nil {
		r.t.Fatalf("seed %d: Dial: %v", r.seed, err)
	}
	if r.clients[i] == nil {
		r.clients[i] = &e2eClient{}
	}
	r.clients[i].c = c
	r.clients[i].gen++
	r.clients[i].held = nil
}

func (r *e2eRun) liveSubs() bool {
	for _, c := range r.clients {
		if c.sub != nil {
			return true
		}
	}
	return false
}

// observe checks a delivery when the application gets it. Deliveries are
// compared by their lease start (a subscription may hand out a delivery
// leased long before, its lease expired meanwhile).
func (r *e2eRun) observe(ci int, d *h3x.Delivery, viaSub bool, fetchStart time.Time) {
	now := time.Now()
	ns := d.Event.Namespace
	id := d.Event.ID
	ev := r.events[id]
	r.counts["deliveries"]++
	if ev == nil {
		r.fail("delivery of an id never published: %s in %s", id, ns)
		return
	}
	orig := ns
	isDLQ := strings.HasSuffix(ns, h3x.DeadLetterSuffix)
	if isDLQ {
		orig = strings.TrimSuffix(ns, h3x.DeadLetterSuffix)
		r.counts["dlq deliveries"]++
	}
	if orig != ev.ns {
		r.fail("%s delivered in %s, published in %s", id, ns, ev.ns)
	}
	if d.Event.Message != ev.msg {
		r.fail("%s: message %q, published %q", id, d.Event.Message, ev.msg)
	}
	start := d.Deadline().Add(-r.srv.ackDL)
	nd := &e2eDel{d: d, ev: ev, ns: ns, client: ci, gen: r.clients[ci].gen, start: start, recv: now, deadline: d.Deadline(), disturb: r.disturb, inv: r.invisible, viaSub: viaSub, loose: r.inBurst}
	if viaSub {
		nd.sub = r.clients[ci].sub
		r.counts["sub deliveries"]++
		if now.After(d.Deadline()) {
			r.counts["sub deliveries handed out expired"]++
		}
		// Its connection may have ended (restart) while it waited in the
		// subscription: the lease ended then.
		for _, rs := range r.restarts {
			if !start.Before(rs[0]) && start.Before(rs[1]) {
				nd.end = start // leased during a shutdown: ended at some point after
				break
			}
			if start.Before(rs[0]) {
				nd.end = rs[0]
				break
			}
		}
	}
	r.logf("deliver c%d %s ns=%s att=%d start=%s sub=%v", ci, id, ns, d.Attempt(), start.Format("15:04:05.000"), viaSub)
	if start.After(now.Add(e2eSlack)) || start.Before(now.Add(-10*time.Second)) {
		r.fail("%s: lease start %v far from receipt %v (deadline %v)", id, start, now, d.Deadline())
	}
	if ev.gone {
		if !fetchStart.IsZero() && fetchStart.After(ev.ackDone) {
			r.fail("%s delivered (attempt %d, ns %s) by a fetch sent after its ack was confirmed OK", id, d.Attempt(), ns)
		} else if start.After(ev.ackDone.Add(e2eSlack)) {
			r.fail("%s leased at %v (attempt %d, ns %s) after its ack was confirmed OK at %v", id, start, d.Attempt(), ns, ev.ackDone)
		} else {
			r.counts["delivered before a confirmed ack"]++
		}
	}
	if !ev.nackReady.IsZero() && start.After(ev.nackSent) && start.Before(ev.nackReady.Add(-e2eSlack)) {
		r.fail("%s leased at %v, before its nack delay (sent %v) ended at %v", id, start, ev.nackSent, ev.nackReady)
	}
	// Exclusivity: no two deliveries' leases overlap.
	endOf := func(p *e2eDel) time.Time {
		end := p.deadline
		if !p.end.IsZero() && p.end.Before(end) {
			end = p.end
		}
		return end
	}
	for _, p := range ev.dels {
		if start.Add(e2eSlack).Before(endOf(p)) && p.start.Add(e2eSlack).Before(endOf(nd)) {
			r.fail("%s: c%d's lease (attempt %d ns %s, %v to %v) overlaps c%d's (attempt %d ns %s, %v to %v, recv %v)",
				id, ci, d.Attempt(), ns, start, endOf(nd), p.client, p.d.Attempt(), p.ns, p.start, endOf(p), p.recv)
		}
	}
	// Dead letters.
	if isDLQ {
		if d.Event.Metadata[h3x.MetaDeadLetterAttempts] != strconv.Itoa(e2eMaxAttempts) {
			r.fail("%s dead letter: %s = %q, want %d", id, h3x.MetaDeadLetterAttempts, d.Event.Metadata[h3x.MetaDeadLetterAttempts], e2eMaxAttempts)
		}
		if d.Event.Metadata[h3x.MetaDeadLetterNamespace] != orig {
			r.fail("%s dead letter: original namespace %q", id, d.Event.Metadata[h3x.MetaDeadLetterNamespace])
		}
		if _, ok := d.Event.Metadata[h3x.MetaDeadLetterReason]; !ok {
			r.fail("%s dead letter without a reason: %v", id, d.Event.Metadata)
		} else if d.Event.Metadata[h3x.MetaDeadLetterReason] == "" {
			r.counts["dead letters with an empty reason"]++
		}
		if ev.dlqStart.IsZero() || start.Before(ev.dlqStart) {
			ev.dlqStart = start
		}
		for _, p := range ev.dels {
			if p.ns == orig && p.start.After(ev.dlqStart) {
				r.fail("%s delivered in %s (attempt %d) at %v, after its dead letter was leased at %v", id, orig, p.d.Attempt(), p.start, ev.dlqStart)
			}
		}
	} else {
		if !ev.dlqStart.IsZero() && start.After(ev.dlqStart) {
			r.fail("%s delivered in %s (attempt %d) at %v, after its dead letter was leased at %v", id, ns, d.Attempt(), start, ev.dlqStart)
		}
		if d.Attempt() > e2eMaxAttempts {
			r.fail("%s: attempt %d above max %d", id, d.Attempt(), e2eMaxAttempts)
		}
	}
	// Attempt numbers: strictly increasing in lease order, by one between
	// two fetched deliveries with nothing unseen in between.
	ev.dels = append(ev.dels, nd)
	sort.SliceStable(ev.dels, func(i, j int) bool { return ev.dels[i].start.Before(ev.dels[j].start) })
	var prev *e2eDel
	for _, p := range ev.dels {
		if p.ns != ns {
			continue
		}
		if prev != nil && (prev == nd || p == nd) {
			switch {
			case p.d.Attempt() <= prev.d.Attempt():
				r.fail("%s in %s: attempt %d (c%d, leased %v) after attempt %d (c%d, leased %v)", id, ns, p.d.Attempt(), p.client, p.start, prev.d.Attempt(), prev.client, prev.start)
			case p.d.Attempt() != prev.d.Attempt()+1 && !p.viaSub && !prev.viaSub && !p.loose && !prev.loose && p.disturb == prev.disturb:
				r.fail("%s in %s: attempt %d after attempt %d with nothing unseen in between", id, ns, p.d.Attempt(), prev.d.Attempt())
			}
		}
		prev = p
	}
	if ev.last[ns] == nil || ev.last[ns].start.Before(start) {
		ev.last[ns] = nd
	}
	r.clients[ci].held = append(r.clients[ci].held, nd)
}

func (r *e2eRun) newEvent(ns string) h3x.Event {
	r.nextID++
	e := h3x.Event{Namespace: ns, Type: "t", Message: fmt.Sprintf("m%d", r.nextID)}
	if r.rng.Intn(2) == 0 {
		e.ID = fmt.Sprintf("s%d-%d", r.seed, r.nextID)
	}
	return e
}

func (r *e2eRun) opPublish(ci int) {
	c := r.clients[ci]
	n := 1 + r.rng.Intn(3)
	var evs []h3x.Event
	var dup []bool
	for range n {
		if len(r.order) > 0 && r.rng.Intn(6) == 0 {
			id := r.order[r.rng.Intn(len(r.order))]
			ns := e2eNamespaces[r.rng.Intn(len(e2eNamespaces))]
			evs = append(evs, h3x.Event{ID: id, Namespace: ns, Message: "dup"})
			dup = append(dup, true)
			continue
		}
		evs = append(evs, r.newEvent(e2eNamespaces[r.rng.Intn(len(e2eNamespaces))]))
		dup = append(dup, false)
	}
	// A batch must not name one new id twice; dups of old ids are fine.
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	res, err := c.c.Publish(ctx, evs...)
	for i := range evs {
		if !dup[i] {
			// Known from now on (IDs are written into evs); stored or maybe stored.
			ev := &e2eEvent{id: evs[i].ID, ns: evs[i].Namespace, msg: evs[i].Message, last: map[string]*e2eDel{}}
			r.events[ev.id] = ev
			r.order = append(r.order, ev.id)
		}
	}
	if err != nil {
		r.fail("c%d Publish: %v", ci, err)
		return
	}
	for i, pr := range res {
		if pr.ID != evs[i].ID {
			r.fail("publish result id %q, event id %q", pr.ID, evs[i].ID)
		}
		want := h3x.PublishStored
		if dup[i] {
			want = h3x.PublishDuplicate
		}
		if pr.Status != want {
			r.fail("c%d publish of %s (dup=%v ns=%s): %v %v, want %v", ci, pr.ID, dup[i], evs[i].Namespace, pr.Status, pr.Err, want)
		}
		if !dup[i] && pr.Status == h3x.PublishStored {
			r.events[pr.ID].stored = true
			r.counts["published"]++
		}
		if dup[i] {
			r.counts["dup publishes"]++
		}
	}
	r.logf("publish c%d %v", ci, func() []string {
		var s []string
		for i, e := range evs {
			s = append(s, fmt.Sprintf("%s/%s/dup=%v", e.ID, e.Namespace, dup[i]))
		}
		return s
	}())
}

func (r *e2eRun) nsChoice() []string {
	switch r.rng.Intn(6) {
	case 0:
		return []string{"a"}
	case 1:
		return []string{"b"}
	case 2:
		return []string{"a.dlq", "b.dlq"}
	case 3:
		return []string{"a", "b.dlq"}
	default:
		return []string{"a", "b"}
	}
}

func (r *e2eRun) opFetch(ci int) {
	c := r.clients[ci]
	max := 1 + r.rng.Intn(4)
	ns := r.nsChoice()
	wait := time.Duration(30+r.rng.Intn(250)) * time.Millisecond
	ctx, cancel := context.WithTimeout(r.ctx, wait)
	defer cancel()
	start := time.Now()
	ds, err := c.c.Fetch(ctx, max, ns...)
	r.logf("fetch c%d max=%d ns=%v -> %d (%v)", ci, max, ns, len(ds), err)
	if err != nil {
		if !errors.Is(err, context.DeadlineExceeded) {
			r.fail("c%d Fetch: %v", ci, err)
		}
		r.counts["empty fetches"]++
		// A fetch that ended with its ctx may have leased events it gives
		// back unseen: attempts may be skipped (a lease could expire
		// meanwhile, or the give-back fail).
		r.disturb++
		r.invisible++
		return
	}
	if len(ds) > max {
		r.fail("fetch of max %d returned %d", max, len(ds))
	}
	for _, d := range ds {
		r.observe(ci, d, false, start)
	}
}

func (r *e2eRun) pickHeld(ci int) []*e2eDel {
	c := r.clients[ci]
	var live []*e2eDel
	for _, h := range c.held {
		if !h.settled {
			live = append(live, h)
		}
	}
	if r.rng.Intn(4) == 0 {
		for _, h := range r.orphans {
			if !h.settled {
				live = append(live, h)
			}
		}
	}
	if len(live) == 0 {
		return nil
	}
	r.rng.Shuffle(len(live), func(i, j int) { live[i], live[j] = live[j], live[i] })
	return live[:1+r.rng.Intn(len(live))]
}

// surelyLive reports whether the model knows the delivery's lease is live
// (held by this client's current connection, deadline well ahead).
func (r *e2eRun) surelyLive(h *e2eDel, now time.Time) bool {
	return h.end.IsZero() && !h.settled && !h.ev.gone && h.deadline.After(now.Add(150*time.Millisecond)) && h.gen == r.clients[h.client].gen
}

func (r *e2eRun) latestOf(h *e2eDel) bool {
	return h.ev.last[h.ns] == h
}

// expect returns the outcome the model is sure of for settling h from
// client ci now, or 0 when it cannot tell.
func (r *e2eRun) expect(kind string, ci int, h *e2eDel, now time.Time) h3x.SettleStatus {
	if r.inBurst {
		return 0
	}
	if h.ev.gone {
		return h3x.SettleUnknown
	}
	isDLQ := strings.HasSuffix(h.ns, h3x.DeadLetterSuffix)
	if h.ev.last[h.ns] != h || h.inv != r.invisible || h.uncertain {
		return 0
	}
	sameConn := h.client == ci && h.gen == r.clients[ci].gen && h.end.IsZero()
	live := h.end.IsZero() && h.deadline.After(now.Add(150*time.Millisecond))
	if !h.end.IsZero() && now.Before(h.endSure) {
		return 0
	}
	ended := !h.end.IsZero() || h.deadline.Before(now.Add(-80*time.Millisecond))
	switch {
	case live && sameConn:
		return h3x.SettleOK
	case live:
		return h3x.SettleStale
	case ended && !isDLQ && h.d.Attempt() >= e2eMaxAttempts:
		return h3x.SettleUnknown // dead-lettered when its lease ended
	case ended && kind == "extend":
		return h3x.SettleStale
	case ended:
		return h3x.SettleOK
	}
	return 0
}

func (r *e2eRun) opSettle(ci int, kind string) {
	hs := r.pickHeld(ci)
	if len(hs) == 0 {
		return
	}
	if r.rng.Intn(5) == 0 {
		ci = r.rng.Intn(len(r.clients)) // settle from another client
	}
	c := r.clients[ci]
	ds := make([]*h3x.Delivery, len(hs))
	exp := make([]h3x.SettleStatus, len(hs))
	sent := time.Now()
	for i, h := range hs {
		ds[i] = h.d
		exp[i] = r.expect(kind, ci, h, sent)
	}
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	var res []h3x.SettleResult
	var err error
	var delay time.Duration
	var ext time.Duration
	switch kind {
	case "ack":
		res, err = c.c.Ack(ctx, ds...)
	case "nack":
		if r.rng.Intn(2) == 0 {
			delay = time.Duration(20+r.rng.Intn(200)) * time.Millisecond
		}
		res, err = c.c.Nack(ctx, delay, "model nack", ds...)
	case "extend":
		ext = time.Duration(100+r.rng.Intn(500)) * time.Millisecond
		res, err = c.c.Extend(ctx, ext, ds...)
	}
	done := time.Now()
	if err != nil {
		r.fail("c%d %s: %v", ci, kind, err)
		return
	}
	if len(res) != len(ds) {
		r.fail("c%d %s: %d results for %d", ci, kind, len(res), len(ds))
		return
	}
	for i, h := range hs {
		st := res[i].Status
		r.counts[kind+" "+st.String()]++
		r.logf("%s c%d %s ns=%s att=%d (of c%d) -> %v (expected %v)", kind, ci, h.ev.id, h.ns, h.d.Attempt(), h.client, st, exp[i])
		if res[i].ID != h.ev.id {
			r.fail("%s result id %q for %q", kind, res[i].ID, h.ev.id)
		}
		if exp[i] != 0 {
			r.counts["checked "+kind+" "+exp[i].String()]++
		}
		// The Badger queue answers SettleStale where the memory queue
		// answers SettleUnknown for events acked before a restart or
		// dead-lettered (documented at OpenBadgerQueue).
		if exp[i] == h3x.SettleUnknown && st == h3x.SettleStale && r.srv.badger {
			r.counts["badger stale for unknown"]++
		} else if exp[i] != 0 && st != exp[i] {
			r.fail("c%d %s of %s (c%d's, ns %s attempt %d, deadline %v, end %v, sent %v) answered %v, model expects %v",
				ci, kind, h.ev.id, h.client, h.ns, h.d.Attempt(), h.deadline, h.end, sent, st, exp[i])
		}
		if st == h3x.SettleOK && h.ev.gone {
			r.fail("c%d %s of %s answered OK after an earlier ack was confirmed OK", ci, kind, h.ev.id)
		}
		switch kind {
		case "ack":
			h.settled = true
			if h.end.IsZero() {
				h.end = sent
			}
			if st == h3x.SettleOK {
				h.ev.gone = true
				h.ev.ackSent, h.ev.ackDone = sent, done
			}
		case "nack":
			h.settled = true
			if h.end.IsZero() {
				h.end = sent
			}
			if st == h3x.SettleOK {
				if h.d.Attempt() >= e2eMaxAttempts && !strings.HasSuffix(h.ns, h3x.DeadLetterSuffix) {
					r.counts["dead-lettered by nack"]++
				} else if delay > 0 {
					h.ev.nackReady, h.ev.nackSent = sent.Add(delay), sent
				}
			}
		case "extend":
			if st == h3x.SettleOK {
				if nd := sent.Add(ext); h.end.IsZero() {
					h.deadline = nd
				}
			}
		}
	}
}

func (r *e2eRun) opSubscribe(ci int) {
	c := r.clients[ci]
	if c.sub != nil {
		r.logf("sub close c%d", ci)
		if err := c.sub.Close(); err != nil {
			r.fail("c%d subscription Close: %v", ci, err)
		}
		c.sub = nil
		r.disturb++
		r.invisible++
		return
	}
	ns := r.nsChoice()
	opts := h3x.SubscribeOptions{MaxUnacked: 1 + r.rng.Intn(4), BatchSize: 1 + r.rng.Intn(3)}
	s, err := c.c.Subscribe(r.ctx, ns, opts)
	r.logf("sub open c%d ns=%v %+v err=%v", ci, ns, opts, err)
	if err != nil {
		r.fail("c%d Subscribe: %v", ci, err)
		return
	}
	c.sub = s
	c.subMax, c.subNS = opts.MaxUnacked, ns
	r.disturb++
	r.invisible++
}

func (r *e2eRun) opReadSub(ci int) {
	c := r.clients[ci]
	if c.sub == nil {
		return
	}
	n := 1 + r.rng.Intn(3)
	t := time.NewTimer(time.Duration(20+r.rng.Intn(150)) * time.Millisecond)
	defer t.Stop()
	for range n {
		select {
		case d, ok := <-c.sub.Events():
			if !ok {
				r.fail("c%d subscription ended: %v", ci, c.sub.Err())
				c.sub = nil
				return
			}
			r.observe(ci, d, true, time.Time{})
			if !slicesContains(c.subNS, d.Event.Namespace) {
				r.fail("c%d subscription to %v handed out an event of %s", ci, c.subNS, d.Event.Namespace)
			}
			out := 0
			for _, h := range c.held {
				if h.sub == c.sub && !h.settled {
					out++
				}
			}
			if out > c.subMax {
				r.fail("c%d subscription (MaxUnacked %d) handed out %d unsettled deliveries", ci, c.subMax, out)
			}
		case <-t.C:
			return
		}
	}
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func (r *e2eRun) endLeases(ci int, at time.Time, grace time.Duration) {
	for _, h := range r.clients[ci].held {
		if h.end.IsZero() {
			h.end = at
			h.endSure = time.Now().Add(grace)
		}
	}
}

func (r *e2eRun) opReconnect(ci int) {
	c := r.clients[ci]
	r.logf("client close c%d", ci)
	at := time.Now()
	if c.sub != nil {
		c.sub.Close()
		c.sub = nil
		r.invisible++
	}
	if err := c.c.Close(); err != nil {
		r.fail("c%d Close: %v", ci, err)
	}
	r.endLeases(ci, at, 200*time.Millisecond) // the server notices the close a little later
	for _, h := range c.held {
		if !h.settled {
			r.orphans = append(r.orphans, h)
		}
	}
	r.disturb++
	r.dial(ci)
}

func (r *e2eRun) opRestart() {
	r.logf("server restart")
	at := time.Now()
	for i := range r.clients {
		r.endLeases(i, at, 0) // Shutdown returns after the releases
	}
	r.srv.stop()
	r.restarts = append(r.restarts, [2]time.Time{at, time.Now()})
	// Nack delays do not survive a restart of the Badger queue
	// (documented at OpenBadgerQueue): delayed events are ready at once.
	for _, ev := range r.events {
		ev.nackReady = time.Time{}
	}
	r.srv.start()
	r.disturb++
	for i := range r.clients {
		r.clients[i].gen++ // new connection after reconnect
		r.clients[i].connLost = at
	}
}

func (r *e2eRun) opDrop() {
	r.logf("drop connections")
	at := time.Now()
	for i := range r.clients {
		r.endLeases(i, at, 200*time.Millisecond) // released once each connection's end is processed
	}
	r.srv.srv.DropConnections()
	r.restarts = append(r.restarts, [2]time.Time{at, time.Now()})
	r.disturb++
	for i := range r.clients {
		r.clients[i].gen++
	}
	r.counts["drops"]++
}

// opAsyncSettle settles through Delivery.Ack, Nack and Extend (batched by
// the client), flushing at once or not.
func (r *e2eRun) opAsyncSettle(ci int) {
	c := r.clients[ci]
	var hs []*e2eDel
	for _, h := range c.held {
		if !h.settled && r.rng.Intn(2) == 0 {
			hs = append(hs, h)
		}
	}
	if len(hs) == 0 {
		return
	}
	type pend struct {
		h     *e2eDel
		kind  string
		exp   h3x.SettleStatus
		sent  time.Time
		delay time.Duration
	}
	var ps []pend
	for _, h := range hs {
		kind := []string{"ack", "ack", "nack", "extend"}[r.rng.Intn(4)]
		sent := time.Now()
		p := pend{h: h, kind: kind, exp: r.expect(kind, ci, h, sent), sent: sent}
		var err error
		switch kind {
		case "ack":
			err = h.d.Ack()
		case "nack":
			if r.rng.Intn(2) == 0 {
				p.delay = time.Duration(20+r.rng.Intn(200)) * time.Millisecond
			}
			err = h.d.Nack(p.delay)
		case "extend":
			p.delay = time.Duration(100+r.rng.Intn(500)) * time.Millisecond
			err = h.d.Extend(p.delay)
		}
		r.logf("async %s c%d %s ns=%s att=%d (expected %v) err=%v", kind, ci, h.ev.id, h.ns, h.d.Attempt(), p.exp, err)
		if err != nil {
			r.fail("c%d async %s: %v", ci, kind, err)
			return
		}
		r.counts["async "+kind]++
		ps = append(ps, p)
	}
	flushed := false
	if r.rng.Intn(4) != 0 {
		ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
		err := c.c.Flush(ctx)
		cancel()
		if err != nil {
			r.fail("c%d Flush: %v", ci, err)
		}
		flushed = err == nil
	}
	done := time.Now()
	for _, p := range ps {
		h := p.h
		sure := flushed && p.exp == h3x.SettleOK && done.Before(h.deadline.Add(-50*time.Millisecond))
		switch p.kind {
		case "ack":
			h.settled = true
			if h.end.IsZero() {
				h.end = p.sent
			}
			if sure {
				h.ev.gone = true
				h.ev.ackSent, h.ev.ackDone = p.sent, done
				r.counts["async ack sure"]++
			} else if !h.ev.gone {
				h.ev.maybeGone = true
			}
		case "nack":
			h.settled = true
			if h.end.IsZero() {
				h.end = p.sent
			}
			if sure && p.delay > 0 && (h.d.Attempt() < e2eMaxAttempts || strings.HasSuffix(h.ns, h3x.DeadLetterSuffix)) {
				h.ev.nackReady, h.ev.nackSent = p.sent.Add(p.delay), p.sent
			}
		case "extend":
			// An extension sets the deadline to now + d: it may shorten
			// the lease.
			if nd := p.sent.Add(p.delay); nd.Before(h.deadline) {
				h.deadline = nd
			}
			if !sure {
				h.uncertain = true
			}
		}
	}
	r.disturb++ // results unseen
}

// opBurst runs operations from every client at once; the model is updated
// under r.mu and checks only what holds whatever the interleaving.
func (r *e2eRun) opBurst() {
	r.logf("burst begins")
	r.inBurst = true
	r.disturb++
	r.invisible++
	var wg sync.WaitGroup
	for ci := range r.clients {
		rng := rand.New(rand.NewSource(r.rng.Int63()))
		c := r.clients[ci]
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []*e2eDel
			for range 4 + rng.Intn(10) {
				switch p := rng.Intn(10); {
				case p < 3:
					r.mu.Lock()
					var evs []h3x.Event
					for range 1 + rng.Intn(2) {
						r.nextID++
						// IDs known before the publish: another client may
						// get the event before the publish is answered.
						e := h3x.Event{ID: fmt.Sprintf("b%d-%d", r.seed, r.nextID), Namespace: e2eNamespaces[rng.Intn(2)], Type: "t", Message: fmt.Sprintf("m%d", r.nextID)}
						evs = append(evs, e)
						ev := &e2eEvent{id: e.ID, ns: e.Namespace, msg: e.Message, last: map[string]*e2eDel{}}
						r.events[ev.id] = ev
						r.order = append(r.order, ev.id)
					}
					r.mu.Unlock()
					ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
					res, err := c.c.Publish(ctx, evs...)
					cancel()
					r.mu.Lock()
					for i := range evs {
						ev := r.events[evs[i].ID]
						if err == nil && res[i].Status == h3x.PublishStored {
							ev.stored = true
							r.counts["published"]++
						} else {
							r.fail("c%d burst publish of %s: %v %+v", ci, evs[i].ID, err, res)
						}
					}
					r.logf("burst publish c%d %d events", ci, len(evs))
					r.mu.Unlock()
				case p < 6:
					ns := [][]string{{"a"}, {"b"}, {"a", "b"}, {"a", "b", "a.dlq", "b.dlq"}}[rng.Intn(4)]
					ctx, cancel := context.WithTimeout(r.ctx, time.Duration(50+rng.Intn(200))*time.Millisecond)
					start := time.Now()
					ds, err := c.c.Fetch(ctx, 1+rng.Intn(3), ns...)
					cancel()
					r.mu.Lock()
					if err != nil && !errors.Is(err, context.DeadlineExceeded) {
						r.fail("c%d burst Fetch: %v", ci, err)
					}
					for _, d := range ds {
						n := len(c.held)
						r.observe(ci, d, false, start)
						if len(c.held) > n {
							mine = append(mine, c.held[len(c.held)-1])
						}
					}
					r.mu.Unlock()
				default:
					var hs []*e2eDel
					for _, h := range mine {
						if !h.settled && rng.Intn(2) == 0 {
							hs = append(hs, h)
						}
					}
					if len(hs) == 0 {
						continue
					}
					ds := make([]*h3x.Delivery, len(hs))
					for i, h := range hs {
						ds[i] = h.d
					}
					kind := []string{"ack", "ack", "nack", "extend"}[rng.Intn(4)]
					var delay time.Duration
					if rng.Intn(2) == 0 {
						delay = time.Duration(20+rng.Intn(300)) * time.Millisecond
					}
					ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
					// The lease may end (or, for an extension, be shortened)
					// as soon as the request is sent: another client may
					// observe the next lease before this call returns.
					r.mu.Lock()
					sent := time.Now()
					for _, h := range hs {
						if kind == "extend" {
							if nd := sent.Add(delay + 50*time.Millisecond); nd.Before(h.deadline) {
								h.deadline = nd
							}
						} else if h.end.IsZero() {
							h.end = sent
						}
					}
					r.mu.Unlock()
					var res []h3x.SettleResult
					var err error
					switch kind {
					case "ack":
						res, err = c.c.Ack(ctx, ds...)
					case "nack":
						res, err = c.c.Nack(ctx, delay, "burst", ds...)
					case "extend":
						res, err = c.c.Extend(ctx, delay+50*time.Millisecond, ds...)
					}
					cancel()
					done := time.Now()
					r.mu.Lock()
					if err != nil || len(res) != len(ds) {
						r.fail("c%d burst %s: %v (%d results for %d)", ci, kind, err, len(res), len(ds))
						r.mu.Unlock()
						continue
					}
					for i, h := range hs {
						st := res[i].Status
						r.counts["burst "+kind+" "+st.String()]++
						r.logf("burst %s c%d %s ns=%s att=%d -> %v", kind, ci, h.ev.id, h.ns, h.d.Attempt(), st)
						if st == h3x.SettleOK && h.ev.gone && sent.After(h.ev.ackDone) {
							r.fail("c%d burst %s of %s (sent %v) answered OK after an earlier ack was confirmed OK at %v", ci, kind, h.ev.id, sent, h.ev.ackDone)
						}
						switch kind {
						case "ack", "nack":
							h.settled = true
							if h.end.IsZero() {
								h.end = sent
							}
							if kind == "ack" && st == h3x.SettleOK {
								h.ev.gone = true
								h.ev.ackSent, h.ev.ackDone = sent, done
							}
							if kind == "nack" && st == h3x.SettleOK && delay > 0 && (h.d.Attempt() < e2eMaxAttempts || strings.HasSuffix(h.ns, h3x.DeadLetterSuffix)) {
								h.ev.nackReady, h.ev.nackSent = sent.Add(delay), sent
							}
						case "extend":
							if nd := sent.Add(delay + 50*time.Millisecond); nd.Before(h.deadline) || st == h3x.SettleOK {
								if st == h3x.SettleOK || nd.Before(h.deadline) {
									if st == h3x.SettleOK {
										h.deadline = nd
									}
								}
							}
						}
					}
					r.mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	r.inBurst = false
	r.disturb++
	r.invisible++
	r.logf("burst ends")
}

func (r *e2eRun) opSleep() {
	d := time.Duration(r.rng.Intn(int(r.srv.ackDL*3/2))) + 10*time.Millisecond
	r.logf("sleep %v", d)
	time.Sleep(d)
}

func (r *e2eRun) outstanding() map[string]int {
	out := map[string]int{}
	for _, ev := range r.events {
		if ev.stored && !ev.gone && !ev.maybeGone {
			out[ev.ns]++
		}
	}
	return out
}

func (r *e2eRun) maybeOutstanding() map[string]int {
	out := map[string]int{}
	for _, ev := range r.events {
		if ev.stored && !ev.gone && ev.maybeGone {
			out[ev.ns]++
		}
	}
	return out
}

func (r *e2eRun) queueTotal() int {
	st, err := r.srv.srv.Stats(r.ctx)
	if err != nil {
		r.fail("Stats: %v", err)
		return 0
	}
	n := 0
	for _, x := range st {
		n += x.Ready + x.Leased + x.Delayed
	}
	return n
}

// checkStats compares the queue's counts with the model, when nothing is
// in flight: no subscription, and the ops are sequential.
func (r *e2eRun) checkStats(final bool) {
	if r.liveSubs() {
		return
	}
	want := r.outstanding()
	maybe := r.maybeOutstanding()
	var got map[string]int
	var st []h3x.NamespaceStats
	deadline := time.Now().Add(3 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		var err error
		st, err = r.srv.srv.Stats(ctx)
		cancel()
		if err != nil {
			r.fail("Stats: %v", err)
			return
		}
		got = map[string]int{}
		for _, s := range st {
			orig := strings.TrimSuffix(s.Namespace, h3x.DeadLetterSuffix)
			got[orig] += s.Ready + s.Leased + s.Delayed
			if final && s.Leased+s.Delayed+s.Ready != 0 {
				got["nonzero"]++
			}
			if s.Ready+s.Leased+s.Delayed == 0 && s.Bytes != 0 {
				got["bytes"]++
			}
		}
		ok := true
		for _, ns := range append([]string{"nonzero", "bytes"}, e2eNamespaces...) {
			if got[ns] < want[ns] || got[ns] > want[ns]+maybe[ns] {
				ok = false
			}
		}
		if ok || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, ns := range append([]string{"nonzero", "bytes"}, e2eNamespaces...) {
		if got[ns] < want[ns] || got[ns] > want[ns]+maybe[ns] {
			r.fail("Stats disagree with the model for %s: queue %d, model %d (+%d maybe acked) (stats %+v)", ns, got[ns], want[ns], maybe[ns], st)
		}
	}
	r.counts["stats checks"]++
}

func (r *e2eRun) drain() {
	for _, c := range r.clients {
		if c.sub != nil {
			c.sub.Close()
			c.sub = nil
			r.disturb++
			r.invisible++
		}
	}
	all := []string{"a", "b", "a.dlq", "b.dlq"}
	// Phase 1: drain through a subscription; it must not get stuck while
	// events are ready.
	if r.rng.Intn(2) == 0 {
		ci := r.rng.Intn(len(r.clients))
		c := r.clients[ci]
		s, err := c.c.Subscribe(r.ctx, all, h3x.SubscribeOptions{MaxUnacked: 1 + r.rng.Intn(4), BatchSize: 1 + r.rng.Intn(3)})
		if err != nil {
			r.fail("drain Subscribe: %v", err)
			return
		}
		c.sub = s
		r.disturb++
		r.invisible++
		end := time.Now().Add(15 * time.Second)
		idleSince := time.Now()
	loop:
		for time.Now().Before(end) && !r.failed {
			left := 0
			for _, n := range r.outstanding() {
				left += n
			}
			if left == 0 {
				break
			}
			t := time.NewTimer(100 * time.Millisecond)
			select {
			case d, ok := <-s.Events():
				t.Stop()
				if !ok {
					r.fail("drain subscription ended: %v", s.Err())
					break loop
				}
				r.observe(ci, d, true, time.Time{})
				idleSince = time.Now()
				// Settle everything held: unsettled deliveries keep the
				// subscription's credits.
				for !r.failed {
					if hs := r.pickHeld(ci); len(hs) == 0 {
						break
					}
					if r.rng.Intn(6) == 0 {
						r.opSettle(ci, "nack")
					} else {
						r.opSettle(ci, "ack")
					}
				}
			case <-t.C:
				if time.Since(idleSince) > 2*time.Second {
					st, err := r.srv.srv.Stats(r.ctx, all...)
					if err != nil {
						r.fail("Stats: %v", err)
						break loop
					}
					ready, busy := 0, 0
					for _, x := range st {
						ready += x.Ready
						busy += x.Leased + x.Delayed
					}
					if ready > 0 {
						r.fail("drain subscription idle for %v while %d events are ready (%d leased or delayed): %+v", time.Since(idleSince), ready, busy, st)
						break loop
					}
					idleSince = time.Now()
				}
			}
		}
		s.Close()
		c.sub = nil
		r.disturb++
		r.invisible++
		// Settle what it handed out and was not settled (nacks above).
		for {
			hs := r.pickHeld(ci)
			if len(hs) == 0 {
				break
			}
			r.opSettle(ci, "ack")
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) && !r.failed {
		left := 0
		for _, n := range r.outstanding() {
			left += n
		}
		if left == 0 && r.queueTotal() == 0 {
			break
		}
		ci := r.rng.Intn(len(r.clients))
		c := r.clients[ci]
		ctx, cancel := context.WithTimeout(r.ctx, 300*time.Millisecond)
		start := time.Now()
		ds, err := c.c.Fetch(ctx, 10, all...)
		cancel()
		if err != nil {
			r.disturb++
			continue
		}
		for _, d := range ds {
			r.observe(ci, d, false, start)
		}
		// Ack all it holds (a few nacks, to exercise dead-lettering in the drain).
		for {
			hs := r.pickHeld(ci)
			if len(hs) == 0 {
				break
			}
			if r.rng.Intn(5) == 0 {
				r.opSettle(ci, "nack")
			} else {
				r.opSettle(ci, "ack")
			}
		}
	}
	left := r.outstanding()
	for ns, n := range left {
		if n > 0 {
			var ids []string
			for _, ev := range r.events {
				if ev.stored && !ev.gone && ev.ns == ns {
					ids = append(ids, ev.id)
				}
			}
			sort.Strings(ids)
			if len(ids) > 10 {
				ids = ids[:10]
			}
			r.fail("drain: %d events of %s never acked (e.g. %v)", n, ns, ids)
		}
	}
	r.checkStats(true)
}

func runE2E(t *testing.T, seed int64, badger bool, steps int) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	rng := rand.New(rand.NewSource(seed))
	srv := &e2eServer{t: t, badger: badger, dir: t.TempDir(), ackDL: time.Duration(150+rng.Intn(250)) * time.Millisecond,
		logger: slog.New(slog.DiscardHandler)}
	if os.Getenv("H3X_E2E_LOG") != "" {
		srv.logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	srv.start()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	r := &e2eRun{t: t, seed: seed, rng: rng, srv: srv, events: map[string]*e2eEvent{}, ctx: ctx, counts: map[string]int{}}
	nc := 2 + rng.Intn(3)
	r.clients = make([]*e2eClient, nc)
	for i := range nc {
		r.dial(i)
	}
	defer func() {
		for _, c := range r.clients {
			if c.sub != nil {
				c.sub.Close()
			}
			c.c.Close()
		}
		srv.stop()
		cancel()
	}()
	burst := os.Getenv("H3X_E2E_BURST") != ""
	for step := 0; step < steps && !r.failed && ctx.Err() == nil; step++ {
		ci := rng.Intn(nc)
		if r.liveSubs() {
			r.disturb++ // a subscription may take and give back unseen at any time
			r.invisible++
		}
		if burst && rng.Intn(15) == 0 {
			r.opBurst()
			continue
		}
		switch p := rng.Intn(100); {
		case p < 25:
			r.opPublish(ci)
		case p < 45:
			r.opFetch(ci)
		case p < 58:
			r.opSettle(ci, "ack")
		case p < 68:
			r.opSettle(ci, "nack")
		case p < 71:
			r.opSettle(ci, "extend")
		case p < 74:
			r.opAsyncSettle(ci)
		case p < 80:
			r.opSubscribe(ci)
		case p < 88:
			r.opReadSub(ci)
		case p < 91:
			r.opReconnect(ci)
		case p < 93:
			if badger {
				r.opRestart()
			}
		case p < 94:
			r.opDrop()
		case p < 96:
			r.opSleep()
		default:
			r.checkStats(false)
		}
	}
	if !r.failed {
		r.drain()
	}
	if testing.Verbose() {
		t.Logf("seed %d badger=%v clients=%d ackDL=%v opens=%d counts=%v", seed, badger, nc, srv.ackDL, srv.opens, r.counts)
	}
	e2eMu.Lock()
	for k, v := range r.counts {
		e2eTotals[k] += v
	}
	e2eMu.Unlock()
}

var (
	e2eMu     sync.Mutex
	e2eTotals = map[string]int{}
)

func TestModelE2E(t *testing.T) {
	seeds := e2eEnvInt("H3X_E2E_SEEDS", 3)
	first := e2eEnvInt("H3X_E2E_FIRST", 1)
	steps := e2eEnvInt("H3X_E2E_STEPS", 120)
	kinds := os.Getenv("H3X_E2E_QUEUE") // "memory", "badger" or both
	for _, badger := range []bool{false, true} {
		name := "memory"
		if badger {
			name = "badger"
		}
		if kinds != "" && kinds != name {
			continue
		}
		t.Run(name, func(t *testing.T) {
			for s := first; s < first+seeds; s++ {
				t.Run(strconv.Itoa(s), func(t *testing.T) {
					runE2E(t, int64(s), badger, steps)
				})
			}
		})
	}
	t.Logf("e2eTotals: %v", e2eTotals)
}

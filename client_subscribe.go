package h3x

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// SubscribeOptions configure a subscription. The zero value gives the
// documented defaults.
type SubscribeOptions struct {
	// MaxUnacked is the most deliveries handed out and not yet acked or
	// nacked; the subscription fetches no more until some are settled.
	// Default DefaultMaxUnacked (1,024).
	MaxUnacked int
	// BatchSize is the most events asked for in one fetch. Default 256.
	BatchSize int
}

// Subscription hands out deliveries from namespaces on a channel that the
// library owns and closes. It fetches with long polls and prefetches up to
// MaxUnacked, and resumes by itself after a reconnect.
type Subscription struct {
	client     *Client
	namespaces []string
	opts       SubscribeOptions
	ch         chan *Delivery
	cancel     context.CancelFunc
	credits    chan struct{} // one token per delivery that may be handed out
	done       chan struct{}
	mu         sync.Mutex
	err        error

	// Deliveries are handed out by the subscription stream's reader (see
	// handOut); pushStop stops that before ch is closed.
	pushMu   sync.Mutex
	pushStop chan struct{}
}

// Subscribe starts a subscription to namespaces (default: those of
// WithNamespaces, or the client's explicit consume grants). Its Events
// channel is closed when Close is called, when ctx ends, when the client
// closes, or on a terminal error, which Err reports afterwards. Settle each
// delivery with Ack or Nack: at most MaxUnacked are outstanding at once.
func (c *Client) Subscribe(ctx context.Context, namespaces []string, opts SubscribeOptions) (*Subscription, error) {
	select {
	case <-c.closed:
		return nil, ErrClosed
	default:
	}
	if opts.MaxUnacked == 0 {
		opts.MaxUnacked = DefaultMaxUnacked
	}
	if opts.BatchSize == 0 {
		opts.BatchSize = 256
	}
	if opts.MaxUnacked < 0 || opts.BatchSize < 0 {
		return nil, newError(CodeInvalidArgument, "Subscribe: MaxUnacked and BatchSize must not be negative")
	}
	opts.BatchSize = min(opts.BatchSize, opts.MaxUnacked)
	if len(namespaces) == 0 {
		namespaces = c.cfg.namespaces
	}
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(c.ctx, cancel)
	s := &Subscription{
		client:     c,
		namespaces: append([]string(nil), namespaces...),
		opts:       opts,
		ch:         make(chan *Delivery, min(max(opts.BatchSize/4, 1), 64)),
		cancel:     cancel,
		credits:    make(chan struct{}, opts.MaxUnacked),
		done:       make(chan struct{}),
		pushStop:   make(chan struct{}),
	}
	for range opts.MaxUnacked {
		s.credits <- struct{}{}
	}
	c.acker.addSub(s)
	if !c.goOwned(func() {
		defer stop()
		s.run(ctx)
	}) {
		c.acker.removeSub(s)
		stop()
		cancel()
		return nil, ErrClosed
	}
	return s, nil
}

// Events returns the channel of deliveries. It is closed when the
// subscription ends; Err then says why.
func (s *Subscription) Events() <-chan *Delivery { return s.ch }

// Err returns the error that ended the subscription: nil after Close or the
// end of its ctx, ErrClosed after the client closed, or a terminal error
// (authentication, permission).
func (s *Subscription) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Close ends the subscription and waits until its channel is closed.
// Deliveries already received stay valid and can still be acked. Close is
// safe to call more than once.
func (s *Subscription) Close() error {
	s.cancel()
	<-s.done
	return nil
}

// release returns n credits: deliveries settled, or never handed out.
func (s *Subscription) release(n int) {
	for range n {
		select {
		case s.credits <- struct{}{}:
		default: // full: the credit is not needed
		}
	}
}

// subscriptionPolls is how many FetchEvents a subscription keeps in flight
// on its stream: the server serves them one at a time (PROTOCOL.md), so while
// the client hands out one batch the next poll is already waiting on the
// server, and an event published meanwhile goes out at once instead of
// waiting for a new poll to cross the network.
const subscriptionPolls = 2

// poll is a FetchEvents in flight on a subscription's stream.
type poll struct {
	ch <-chan rpcAnswer
	n  int // the credits it holds
	// claimed is set by whichever takes charge of the poll's credits
	// first: handOut, which hands its batch out (and gives back the unused
	// credits), or drop, which gives them all back and moves on.
	claimed *atomic.Bool
}

func (s *Subscription) run(ctx context.Context) {
	defer close(s.done)
	defer close(s.ch)
	defer s.client.acker.removeSub(s)
	defer s.giveBackBuffered(ctx)
	c := s.client
	var (
		cc    *clientConn // the connection of st
		st    *rpcStream  // the subscription's stream: its polls are answered in order
		polls []poll      // in flight on st, oldest first
	)
	// drop ends st and gives back its polls' credits; the server gives back
	// what it leased for them, and batches already received are given back
	// here.
	drop := func() {
		if st == nil {
			return
		}
		if len(polls) == 0 {
			st.finish()
		} else {
			st.abort()
		}
		for _, p := range polls {
			select {
			case a := <-p.ch:
				if a.err == nil {
					// handOut gave back the unused credits.
					s.giveBack(ctx, a.rest)
					continue
				}
			default:
			}
			// A handOut in progress (the application is slow to take
			// the batch) keeps the credits of the deliveries it hands out.
			if p.claimed.CompareAndSwap(false, true) {
				s.release(p.n)
			}
		}
		cc.inflight.Add(-int64(len(polls)))
		polls = polls[:0]
		cc, st = nil, nil
	}
	defer func() {
		s.stopHandOut()
		if st != nil {
			s.abandon(ctx, cc, st, polls)
			st.abort()
		}
	}()
	// failed handles a failed poll: it reports whether the subscription
	// ends, and otherwise waits before the next try if it should.
	failed := func(err error, on *clientConn) bool {
		switch {
		case ctx.Err() != nil:
			s.end(nil)
			return true
		case errors.Is(err, ErrClosed) || isTerminal(err) || errors.Is(err, ErrReconnectFailed):
			s.end(err)
			return true
		case errors.Is(err, ErrFrameTooLarge):
			// An event too large for this client's reader: every poll
			// would lease it again and fail the same way.
			err = fmt.Errorf("h3x: subscription: %w (an event larger than WithMaxFrameSize, %d bytes; the server accepts up to %d)", err, c.cfg.maxFrameSize, c.serverFrame.Load())
			c.logger.Warn("h3x: subscription ended", "err", err)
			s.end(err)
			return true
		case on != nil && c.retryable(ctx, on, err):
			return false // the client is reconnecting; poll on the next connection
		}
		if ctx.Err() != nil {
			s.end(nil)
			return true
		}
		c.logger.Debug("h3x: subscription fetch failed", "err", err)
		if sleepCtx(ctx, 50*time.Millisecond) != nil {
			s.end(nil)
			return true
		}
		return false
	}
	// usable reports whether st may carry a new poll: it is alive and on the
	// client's current connection (after a GoAway or a reconnect, the old
	// stream's polls are finished first, then a new stream is opened).
	usable := func() bool {
		if st == nil {
			return len(polls) == 0
		}
		return (c.current() == cc && st.alive()) || len(polls) == 0
	}
	// issue sends a poll for n credits (which it holds from then on).
	issue := func(n int) error {
		if st == nil || c.current() != cc || !st.alive() {
			drop()
			next, err := c.awaitConn(ctx)
			if err != nil {
				return err
			}
			ns, err := next.openRPC(ctx)
			if err != nil {
				return fmt.Errorf("%w: %w", errStreamFailed, err)
			}
			cc, st = next, ns
		}
		id := c.reqID.Add(1)
		claimed := new(atomic.Bool)
		ch, err := st.start(ctx, id, FrameFetchEvents, &h3xpb.FetchEvents{RequestId: id, Namespaces: s.namespaces, Limit: uint32(n), MaxWaitMs: durationMs(fetchWait(ctx)), MaxBytes: c.fetchMaxBytes()},
			func(a *rpcAnswer) { s.handOut(a, n, claimed) })
		if err != nil {
			return err
		}
		cc.inflight.Add(1)
		polls = append(polls, poll{ch: ch, n: n, claimed: claimed})
		return nil
	}
	// send issues a poll for n credits; it reports whether the subscription
	// ends.
	send := func(n int) bool {
		on := cc
		err := issue(n)
		if err == nil {
			return false
		}
		s.release(n)
		if ctx.Err() != nil && st != nil {
			// Closing (the poll was not sent): the polls in flight are
			// abandoned by the deferred abandon, which reads their
			// batches and gives them back. drop would reset the stream
			// under them, losing a batch the server had already written
			// (its events then stayed leased until their ack deadline).
			s.end(nil)
			return true
		}
		if on == nil {
			on = cc
		}
		drop()
		return failed(err, on)
	}
	for {
		// Issue a poll: wait for a credit when none is in flight, otherwise
		// take one if it is free; then take what else is free, up to a batch.
		canIssue := len(polls) < subscriptionPolls && usable()
		n := 0
		switch {
		case len(polls) == 0:
			select {
			case <-s.credits:
				n = 1
			case <-ctx.Done():
				s.end(nil)
				return
			}
		case canIssue:
			select {
			case <-s.credits:
				n = 1
			default:
			}
		}
		if n > 0 {
			if send(n + s.takeFree(s.opts.BatchSize-1)) {
				return
			}
			continue
		}

		// Wait for the oldest poll's answer (a stream's answers come in
		// order), or for a credit to issue another poll.
		var credits <-chan struct{}
		if canIssue {
			credits = s.credits
		}
		select {
		case a := <-polls[0].ch:
			p := polls[0]
			polls = append(polls[:0], polls[1:]...)
			cc.inflight.Add(-1)
			if a.err != nil {
				s.release(p.n)
				if ctx.Err() != nil && st.alive() {
					s.end(nil) // closing: the deferred abandon ends the other polls
					return
				}
				on := cc
				drop()
				if failed(a.err, on) {
					return
				}
				continue
			}
			// handOut has handed the deliveries out and given back the
			// unused credits.
			if len(a.rest) > 0 {
				s.giveBack(ctx, a.rest)
			}
		case <-credits:
			if send(1 + s.takeFree(s.opts.BatchSize-1)) {
				return
			}
		case <-ctx.Done():
			s.end(nil)
			return
		}
	}
}

// handOut runs in the subscription stream's hand-off goroutine (see
// pendingCall.before) with a poll's answer: it hands the deliveries out in
// order, waiting for the application to take them (that wait is the
// subscription's flow control, as QUIC's is the server's), and gives back
// the poll's unused credits. Handing out there rather than in the
// subscription's goroutine saves a goroutine hand-off on every delivery.
// What it cannot hand out once the subscription ends is left in a.rest, to
// be given back.
func (s *Subscription) handOut(a *rpcAnswer, n int, claimed *atomic.Bool) {
	ds := s.client.own(a.ds, s)
	if !claimed.CompareAndSwap(false, true) {
		// drop has given the poll's credits back and moved on: nobody reads
		// this answer, so hand nothing out and give the deliveries back.
		if len(ds) > 0 {
			s.client.goOwned(func() { s.giveBack(context.Background(), ds) })
		}
		return
	}
	s.release(n - len(ds))
	s.pushMu.Lock()
	defer s.pushMu.Unlock()
	select {
	case <-s.pushStop:
		a.rest = ds // stopped before this batch
		return
	default:
	}
	for i, d := range ds {
		// While the channel has room, two checks that do not block: a
		// select of two cases per delivery (runtime.selectgo) was 2.4% of
		// a consumer's CPU.
		select {
		case <-s.pushStop:
			a.rest = ds[i:]
			return
		default:
		}
		select {
		case s.ch <- d:
			continue
		default:
		}
		select {
		case s.ch <- d:
		case <-s.pushStop:
			a.rest = ds[i:]
			return
		}
	}
}

// abandon ends the polls in flight on st when the subscription ends. It
// resets only the stream's send side: the server then answers the parked
// polls at once and finishes the stream, so batches it had already sent are
// read (handOut leaves them in rest) and given back here instead of staying
// leased until their deadline. It waits at most a second for that (less if
// the connection ends); the caller then resets the stream.
func (s *Subscription) abandon(ctx context.Context, cc *clientConn, st *rpcStream, polls []poll) {
	if len(polls) == 0 {
		return
	}
	st.resetWrite()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	defer cc.inflight.Add(-int64(len(polls)))
wait:
	for _, p := range polls {
		// Credits no longer matter: the subscription is over.
		select {
		case a := <-p.ch:
			if a.err == nil {
				s.giveBack(ctx, a.rest)
			}
		case <-t.C:
			break wait
		case <-cc.qc.Context().Done():
			break wait // the connection is gone: nothing more comes
		}
	}
}

// stopHandOut stops handOut before the channel is closed: a handOut in
// progress returns, later ones hand nothing out.
func (s *Subscription) stopHandOut() {
	close(s.pushStop)
	// Wait for a handOut in progress (later ones see pushStop closed).
	s.pushMu.Lock()
	defer s.pushMu.Unlock()
}

// takeFree takes up to max free credits without waiting and returns how
// many it took.
func (s *Subscription) takeFree(max int) int {
	n := 0
	for n < max {
		select {
		case <-s.credits:
			n++
		default:
			return n
		}
	}
	return n
}

// giveBack nacks prefetched deliveries the application never saw, without
// counting them as attempts.
func (s *Subscription) giveBack(ctx context.Context, ds []*Delivery) {
	if c := s.client; c.current() == nil && !c.goAwayGap.Load() {
		// The connection that leased them is gone: the server ends their
		// leases with it (counting the attempts). Waiting for a next
		// connection that may be long in coming would only hold up Close.
		// After a GoAway the next one comes up at once: the nack waits
		// for it, and undoes the count (LeaseRef.Unseen).
		for _, d := range ds {
			d.settled.Store(true)
		}
		return
	}
	s.client.giveBackUnseen(ctx, ds, "subscription closed")
}

// giveBackUnseen nacks, unseen (their attempts do not count), the
// deliveries of ds not settled yet, waiting at most a second for the answer
// whether or not ctx has ended.
func (c *Client) giveBackUnseen(ctx context.Context, ds []*Delivery, reason string) {
	var unseen []*Delivery
	for _, d := range ds {
		if d.settled.CompareAndSwap(false, true) {
			unseen = append(unseen, d)
		}
	}
	if len(unseen) == 0 {
		return
	}
	nctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	c.settle(nctx, settleGroup{t: FrameNackEvent, reason: reason, unseen: true}, unseen)
}

// giveBackBuffered gives back the deliveries still in the channel's buffer
// when the subscription ends (those a reader takes meanwhile stay its own).
func (s *Subscription) giveBackBuffered(ctx context.Context) {
	var left []*Delivery
	for {
		select {
		case d := <-s.ch:
			left = append(left, d)
			continue
		default:
		}
		break
	}
	s.giveBack(ctx, left)
}

func (s *Subscription) end(err error) {
	if err == nil && s.client.shutting() {
		err = ErrClosed
	}
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
}

// settleOp is one batched ack, nack or extension.
type settleOp struct {
	kind  FrameType
	d     *Delivery
	delay time.Duration
	flush chan error // set for a Flush marker: answered once everything before it is sent
}

// acker batches Delivery.Ack, Nack and Extend into few AckEvent, NackEvent
// and ExtendLease frames: a batch goes out when full, after the flush
// interval, or on Close, while up to ackBatchesInFlight earlier batches
// wait for their answers.
//
// Settlements wait in a queue guarded by mu, from which run takes a batch
// at a time (everything, on the interval, a Flush or Close). add wakes run
// only when the queue needs it (its first settlement, which starts the
// interval; a full batch; a Flush marker): a channel send and a wake-up
// of run for every settlement cost the consumer more than the rest of
// Delivery.Ack.
type acker struct {
	c       *Client
	wake    chan struct{} // (one slot) run has something to look at
	stopped chan struct{}
	// sends is the context of every send: flushAndStop cancels it once its
	// timeout has passed, so that no send outlives Close's bound.
	sends      context.Context
	cancelSend context.CancelFunc

	mu       sync.Mutex
	queue    []settleOp    // not yet taken by run, in the order added
	flushes  int           // Flush markers in queue
	room     chan struct{} // closed when run takes from the queue; made by an add waiting for room
	stopping chan struct{} // closed when flushAndStop starts
	subs     map[*Subscription]struct{}

	lastErr error // the errors of the flushes since flushAndStop started, for Close
}

func newAcker(c *Client) *acker {
	ctx, cancel := context.WithCancel(context.Background())
	return &acker{c: c, wake: make(chan struct{}, 1), stopped: make(chan struct{}), stopping: make(chan struct{}),
		sends: ctx, cancelSend: cancel, subs: make(map[*Subscription]struct{})}
}

// maxQueued is how many settlements add queues before it waits for run to
// take some: run takes a batch when it can send one (when fewer than
// ackBatchesInFlight are unanswered), so at most 4 × size settlements
// queue behind the batches in flight and the one run holds.
func (a *acker) maxQueued() int { return 4 * a.c.cfg.ackFlushSize }

// add queues op for the next batch. It waits while the queue is full (the
// batches before it are being sent), until ctx ends or the acker stops.
func (a *acker) add(ctx context.Context, op settleOp) error {
	a.mu.Lock()
	for {
		if a.isStopping() {
			a.mu.Unlock()
			return ErrClosed
		}
		if len(a.queue) < a.maxQueued() {
			break
		}
		if a.room == nil {
			a.room = make(chan struct{})
		}
		room := a.room
		a.mu.Unlock()
		select {
		case <-room:
		case <-a.stopping:
			return ErrClosed
		case <-ctx.Done():
			return ctx.Err()
		}
		a.mu.Lock()
	}
	a.queue = append(a.queue, op)
	n := len(a.queue)
	if op.flush != nil {
		a.flushes++
	}
	a.mu.Unlock()
	if n == 1 || n == a.c.cfg.ackFlushSize || op.flush != nil {
		a.signal()
	}
	return nil
}

// signal wakes run, unless a wake-up is pending already (run looks at the
// queue after it).
func (a *acker) signal() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// take returns what run should send now: the whole queue if a Flush waits,
// the interval has passed (due) or the acker is stopping; else its first
// batch, if full. It also reports whether settlements are left waiting.
func (a *acker) take(due bool) (ops []settleOp, waiting, stopping bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	stopping = a.isStopping()
	n, size := len(a.queue), a.c.cfg.ackFlushSize
	k := n
	if !due && !stopping && a.flushes == 0 {
		k = min(n-n%size, size) // a batch at a time: room for add as batches go
	}
	if k == 0 {
		return nil, n > 0, stopping
	}
	ops = a.queue[:k:k] // add appends only beyond it
	if a.queue = a.queue[k:]; len(a.queue) == 0 {
		a.queue = nil
	}
	if k == n {
		a.flushes = 0
	}
	if a.room != nil {
		close(a.room)
		a.room = nil
	}
	return ops, len(a.queue) > 0, stopping
}

func (a *acker) addSub(s *Subscription) {
	a.mu.Lock()
	a.subs[s] = struct{}{}
	a.mu.Unlock()
}

func (a *acker) removeSub(s *Subscription) {
	a.mu.Lock()
	delete(a.subs, s)
	a.mu.Unlock()
}

// stopSubscriptions closes every subscription of the client.
func (a *acker) stopSubscriptions() {
	a.mu.Lock()
	subs := make([]*Subscription, 0, len(a.subs))
	for s := range a.subs {
		subs = append(subs, s)
	}
	a.mu.Unlock()
	// At once: each may wait (up to a second or two) for its polls and the
	// give-back of its prefetched deliveries, on a path that may be dead.
	var wg sync.WaitGroup
	for _, s := range subs {
		wg.Go(func() { s.Close() })
	}
	wg.Wait()
}

// isStopping reports whether flushAndStop has started.
func (a *acker) isStopping() bool {
	select {
	case <-a.stopping:
		return true
	default:
		return false
	}
}

// flushAndStop sends what is pending and stops, within timeout: a send in
// progress (waiting for a connection, say) and the final flush together
// take no longer.
func (a *acker) flushAndStop(timeout time.Duration) {
	a.mu.Lock()
	first := !a.isStopping()
	if first {
		close(a.stopping) // nothing is queued after this
	}
	a.mu.Unlock()
	if first {
		stop := time.AfterFunc(timeout, a.cancelSend)
		defer stop.Stop()
		a.signal()
	}
	<-a.stopped
	a.cancelSend()
}

// ackBatchesInFlight bounds the batches of settlements sent and not yet
// answered. One at a time held a consumer to a batch per round trip, and
// each round trip waits for the server's commit (and, with
// DurabilityFsync, its sync): 256 acks per 2–4 ms on a two-core machine,
// below what one subscription consumes. The server may apply batches in
// flight in any order, which changes nothing for settlements (a delivery
// is settled once; an Extend applied after its delivery's Ack or Nack is
// answered unknown or stale): only two Extends of one delivery must keep
// their order, so a batch holding an Extend goes out once every batch
// before it is answered.
const ackBatchesInFlight = 8

func (a *acker) run() {
	defer close(a.stopped)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	armed := false // timer runs: settlements wait for the interval
	var (
		sending    errgroup.Group // the batches in flight; its sends report nil
		errMu      sync.Mutex     // guards the two below, appended to by the sends
		stopErrs   []error        // failed sends once Close waits, which it reports
		sinceFlush []error        // failed sends since the last Flush, which reports them
	)
	sending.SetLimit(ackBatchesInFlight) // Go waits beyond (and add, behind, waits too)
	send := func(batch []settleOp) {
		if len(batch) == 0 {
			return
		}
		if slices.ContainsFunc(batch, func(op settleOp) bool { return op.kind == FrameExtendLease }) {
			sending.Wait() // an earlier Extend of the same delivery is applied first
		}
		sending.Go(func() error {
			// After flushAndStop, its timeout ends every send (a.sends).
			ctx, cancel := context.WithTimeout(a.sends, time.Minute)
			err := a.send(ctx, batch)
			cancel()
			if err == nil {
				return nil
			}
			errMu.Lock()
			defer errMu.Unlock()
			if a.isStopping() { // Close is waiting: it reports this
				stopErrs = append(stopErrs, err)
			}
			if len(sinceFlush) < 8 {
				sinceFlush = append(sinceFlush, err)
			}
			return nil
		})
	}
	due := false
	for {
		ops, waiting, stopping := a.take(due)
		due = false
		if ops != nil {
			if armed {
				timer.Stop()
				armed = false
			}
			// In batches of at most the flush size; a Flush marker is
			// answered once every batch before it is.
			start := 0
			for i, op := range ops {
				switch {
				case op.flush != nil:
					send(ops[start:i])
					start = i + 1
					sending.Wait()
					errMu.Lock()
					op.flush <- errors.Join(sinceFlush...)
					sinceFlush = nil
					errMu.Unlock()
				case i+1-start == a.c.cfg.ackFlushSize:
					send(ops[start : i+1])
					start = i + 1
				}
			}
			send(ops[start:])
			continue // more may have been queued meanwhile
		}
		if stopping {
			sending.Wait()
			a.lastErr = errors.Join(stopErrs...)
			return
		}
		if waiting && !armed {
			timer.Reset(a.c.cfg.ackInterval)
			armed = true
		}
		select {
		case <-a.wake:
		case <-timer.C:
			armed = false
			due = true
		}
	}
}

// settleBatch is the deliveries of a batch settled alike.
type settleBatch struct {
	k  settleGroup
	ds []*Delivery
}

// groupSettlements groups ops by kind and delay, in the order each group
// first appears. A batch is usually all acks: one group, found without a
// map (a map's insert and lookup per delivery were 3% of a consumer's
// CPU); the map is made once a second group appears.
func groupSettlements(ops []settleOp) []settleBatch {
	var groups []settleBatch
	var index map[settleGroup]int
	cur := -1
	for _, op := range ops {
		k := settleGroup{t: op.kind, delay: op.delay}
		if cur < 0 || groups[cur].k != k {
			if index == nil && len(groups) > 0 {
				index = map[settleGroup]int{groups[0].k: 0}
			}
			i, ok := index[k]
			if !ok {
				i = len(groups)
				var ds []*Delivery
				if i == 0 {
					ds = make([]*Delivery, 0, len(ops))
				}
				groups = append(groups, settleBatch{k: k, ds: ds})
				if index != nil {
					index[k] = i
				}
			}
			cur = i
		}
		groups[cur].ds = append(groups[cur].ds, op.d)
	}
	return groups
}

// send groups ops by kind and delay and sends each group, retrying across
// reconnects until ctx ends.
func (a *acker) send(ctx context.Context, ops []settleOp) error {
	var first error
	for _, g := range groupSettlements(ops) {
		k, ds := g.k, g.ds
		res, err := a.c.settle(ctx, k, ds)
		if err != nil {
			a.c.logger.Warn("h3x: settling deliveries failed; they will be delivered again", "frame", k.t, "count", len(ds), "err", err)
			if first == nil {
				first = fmt.Errorf("h3x: sending %d %v settlements: %w", len(ds), k.t, err)
			}
			continue
		}
		for _, r := range res {
			if r.Status != SettleOK {
				a.c.logger.Debug("h3x: settlement not applied", "frame", k.t, "id", r.ID, "status", r.Status)
			}
		}
	}
	return first
}

package h3x

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

func TestChunkOutcomes(t *testing.T) {
	outcomes := make([]*h3xpb.PublishOutcome, 6) // a request of 10 events, the first 4 omitted
	for i := range outcomes {
		outcomes[i] = &h3xpb.PublishOutcome{Id: fmt.Sprint(4 + i)}
	}
	cases := []struct {
		off, k      int
		wantOmitted int
		wantIDs     []string
	}{
		{0, 2, 2, nil},                                     // inside the omitted run
		{2, 2, 2, nil},                                     // ends where the run ends
		{3, 3, 1, []string{"4", "5"}},                      // straddles its end
		{4, 3, 0, []string{"4", "5", "6"}},                 // starts where it ends
		{7, 3, 0, []string{"7", "8", "9"}},                 // the last events
		{0, 10, 4, []string{"4", "5", "6", "7", "8", "9"}}, // the whole request
	}
	for _, tc := range cases {
		omitted, got := chunkOutcomes(4, outcomes, tc.off, tc.k)
		var ids []string
		for _, o := range got {
			ids = append(ids, o.GetId())
		}
		if omitted != tc.wantOmitted || !slices.Equal(ids, tc.wantIDs) {
			t.Errorf("chunkOutcomes(4, 6 outcomes, off %d, k %d) = %d, %v; want %d, %v", tc.off, tc.k, omitted, ids, tc.wantOmitted, tc.wantIDs)
		}
	}
	omitted, got := chunkOutcomes(0, outcomes[:3], 1, 2)
	if omitted != 0 || got[0].GetId() != "5" || len(got) != 2 {
		t.Errorf("nothing omitted: got %d, %v", omitted, got)
	}
}

// gateQueue holds every Enqueue while shut, and counts the calls and the
// event IDs that reach it.
type gateQueue struct {
	Queue
	shut  atomic.Bool
	open  chan struct{}
	calls atomic.Int32
	mu    sync.Mutex
	ids   map[string]int
	reqs  [][]string // the IDs of each Enqueue call
}

func newGateQueue() *gateQueue {
	return &gateQueue{Queue: NewMemoryQueue(QueueOptions{}), open: make(chan struct{}), ids: map[string]int{}}
}

func (q *gateQueue) Enqueue(ctx context.Context, events []Event) ([]PublishResult, error) {
	q.calls.Add(1)
	q.mu.Lock()
	var ids []string
	for _, ev := range events {
		q.ids[ev.ID]++
		ids = append(ids, ev.ID)
	}
	q.reqs = append(q.reqs, ids)
	q.mu.Unlock()
	if q.shut.Load() {
		select {
		case <-q.open:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return q.Queue.Enqueue(ctx, events)
}

// callsWith counts the Enqueue calls with an event whose ID has prefix.
func (q *gateQueue) callsWith(prefix string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, ids := range q.reqs {
		if slices.ContainsFunc(ids, func(id string) bool { return strings.HasPrefix(id, prefix) }) {
			n++
		}
	}
	return n
}

func (q *gateQueue) seen(id string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.ids[id]
}

// waitSends waits until the client has inFlight shared requests unanswered
// and pending events waiting for one.
func waitSends(t *testing.T, c *Client, inFlight, pending int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.sends.mu.Lock()
		n, p := c.sends.inFlight, 0
		for _, b := range c.sends.pending {
			p += len(b.events)
		}
		c.sends.mu.Unlock()
		if n == inFlight && p == pending {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("shared requests: %d in flight, %d events pending; want %d and %d", n, p, inFlight, pending)
		}
		time.Sleep(time.Millisecond)
	}
}

// fillShared starts sharedSendsInFlight single-event publishes that the
// shut queue holds, and returns their results' channel.
func fillShared(t *testing.T, c *Client) <-chan error {
	t.Helper()
	errs := make(chan error, sharedSendsInFlight)
	for i := range sharedSendsInFlight {
		go func() {
			res, err := c.Publish(context.Background(), Event{Namespace: "orders", Type: "first", ID: fmt.Sprintf("first-%d", i)})
			if err == nil && res[0].Status != PublishStored {
				err = fmt.Errorf("first-%d: %+v", i, res[0])
			}
			errs <- err
		}()
	}
	waitSends(t, c, sharedSendsInFlight, 0)
	return errs
}

// filledOver starts a server over queue, whose gate is g, dials it as
// alice, shuts the gate and fills the client's shared requests
// (fillShared).
func filledOver(t *testing.T, queue Queue, g *gateQueue) (*Client, <-chan error) {
	t.Helper()
	s := testServer(t, WithQueue(queue))
	c := mustDial(t, s, "alice", "alice-token")
	g.shut.Store(true)
	return c, fillShared(t, c)
}

// openGate opens g and checks that the publishes fillShared started end
// stored.
func openGate(t *testing.T, g *gateQueue, firsts <-chan error) {
	t.Helper()
	close(g.open)
	for range sharedSendsInFlight {
		if err := <-firsts; err != nil {
			t.Fatal(err)
		}
	}
}

// sharedCaller is a call of a few events and the status each should end
// with.
type sharedCaller struct {
	events []Event
	want   []PublishStatus
}

// check checks that res, the results of call i, are its events' own,
// with the statuses it wants.
func (cl sharedCaller) check(t *testing.T, i int, res []PublishResult) {
	t.Helper()
	if len(res) != len(cl.events) {
		t.Fatalf("call %d: %d results for %d events", i, len(res), len(cl.events))
	}
	for j, r := range res {
		if r.ID != cl.events[j].ID || r.Status != cl.want[j] {
			t.Errorf("call %d, event %d (%s): got %s %v, want %v", i, j, cl.events[j].ID, r.ID, r.Status, cl.want[j])
		}
	}
}

// sharedWithDuplicate starts a server over a gate queue with "dup-0" stored,
// shuts the gate and fills the client's shared requests (fillShared).
func sharedWithDuplicate(t *testing.T) (*gateQueue, *Client, <-chan error) {
	t.Helper()
	q := newGateQueue()
	s := testServer(t, WithQueue(q))
	c := mustDial(t, s, "alice", "alice-token")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Publish(ctx, Event{Namespace: "orders", Type: "early", ID: "dup-0"}); err != nil {
		t.Fatal(err)
	}
	q.shut.Store(true)
	return q, c, fillShared(t, c)
}

// Small publishes made while sharedSendsInFlight requests are unanswered go
// out together in one request, and every caller gets the outcomes of its own
// events: stored, refused for its namespace, or a duplicate, wherever they
// sit in the shared request (PROTOCOL.md §6.2's omitted run included).
func TestSmallPublishesShareRequests(t *testing.T) {
	q, c, firsts := sharedWithDuplicate(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// Callers of one to three events: some stored, some for a namespace
	// alice may not publish to, some with the ID stored above.
	var callers []sharedCaller
	pending := 0
	for i := range 30 {
		cl := sharedCaller{events: []Event{{Namespace: "orders", Type: "t", ID: fmt.Sprintf("ok-%d", i)}}, want: []PublishStatus{PublishStored}}
		if i%4 == 1 {
			cl.events = append(cl.events, Event{Namespace: "billing", Type: "t", ID: fmt.Sprintf("denied-%d", i)})
			cl.want = append(cl.want, PublishRefused)
		}
		if i%7 == 3 {
			cl.events = append(cl.events, Event{Namespace: "orders", Type: "t", ID: "dup-0"})
			cl.want = append(cl.want, PublishDuplicate)
		}
		if i%5 == 2 {
			cl.events = append(cl.events, Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("ok2-%d", i)})
			cl.want = append(cl.want, PublishStored)
		}
		callers = append(callers, cl)
		pending += len(cl.events)
	}
	type answer struct {
		res []PublishResult
		err error
	}
	answers := make([]chan answer, len(callers))
	for i, cl := range callers {
		answers[i] = make(chan answer, 1)
		go func() {
			res, err := c.Publish(ctx, cl.events...)
			answers[i] <- answer{res, err}
		}()
		// One at a time, so that the shared request holds them in order.
		pending := 0
		for _, cl := range callers[:i+1] {
			pending += len(cl.events)
		}
		waitSends(t, c, sharedSendsInFlight, pending)
	}
	openGate(t, q, firsts)
	for i, cl := range callers {
		a := <-answers[i]
		if a.err != nil {
			t.Fatalf("caller %d: %v", i, a.err)
		}
		cl.check(t, i, a.res)
		for j, r := range a.res {
			if r.Status == PublishRefused && !errors.Is(r.Err, ErrPermissionDenied) {
				t.Errorf("caller %d, event %d: refused with %v, want ErrPermissionDenied", i, j, r.Err)
			}
		}
	}
	// The 30 callers' events reached the queue in one request.
	if got := q.callsWith("ok-"); got != 1 {
		t.Errorf("%d Enqueue calls for the callers' events, want 1 (one shared request)", got)
	}
	waitSends(t, c, 0, 0)
}

// A caller whose ctx ends while its chunk waits returns at once; the other
// callers of the shared request are not affected. A pending request whose
// callers have all gone is never sent, and frees its place.
func TestSharedPublishCallerGivesUp(t *testing.T) {
	q := newGateQueue()
	c, firsts := filledOver(t, q, q)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	gone, leave := context.WithCancel(ctx)
	goneErr := make(chan error, 1)
	go func() {
		_, err := c.Publish(gone, Event{Namespace: "orders", Type: "t", ID: "gone-0"})
		goneErr <- err
	}()
	waitSends(t, c, sharedSendsInFlight, 1)
	stays := make(chan error, 1)
	go func() {
		res, err := c.Publish(ctx, Event{Namespace: "orders", Type: "t", ID: "stays-0"})
		if err == nil && res[0].Status != PublishStored {
			err = fmt.Errorf("%+v", res[0])
		}
		stays <- err
	}()
	waitSends(t, c, sharedSendsInFlight, 2)
	leave()
	select {
	case err := <-goneErr:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("the caller that gave up: %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the caller that gave up is still waiting")
	}

	// A second pending request (its only caller gives up) after the first,
	// filled to DefaultMaxEventsPerSend.
	full := make([]Event, 0, DefaultMaxEventsPerSend-2)
	for i := range cap(full) {
		full = append(full, Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("full-%d", i)})
	}
	var fullWG sync.WaitGroup
	for i := 0; i < len(full); i += sharedChunkEvents {
		fullWG.Add(1)
		go func() {
			defer fullWG.Done()
			if _, err := c.Publish(ctx, full[i:min(i+sharedChunkEvents, len(full))]...); err != nil {
				t.Error(err)
			}
		}()
	}
	waitSends(t, c, sharedSendsInFlight, 2+len(full))
	alone, leaveAlone := context.WithCancel(ctx)
	aloneErr := make(chan error, 1)
	go func() {
		_, err := c.Publish(alone, Event{Namespace: "orders", Type: "t", ID: "alone-0"})
		aloneErr <- err
	}()
	waitSends(t, c, sharedSendsInFlight, 3+len(full))
	leaveAlone()
	if err := <-aloneErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("the lone caller that gave up: %v", err)
	}

	openGate(t, q, firsts)
	if err := <-stays; err != nil {
		t.Fatalf("the caller that stayed: %v", err)
	}
	fullWG.Wait()
	waitSends(t, c, 0, 0)
	if n := q.seen("alone-0"); n != 0 {
		t.Errorf("the request nobody waited for reached the queue %d times", n)
	}
	if _, err := c.Publish(ctx, Event{Namespace: "orders", Type: "after"}); err != nil {
		t.Fatalf("publish after: %v", err)
	}
}

// Close ends the calls whose chunks wait for a shared request.
func TestSharedPublishClose(t *testing.T) {
	q := newGateQueue()
	c, firsts := filledOver(t, q, q)
	waiting := make(chan error, 3)
	for i := range 3 {
		go func() {
			_, err := c.Publish(context.Background(), Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("w-%d", i)})
			waiting <- err
		}()
	}
	waitSends(t, c, sharedSendsInFlight, 3)
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	for range 3 {
		select {
		case err := <-waiting:
			if !errors.Is(err, ErrClosed) {
				t.Errorf("a waiting call: %v, want ErrClosed", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a waiting call outlived Close")
		}
	}
	for range sharedSendsInFlight {
		<-firsts
	}
	<-closed
	close(q.open)
}

// PublishAsync calls of a few events wait in a shared request with no
// goroutine of their own, and each gets its own events' outcomes.
func TestPublishAsyncSharesRequests(t *testing.T) {
	q, c, firsts := sharedWithDuplicate(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var calls []*PublishCall
	var callers []sharedCaller
	pending := 0
	for i := range 40 {
		cl := sharedCaller{events: []Event{{Namespace: "orders", Type: "t", ID: fmt.Sprintf("ok-%d", i)}}, want: []PublishStatus{PublishStored}}
		switch i % 5 {
		case 1:
			cl.events = append(cl.events, Event{Namespace: "billing", Type: "t", ID: fmt.Sprintf("denied-%d", i)})
			cl.want = append(cl.want, PublishRefused)
		case 3:
			cl.events = append(cl.events, Event{Namespace: "orders", Type: "t", ID: "dup-0"})
			cl.want = append(cl.want, PublishDuplicate)
		}
		calls = append(calls, c.PublishAsync(ctx, cl.events...))
		callers = append(callers, cl)
		pending += len(cl.events)
	}
	// All of them wait in one shared request, as its parts.
	waitSends(t, c, sharedSendsInFlight, pending)
	c.sends.mu.Lock()
	parts := 0
	for _, b := range c.sends.pending {
		parts += len(b.parts)
	}
	c.sends.mu.Unlock()
	if parts != len(calls) {
		t.Fatalf("%d of %d PublishAsync calls wait as parts of a shared request", parts, len(calls))
	}
	openGate(t, q, firsts)
	for i, call := range calls {
		res, err := call.Result()
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		callers[i].check(t, i, res)
	}
	if got := q.callsWith("ok-"); got != 1 {
		t.Errorf("%d Enqueue calls for the PublishAsync calls, want 1", got)
	}
	waitSends(t, c, 0, 0)
}

// A PublishAsync call in a shared request whose events are refused as
// queue full is published again by a worker, and ends stored; one whose ctx
// ends while it waits ends with the ctx's error at once, and its events
// (Data reused by its caller afterwards) are sent as they were.
func TestPublishAsyncSharedRetryAndGiveUp(t *testing.T) {
	fq := newFlakyQueue(0)
	q := newGateQueue()
	q.Queue = fq
	c, firsts := filledOver(t, q, q)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var calls []*PublishCall
	for i := range 30 {
		calls = append(calls, c.PublishAsync(ctx, Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("r-%d", i)}))
	}
	gone, leave := context.WithCancel(ctx)
	data := []byte("original")
	goneCall := c.PublishAsync(gone, Event{Namespace: "orders", Type: "t", ID: "gone-0", Data: data})
	waitSends(t, c, sharedSendsInFlight, 31)
	leave()
	select {
	case <-goneCall.Done():
		if _, err := goneCall.Result(); !errors.Is(err, context.Canceled) {
			t.Fatalf("the call whose ctx ended: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the call whose ctx ended is not done")
	}
	copy(data, "reused!!")
	openGate(t, q, firsts)
	for i, call := range calls {
		res, err := call.Result()
		if err != nil || res[0].Status != PublishStored {
			t.Fatalf("call %d: %v %+v", i, err, res)
		}
	}
	fq.mu.Lock()
	refused := len(fq.refused)
	for i := range 30 {
		if n := fq.stored[fmt.Sprintf("r-%d", i)]; n != 1 {
			t.Errorf("r-%d stored %d times", i, n)
		}
	}
	fq.mu.Unlock()
	if refused == 0 {
		t.Error("no event was refused as queue full: the retry was not exercised")
	}
	sub, err := c.Subscribe(ctx, []string{"orders"}, SubscribeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case d := <-sub.Events():
			d.Ack()
			if d.Event.ID == "gone-0" {
				if string(d.Event.Data) != "original" {
					t.Fatalf("gone-0 was stored with %q", d.Event.Data)
				}
				return
			}
		case <-deadline:
			t.Fatal("gone-0 not delivered")
		}
	}
}

// Close ends PublishAsync calls waiting in shared requests before it
// returns.
func TestPublishAsyncSharedClose(t *testing.T) {
	q := newGateQueue()
	c, firsts := filledOver(t, q, q)
	var calls []*PublishCall
	for i := range 5 {
		calls = append(calls, c.PublishAsync(context.Background(), Event{Namespace: "orders", Type: "t", ID: fmt.Sprintf("w-%d", i)}))
	}
	waitSends(t, c, sharedSendsInFlight, 5)
	closed := make(chan struct{})
	go func() {
		c.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	for i, call := range calls {
		select {
		case <-call.Done():
		default:
			t.Fatalf("call %d not done when Close returned", i)
		}
		if _, err := call.Result(); !errors.Is(err, ErrClosed) {
			t.Errorf("call %d: %v, want ErrClosed", i, err)
		}
	}
	for range sharedSendsInFlight {
		<-firsts
	}
	close(q.open)
}

package h3x

import (
	"sync"
	"testing"
	"time"

	"github.com/h3x-io/h3x/proto/h3xpb"
)

// settledCounter counts what Settled reports, safely across goroutines.
type settledCounter struct {
	NopHooks
	mu           sync.Mutex
	ok, refused  int
	settledCalls int
}

func (h *settledCounter) Settled(_ FrameType, ok, refused int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.settledCalls++
	h.ok += ok
	h.refused += refused
}

func (h *settledCounter) totals() (calls, ok, refused int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.settledCalls, h.ok, h.refused
}

// sendAck sends one AckEvent on a new stream and returns its AckResult.
func sendAck(t *testing.T, rc *rawConn, m *h3xpb.AckEvent) *h3xpb.AckResult {
	t.Helper()
	st := rc.stream(frameBytes(t, FrameAckEvent, m), true)
	var res h3xpb.AckResult
	if err := newFrameReader(st, DefaultMaxFrameSize).readMessage(FrameAckResult, &res); err != nil {
		t.Fatal(err)
	}
	return &res
}

// TestSettledCountsRequestsAllDenied: Hooks.Settled documents that it
// reports settlements "refused (stale, unknown or denied) by one request".
// A request whose settlements are all denied (namespace not granted) is
// never reported, while the same denial next to one queue-checked ref is.
func TestSettledCountsRequestsAllDenied(t *testing.T) {
	h := &settledCounter{}
	srv := testServer(t, WithHooks(h))
	rc := rawDial(t, srv)
	rc.auth("bob", "bob-token") // bob may consume billing and orders, not audit

	// One denied ref next to one the queue looks at: both counted.
	res := sendAck(t, rc, &h3xpb.AckEvent{RequestId: 1, EventIds: []string{"x", "y"}, Namespaces: []string{"audit", "orders"}})
	if got := res.GetOutcomes()[0].GetStatus(); got != h3xpb.SettleStatus_SETTLE_STATUS_DENIED {
		t.Fatalf("outcome 0 = %v, want DENIED", got)
	}
	// Only denied refs.
	res = sendAck(t, rc, &h3xpb.AckEvent{RequestId: 2, EventIds: []string{"z"}, Namespaces: []string{"audit"}})
	if got := res.GetOutcomes()[0].GetStatus(); got != h3xpb.SettleStatus_SETTLE_STATUS_DENIED {
		t.Fatalf("outcome = %v, want DENIED", got)
	}
	// The server calls the hooks before it writes the AckResult.
	calls, ok, refused := h.totals()
	if calls != 2 || ok != 0 || refused != 3 {
		t.Errorf("Settled reported %d calls, ok %d, refused %d; want 2 calls, ok 0, refused 3 (the all-denied request is not reported)", calls, ok, refused)
	}
}

// authCounter records AuthFailed and ConnectionClosed calls.
type authCounter struct {
	NopHooks
	mu          sync.Mutex
	authFailed  []ErrorCode
	connsOpened int
	connsClosed int
}

func (h *authCounter) ConnectionOpened() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.connsOpened++
}

func (h *authCounter) opened() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.connsOpened
}

func (h *authCounter) AuthFailed(code ErrorCode) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.authFailed = append(h.authFailed, code)
}

func (h *authCounter) ConnectionClosed() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.connsClosed++
}

func (h *authCounter) snapshot() ([]ErrorCode, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]ErrorCode(nil), h.authFailed...), h.connsClosed
}

// TestAuthFailedOnlyForRefusals: Hooks.AuthFailed "reports a refused
// authentication" (h3xprom: h3x_auth_failures_total, "refused
// authentications"). A peer that completes the QUIC handshake and goes away
// without ever sending Auth (a health check, a client that gave up) is
// counted as an "unauthenticated" failure although no credentials were
// presented or refused.
func TestAuthFailedOnlyForRefusals(t *testing.T) {
	h := &authCounter{}
	srv := testServer(t, WithHooks(h))
	rc := rawDial(t, srv)
	// Wait until the server has accepted the connection: closed before
	// that, it never reaches the server's hooks at all.
	for deadline := time.Now().Add(10 * time.Second); h.opened() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the server did not accept the connection within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	rc.close() // no control stream, no Auth
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, closed := h.snapshot(); closed == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the server did not see the connection close within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if failed, _ := h.snapshot(); len(failed) != 0 {
		t.Errorf("AuthFailed called %v for a connection that never sent Auth", failed)
	}
}

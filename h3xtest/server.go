package h3xtest

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
)

// Credentials of the ready test client that NewServer's registry holds. It
// may publish and consume every namespace.
const (
	ClientID = "test"
	Token    = "test-token"
)

// Server is a broker started for one test.
type Server struct {
	*h3x.Server
	t     testing.TB
	queue h3x.Queue
}

// NewServer starts a broker for t on a random loopback port, with an
// in-memory queue and a registry holding the test client (ClientID, Token)
// with every permission on every namespace; opts come after those defaults
// and may replace them (WithQueue, WithRegistry, ...). t.Cleanup stops it.
func NewServer(t testing.TB, opts ...h3x.ServerOption) *Server {
	t.Helper()
	reg, err := h3x.ParseRegistry(ClientID + ":*=" + Token)
	if err != nil {
		t.Fatalf("h3xtest: registry: %v", err)
	}
	q := h3x.NewMemoryQueue(h3x.QueueOptions{})
	all := append([]h3x.ServerOption{
		h3x.WithAddr("127.0.0.1:0"),
		h3x.WithQueue(q),
		h3x.WithRegistry(reg),
	}, opts...)
	srv, err := h3x.NewServer(all...)
	if err != nil {
		q.Close()
		t.Fatalf("h3xtest: NewServer: %v", err)
	}
	if err := srv.Start(context.Background()); err != nil {
		srv.Close()
		t.Fatalf("h3xtest: Start: %v", err)
	}
	s := &Server{Server: srv, t: t, queue: q}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("h3xtest: closing the server: %v", err)
		}
	})
	return s
}

// URL returns the server's address as host:port, for h3x.Dial.
func (s *Server) URL() string { return s.Addr().String() }

// UDPAddr returns the server's UDP address.
func (s *Server) UDPAddr() *net.UDPAddr { return s.Addr().(*net.UDPAddr) }

// ClientOptions returns the options that connect to this server as the
// test client: its credentials and the server's pinned certificate.
func (s *Server) ClientOptions() []h3x.ClientOption {
	return []h3x.ClientOption{
		h3x.WithCredentials(ClientID, Token),
		h3x.WithTrustedFingerprint(s.Fingerprint()),
	}
}

// Dial connects a client to the server (as the test client unless opts say
// otherwise) and closes it in t.Cleanup. It fails the test if it cannot
// connect.
func (s *Server) Dial(t testing.TB, opts ...h3x.ClientOption) *h3x.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := h3x.Dial(ctx, s.URL(), append(s.ClientOptions(), opts...)...)
	if err != nil {
		t.Fatalf("h3xtest: Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

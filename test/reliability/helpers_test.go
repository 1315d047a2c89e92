package reliability

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
)

const (
	clientID  = "rel"
	token     = "rel-token"
	namespace = "rel"
)

// server is an in-process server on a random loopback port.
type server struct {
	*h3x.Server
	fp   string
	addr string
}

func startServer(t testing.TB, opts ...h3x.ServerOption) *server {
	t.Helper()
	reg, err := h3x.ParseRegistry(clientID + ":*=" + token)
	if err != nil {
		t.Fatal(err)
	}
	all := append([]h3x.ServerOption{h3x.WithAddr("127.0.0.1:0"), h3x.WithRegistry(reg)}, opts...)
	srv, err := h3x.NewServer(all...)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(context.Background()); err != nil {
		srv.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return &server{Server: srv, fp: srv.Fingerprint(), addr: srv.Addr().String()}
}

// dial connects a client to addr (the server or a proxy in front of it).
func (s *server) dial(t testing.TB, addr string, opts ...h3x.ClientOption) *h3x.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	all := append([]h3x.ClientOption{h3x.WithCredentials(clientID, token), h3x.WithTrustedFingerprint(s.fp),
		h3x.WithNamespaces(namespace)}, opts...)
	c, err := h3x.Dial(ctx, addr, all...)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// rawTLS is a client TLS configuration for raw QUIC dials.
func rawTLS() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, NextProtos: []string{h3x.ALPN}, MinVersion: tls.VersionTLS13}
}

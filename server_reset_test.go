package h3x

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"
)

// Regression (chaos suite): a server killed and restarted on the same
// address used a new random QUIC stateless reset key, so the clients of the
// dead process could not recognize its stateless resets and hung until their
// idle timeout (30 s by default) before reconnecting. The key is now derived
// from the certificate's private key: the restarted server resets the old
// connections, and clients reconnect at once.
func TestClientDetectsCrashedAndRestartedServer(t *testing.T) {
	cert, err := selfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}}
	start := func(addr string) *Server {
		return testServer(t, WithAddr(addr), WithTLSConfig(tlsConf))
	}
	srv := start("127.0.0.1:0")
	addr := srv.Addr().String()
	proxy := newUDPProxy(t, srv.Addr().(*net.UDPAddr))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, proxy.Addr(), WithCredentials("alice", "alice-token"),
		WithTrustedFingerprint(Fingerprint(cert.Certificate[0])), WithBackoff(fastBackoff))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Publish(ctx, Event{Namespace: "orders"}); err != nil {
		t.Fatal(err)
	}
	// A crash: the client never hears the server's CONNECTION_CLOSE.
	proxy.SetBlackhole(true)
	srv.Close()
	time.Sleep(200 * time.Millisecond) // let the proxy swallow the close
	start(addr)
	proxy.SetBlackhole(false)

	began := time.Now()
	pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
	defer pcancel()
	if _, err := c.Publish(pctx, Event{Namespace: "orders"}); err != nil {
		t.Fatalf("publish after the restart: %v (the client did not notice the restart)", err)
	}
	t.Logf("publish went through %v after the restart", time.Since(began).Round(time.Millisecond))
}

func TestStatelessResetKeyFollowsTheCertificate(t *testing.T) {
	a, _ := selfSignedCert()
	b, _ := selfSignedCert()
	confA := &tls.Config{Certificates: []tls.Certificate{a}}
	if statelessResetKey(confA) != statelessResetKey(confA.Clone()) {
		t.Fatal("the same certificate gave two stateless reset keys")
	}
	if statelessResetKey(confA) == statelessResetKey(&tls.Config{Certificates: []tls.Certificate{b}}) {
		t.Fatal("two certificates gave the same stateless reset key")
	}
	// No static certificate: a random key.
	dyn := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &a, nil }}
	if k1, k2 := statelessResetKey(dyn), statelessResetKey(dyn); k1 == k2 {
		t.Fatal("a dynamic certificate gave a fixed key")
	}
}

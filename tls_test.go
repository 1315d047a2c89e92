package h3x

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCA makes a CA and a leaf certificate for 127.0.0.1 signed by it, and
// writes the leaf's PEM files.
func testCA(t *testing.T) (pool *x509.CertPool, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "h3x test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	keyDER, _ := x509.MarshalECPrivateKey(key)
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
	pool = x509.NewCertPool()
	pool.AddCert(ca)
	return pool, certFile, keyFile
}

func TestRealCertificateWithGivenCA(t *testing.T) {
	pool, certFile, keyFile := testCA(t)
	srv := testServer(t, WithCertFiles(certFile, keyFile))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, srv.Addr().String(), WithCredentials("alice", "alice-token"), WithRootCAs(pool))
	if err != nil {
		t.Fatalf("dial with the CA: %v", err)
	}
	c.Close()
	// Without the CA (system roots only) the certificate is refused.
	if _, err := Dial(ctx, srv.Addr().String(), WithCredentials("alice", "alice-token")); err == nil {
		t.Fatal("a certificate of an unknown CA was accepted")
	}
	// The same with a *tls.Config.
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	srv2 := testServer(t, WithTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}}))
	c2, err := Dial(ctx, srv2.Addr().String(), WithCredentials("alice", "alice-token"), WithTLSConfig(&tls.Config{RootCAs: pool}))
	if err != nil {
		t.Fatalf("dial with a tls.Config: %v", err)
	}
	c2.Close()
}

func TestServerOptionValidation(t *testing.T) {
	_, err := NewServer(WithAddr("no-port"), WithAckDeadline(-1), WithMaxConnections(0),
		WithCertFiles("a.pem", ""), WithMaxFrameSize(10), WithQueue(NewMemoryQueue(QueueOptions{})), WithMaxAttempts(3))
	if err == nil {
		t.Fatal("bad options accepted")
	}
	for _, want := range []string{"WithAddr", "ack deadline", "max connections", "WithCertFiles", "max frame size", "WithMaxAttempts"} {
		if !containsFold(err.Error(), want) {
			t.Errorf("error does not mention %q: %v", want, err)
		}
	}
	if _, err := NewServer(WithCertFiles("/no/such/cert.pem", "/no/such/key.pem"), WithQueue(NewMemoryQueue(QueueOptions{})), WithRegistry(testRegistry(t))); err == nil {
		t.Fatal("missing certificate files accepted")
	}
	t.Setenv("H3X_REGISTRY", "")
	if _, err := NewServer(WithQueue(NewMemoryQueue(QueueOptions{}))); !errors.Is(err, ErrNoRegistry) {
		t.Fatalf("no registry: %v", err)
	}
}

func TestClientOptionValidation(t *testing.T) {
	_, err := Dial(context.Background(), "127.0.0.1:1", WithInsecureSkipVerify(), WithTrustedFingerprint("zz"), WithNamespaces("bad name"))
	if err == nil {
		t.Fatal("bad options accepted")
	}
	for _, want := range []string{"client id", "mutually exclusive", "WithNamespaces"} {
		if !containsFold(err.Error(), want) {
			t.Errorf("error does not mention %q: %v", want, err)
		}
	}
}

func containsFold(s, sub string) bool {
	return strings.Contains(strings.ToLower(s), strings.ToLower(sub))
}

func TestDevCertificateKeptInDataDir(t *testing.T) {
	dir := t.TempDir()
	open := func() string {
		s, err := NewServer(WithDataDir(dir), WithRegistry(testRegistry(t)))
		if err != nil {
			t.Fatal(err)
		}
		fp := s.Fingerprint()
		s.Close()
		return fp
	}
	first := open()
	if second := open(); second != first {
		t.Fatalf("fingerprint changed across restarts: %s then %s", first, second)
	}
	if fi, err := os.Stat(filepath.Join(dir, devKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
}

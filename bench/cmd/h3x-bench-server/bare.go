package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
)

// BareALPN is the ALPN of the bare quic-go server.
const BareALPN = "h3x-bare"

// serveBare serves bare quic-go connections, as the floor under the H3X
// scale figures: the same TLS certificate type and the same quic.Config as
// an H3X server (see NewServer in ../../../server.go; keep them in step),
// and no application goroutine per connection. Each connection's first
// stream is accepted by a short-lived goroutine that reads 8 bytes, echoes
// them and returns, leaving the stream open, as an idle H3X connection
// keeps its control stream open.
func serveBare(addr string) {
	cert, err := selfSigned()
	if err != nil {
		log.Fatal(err)
	}
	udpAddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		log.Fatal(err)
	}
	pc, err := net.ListenUDP("udp", udpAddr)
	if err != nil {
		log.Fatal(err)
	}
	tr := &quic.Transport{Conn: pc}
	idle := 30 * time.Second
	ln, err := tr.Listen(&tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{BareALPN}, MinVersion: tls.VersionTLS13},
		&quic.Config{
			HandshakeIdleTimeout:           5 * time.Second,
			MaxIdleTimeout:                 idle,
			KeepAlivePeriod:                idle / 3,
			MaxIncomingStreams:             100,
			MaxIncomingUniStreams:          -1,
			InitialStreamReceiveWindow:     512 << 10,
			MaxStreamReceiveWindow:         2 << 20,
			InitialConnectionReceiveWindow: 1 << 20,
			MaxConnectionReceiveWindow:     4 << 20,
		})
	if err != nil {
		log.Fatal(err)
	}
	sum := sha256.Sum256(cert.Certificate[0])
	fmt.Printf("fingerprint %s\nlistening %s\n", hex.EncodeToString(sum[:]), ln.Addr())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		for {
			qc, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				st, err := qc.AcceptStream(ctx)
				if err != nil {
					return
				}
				var b [8]byte
				if _, err := io.ReadFull(st, b[:]); err != nil {
					qc.CloseWithError(1, "")
					return
				}
				st.Write(b[:])
			}()
		}
	}()
	<-ctx.Done()
	ln.Close()
	tr.Close()
	pc.Close()
}

func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

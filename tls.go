package h3x

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/quic-go/quic-go"
)

// selfSignedCert makes an in-memory ECDSA P-256 certificate for localhost
// and the loopback addresses, valid for a year.
func selfSignedCert() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "h3x development certificate"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// devCertFile and devKeyFile hold the self-signed development certificate in
// a server's data directory.
const (
	devCertFile = "dev-cert.pem"
	devKeyFile  = "dev-key.pem"
)

// devCertificate loads the development certificate kept in dir, or makes
// one and stores it there (key readable by the owner only).
func devCertificate(dir string) (tls.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, devCertFile), filepath.Join(dir, devKeyFile)
	if cert, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil {
		return cert, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return tls.Certificate{}, fmt.Errorf("loading %s: %w", certPath, err)
	}
	cert, err := selfSignedCert()
	if err != nil {
		return tls.Certificate{}, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return tls.Certificate{}, err
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return tls.Certificate{}, err
	}
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o644); err != nil {
		return tls.Certificate{}, err
	}
	return cert, nil
}

// Fingerprint returns the lower-case hex SHA-256 of a DER certificate: the
// form WithTrustedFingerprint takes.
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// errUntrustedCert is returned when the server's certificate matches no
// pinned fingerprint.
var errUntrustedCert = errors.New("h3x: server certificate does not match the pinned fingerprint")

// pinnedVerifier accepts a server certificate only if its SHA-256 is fp.
func pinnedVerifier(fp string) func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
	want, err := hex.DecodeString(normalizeFingerprint(fp))
	return func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
		if err != nil || len(want) != sha256.Size {
			return fmt.Errorf("h3x: pinned fingerprint %q is not a hex SHA-256", fp)
		}
		if len(rawCerts) == 0 {
			return errUntrustedCert
		}
		sum := sha256.Sum256(rawCerts[0])
		if subtle.ConstantTimeCompare(sum[:], want) != 1 {
			return errUntrustedCert
		}
		return nil
	}
}

// statelessResetKey returns the QUIC stateless reset key. It is derived
// from the private key of the server's (first) certificate, so a server
// restarted with the same certificate — after a crash, on the same address —
// answers packets of its predecessor's connections with stateless resets
// those clients recognize, and they reconnect at once instead of waiting for
// their idle timeout. Servers sharing a certificate share the key, as RFC
// 9000 §10.3.2 expects of a cluster. Without a static certificate the key is
// random.
func statelessResetKey(conf *tls.Config) quic.StatelessResetKey {
	var key quic.StatelessResetKey
	if len(conf.Certificates) > 0 && conf.Certificates[0].PrivateKey != nil {
		if der, err := x509.MarshalPKCS8PrivateKey(conf.Certificates[0].PrivateKey); err == nil {
			mac := hmac.New(sha256.New, der)
			mac.Write([]byte("h3x stateless reset key v1"))
			copy(key[:], mac.Sum(nil))
			return key
		}
	}
	rand.Read(key[:])
	return key
}

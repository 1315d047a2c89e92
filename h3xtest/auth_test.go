package h3xtest_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

// A table test of wrong credentials against one h3xtest server used to get
// slower with each case: the server's slow-down of repeated authentication
// failures was on (10 refused dials took over 11 s; now milliseconds each).
func TestRefusedAuthIsNotSlowedDown(t *testing.T) {
	srv := h3xtest.NewServer(t)
	srv.RefuseAuth(true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	for i := range 10 {
		if _, err := h3x.Dial(ctx, srv.Addr(), srv.ClientOptions()...); !errors.Is(err, h3x.ErrUnauthenticated) {
			t.Fatalf("dial %d: %v, want ErrUnauthenticated", i+1, err)
		}
	}
	// With the slow-down the last five would wait 0.4 + 0.8 + 1.6 + 3.2 + 5 s.
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("10 refused dials took %v: slowed down", d)
	}
}

// The reason for a refused authentication reaches the client: the server
// used to close the connection with only its code's name, which the client
// reported ("unauthenticated: unauthenticated"), while the Error frame's
// message was lost with the connection.
func TestRefusedAuthSaysWhy(t *testing.T) {
	reg, err := h3x.ParseRegistry("reader:orders=r-token")
	if err != nil {
		t.Fatal(err)
	}
	srv := h3xtest.NewServer(t, h3xtest.WithRegistry(reg))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		opts []h3x.ClientOption
		is   error
		want string
	}{
		{"wrong token", []h3x.ClientOption{h3x.WithCredentials("reader", "wrong")}, h3x.ErrUnauthenticated, "invalid client id or token"},
		{"namespace not granted", []h3x.ClientOption{h3x.WithCredentials("reader", "r-token"), h3x.WithNamespaces("audit")}, h3x.ErrPermissionDenied, `"audit"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h3x.Dial(ctx, srv.Addr(), append([]h3x.ClientOption{h3x.WithTrustedFingerprint(srv.Fingerprint())}, tc.opts...)...)
			if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Dial: %v; want %v saying %s", err, tc.is, tc.want)
			}
		})
	}
}

package h3x

import (
	"net"
	"testing"

	"github.com/h3x-io/h3x/internal/faultnet"
)

// newUDPProxy starts a fault-injecting UDP relay to server for the test's
// duration (see internal/faultnet).
func newUDPProxy(t testing.TB, server *net.UDPAddr) *faultnet.Proxy {
	p, err := faultnet.New(server)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

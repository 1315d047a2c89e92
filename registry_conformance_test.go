package h3x_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"testing"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xtest"
)

func TestRegistryConformance(t *testing.T) {
	h3xtest.TestRegistry(t, func(t testing.TB, entries string) h3x.Registry {
		r, err := h3x.ParseRegistry(entries)
		if err != nil {
			t.Fatalf("ParseRegistry: %v", err)
		}
		return r
	})
}

func ExampleParseRegistry() {
	reg, err := h3x.ParseRegistry(`
		# orders-svc publishes orders and reads audit; ops reads everything
		orders-svc:orders/pub=s3cr3t, orders-svc:audit/sub=s3cr3t
		ops:*/sub=sha256:d9310c002af91822beb0b3487d8b04f85bf6bf1f8a5496bff7d35fc7c5a29def
	`)
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()

	grants, err := reg.Authenticate(ctx, "orders-svc", "s3cr3t")
	fmt.Println(grants, err)
	fmt.Println(grants.Allows("orders", h3x.PermPublish), grants.Allows("orders", h3x.PermConsume))

	grants, err = reg.Authenticate(ctx, "ops", "ops-token")
	fmt.Println(grants, err)

	_, err = reg.Authenticate(ctx, "ops", "s3cr3t")
	fmt.Println(errors.Is(err, h3x.ErrUnauthenticated))
	// Output:
	// [orders/pub audit/sub] <nil>
	// true false
	// [*/sub] <nil>
	// true
}

func ExampleParseRegistry_errors() {
	_, err := h3x.ParseRegistry("alice:orders=s3cr3t, bob:orders/read=hunter2\ncarol:=pa55word")
	fmt.Println(err)
	// Output:
	// h3x: registry entry 2 (line 1): unknown permission suffix (want /pub, /sub or /all)
	// h3x: registry entry 3 (line 2): invalid namespace: empty
}

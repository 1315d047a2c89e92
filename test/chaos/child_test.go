package chaos

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/h3x-io/h3x"
)

// Environment of the server child.
const (
	childEnv     = "H3X_CHAOS_CHILD" // set: run as the server child
	childDirEnv  = "H3X_CHAOS_DIR"   // Badger data directory
	childAddrEnv = "H3X_CHAOS_ADDR"  // fixed loopback address
	childCertEnv = "H3X_CHAOS_CERT"  // PEM certificate file
	childKeyEnv  = "H3X_CHAOS_KEY"   // PEM key file
)

const (
	clientID    = "chaos"
	token       = "chaos-token"
	namespace   = "chaos"
	registryDef = clientID + ":" + namespace + "=" + token
)

// runChild is the server child: a real h3x server on a Badger directory,
// listening on the parent's address with the parent's certificate. It prints
// "ready" once listening and serves until its stdin closes (the parent went
// away) or it is killed.
func runChild() int {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	reg, err := h3x.ParseRegistry(registryDef)
	if err != nil {
		fmt.Fprintln(os.Stderr, "registry:", err)
		return 2
	}
	srv, err := h3x.NewServer(
		h3x.WithAddr(os.Getenv(childAddrEnv)),
		h3x.WithDataDir(os.Getenv(childDirEnv)),
		h3x.WithCertFiles(os.Getenv(childCertEnv), os.Getenv(childKeyEnv)),
		h3x.WithRegistry(reg),
		h3x.WithLogger(logger),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "NewServer:", err)
		return 2
	}
	// The port was freed by the killed predecessor; retry briefly in case
	// the kernel has not released it yet.
	for attempt := 0; ; attempt++ {
		err = srv.Start(context.Background())
		if err == nil {
			break
		}
		if attempt >= 50 || !(errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")) {
			fmt.Fprintln(os.Stderr, "Start:", err)
			srv.Close()
			return 2
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	srv.Close()
	return 0
}

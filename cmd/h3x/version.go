package main

import (
	"context"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/h3x-io/h3x"
)

// version is set at build time with -ldflags "-X main.version=v1.2.3";
// otherwise the module version from the build info is used.
var version string

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		v := bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += "+" + s.Value[:12]
			}
		}
		if v != "" {
			return v
		}
	}
	return "(devel)"
}

func runVersion(ctx context.Context, e *cmdEnv, args []string) error {
	fs := newFlagSet(e, "", "Version prints the version of h3x, its wire protocol and its Go toolchain.")
	if err := fs.parse(args); err != nil {
		return err
	}
	if err := fs.noArgs(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(e.stdout, "h3x %s (protocol %s, %s %s/%s)\n", versionString(), h3x.ALPN, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return err
}

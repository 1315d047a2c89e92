//go:build race

package examples_test

// Under go test -race the example programs are built with the race detector
// too, so their runs check the client and server code for races.
func init() { buildFlags = append(buildFlags, "-race") }

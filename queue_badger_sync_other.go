//go:build !linux

package h3x

import "os"

// fdatasync flushes f's data; where fdatasync is not available, with fsync.
func fdatasync(f *os.File) error { return f.Sync() }

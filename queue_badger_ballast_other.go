//go:build !linux

package h3x

import (
	"io"
	"os"
)

// allocate writes zeros to an empty f up to n bytes (the ballast); it does
// not touch a file with data (there is no portable fallocate, so Badger's
// files are not preallocated here).
func allocate(f *os.File, n int64) error {
	fi, err := f.Stat()
	if err != nil || fi.Size() > 0 {
		return err
	}
	zero := make([]byte, 1<<20)
	for n > 0 {
		k := min(n, int64(len(zero)))
		if _, err := f.Write(zero[:k]); err != nil {
			return err
		}
		n -= k
	}
	_, err = f.Seek(0, io.SeekStart)
	return err
}

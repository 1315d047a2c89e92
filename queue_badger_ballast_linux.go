package h3x

import (
	"os"
	"syscall"
)

// allocate allocates the blocks of f's first n bytes (extending f to n
// bytes if it is shorter), so that later writes, through a memory map
// too, need no new blocks.
func allocate(f *os.File, n int64) error {
	for {
		err := syscall.Fallocate(int(f.Fd()), 0, 0, n)
		if err != syscall.EINTR {
			return err
		}
	}
}

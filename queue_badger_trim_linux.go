package h3x

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// fileResident returns the process's file-backed resident memory in bytes
// (RssFile in /proc/self/status).
func fileResident() (int64, bool) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, false
	}
	for line := range bytes.Lines(b) {
		if rest, ok := bytes.CutPrefix(line, []byte("RssFile:")); ok {
			f := strings.Fields(string(rest))
			if len(f) != 2 || f[1] != "kB" {
				return 0, false
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			return kb << 10, err == nil
		}
	}
	return 0, false
}

// trimSupported returns an error if the kernel cannot do MADV_PAGEOUT
// (before Linux 5.4: EINVAL; ENOSYS or EPERM under a seccomp filter).
// madvise checks its advice before its range, and an empty range is
// otherwise a no-op.
func trimSupported() error {
	if _, _, errno := unix.Syscall(unix.SYS_MADVISE, 0, 0, unix.MADV_PAGEOUT); errno != 0 {
		return fmt.Errorf("madvise MADV_PAGEOUT: %w", errno)
	}
	return nil
}

// trimTableMaps asks the kernel to reclaim the resident pages of every
// memory map of a table file (.sst) in dir, as /proc/self/maps lists them,
// and returns the bytes of the maps it covered. MADV_PAGEOUT is safe on any
// address range, even one unmapped (and mapped again for something else)
// since the list was read: it never changes what memory holds, it only moves
// pages out (clean file pages are dropped; they are read again from the file
// when touched). It tries every map; the error is the first that was not
// ENOMEM or EAGAIN (say EINVAL: a range reused for a locked, hugetlb or PFN
// map), or reading the list's.
func trimTableMaps(dir string) (int64, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, err
	}
	type span struct{ start, end uintptr }
	var spans []span
	sc := bufio.NewScanner(f)
	prefix := dir + string(os.PathSeparator)
	for sc.Scan() {
		// start-end perms offset dev inode path
		fields := strings.SplitN(sc.Text(), " ", 6)
		if len(fields) < 6 {
			continue
		}
		path := strings.TrimSpace(fields[5])
		path = strings.TrimSuffix(path, " (deleted)")
		if !strings.HasPrefix(path, prefix) || !strings.HasSuffix(path, ".sst") || strings.Contains(path[len(prefix):], "/") {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		spans = append(spans, span{uintptr(start), uintptr(end)})
	}
	f.Close()
	if err := sc.Err(); err != nil {
		return 0, err
	}
	var n int64
	var first error
	for _, s := range spans {
		_, _, errno := unix.Syscall(unix.SYS_MADVISE, s.start, s.end-s.start, unix.MADV_PAGEOUT)
		switch errno {
		case 0:
			n += int64(s.end - s.start)
		case unix.ENOMEM, unix.EAGAIN:
			// Unmapped since the list was read, or busy: the next round.
		default:
			if first == nil {
				first = fmt.Errorf("madvise MADV_PAGEOUT: %w", errno)
			}
		}
	}
	return n, first
}

//go:build !linux

package h3x

import "errors"

func trimSupported() error { return nil } // fileResident never reports: nothing is trimmed

func fileResident() (int64, bool) { return 0, false }

func trimTableMaps(string) (int64, error) {
	return 0, errors.New("not supported on this system")
}

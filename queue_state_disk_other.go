//go:build !unix

package h3x

import "errors"

// diskFree is not implemented here: the Badger queue then relies on the
// errors of failed writes alone.
func diskFree(string) (uint64, error) { return 0, errors.ErrUnsupported }

// Package reliability tests an H3X server under faults: a lossy network,
// a full disk, connection floods, and a long soak. See RELIABILITY.md.
package reliability

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

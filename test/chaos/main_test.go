package chaos

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain runs the server child when the parent asks for it (see
// runChild), and otherwise the tests, failing if a goroutine outlives them.
func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(runChild())
	}
	goleak.VerifyTestMain(m)
}

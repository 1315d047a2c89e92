package h3x

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// lockedBuffer is a bytes.Buffer safe for a logger's concurrent writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// A connection's log records carry its id and remote address, and their
// source is the line that logged, although the connection keeps no logger
// of its own.
func TestServerConnLogRecords(t *testing.T) {
	var buf lockedBuffer
	logger := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{AddSource: true, Level: slog.LevelDebug}))
	s := testServer(t, WithLogger(logger))
	c := mustDial(t, s, "alice", "alice-token")
	c.Close()
	s.Close() // waits for every connection's goroutines: the log is complete
	var found bool
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var rec struct {
			Msg    string
			Conn   string
			Remote string
			Source struct {
				Function string
				File     string
			}
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec.Msg != "h3x: authenticated" {
			continue
		}
		found = true
		if !strings.HasPrefix(rec.Conn, s.holderID+"-") || rec.Remote == "" {
			t.Errorf("record %s: want conn and remote attributes", line)
		}
		if !strings.HasSuffix(rec.Source.File, "server_conn.go") || !strings.HasSuffix(rec.Source.Function, ".authenticate") {
			t.Errorf("record source = %s in %s, want serverConn.authenticate in server_conn.go", rec.Source.Function, rec.Source.File)
		}
	}
	if !found {
		t.Fatalf("no \"h3x: authenticated\" record in:\n%s", buf.String())
	}
}

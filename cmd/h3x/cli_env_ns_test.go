package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// TestInjectNamespaceFromEnvNamesTheVariable (RELIABILITY.md finding 129): finding 124's fix names
// $H3X_* in a message when the environment set the bad value, but inject
// still blames --ns for a bad $H3X_NAMESPACE (inject.go, both
// ValidateNamespace checks), which the operator did not pass. (tail and
// stats name neither, and quote the namespace twice: `namespace ".bad":
// invalid namespace ".bad": starts with '.'`.)
func TestInjectNamespaceFromEnvNamesTheVariable(t *testing.T) {
	env := map[string]string{"H3X_NAMESPACE": ".bad", "H3X_TOKEN": "t", "H3X_ADDR": "127.0.0.1:1"}
	for _, args := range [][]string{
		{"inject", "--message", "m"},
		{"inject", "--file", "-"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), args, strings.NewReader(""), &stdout, &stderr, func(k string) string { return env[k] })
		if code != 2 {
			t.Errorf("h3x %s with $H3X_NAMESPACE=.bad: exit %d, want 2 (stderr %q)", strings.Join(args, " "), code, stderr.String())
		}
		if !strings.Contains(stderr.String(), "H3X_NAMESPACE") {
			t.Errorf("h3x %s with $H3X_NAMESPACE=.bad: %q does not name $H3X_NAMESPACE, where the bad value came from", strings.Join(args, " "), strings.TrimSpace(stderr.String()))
		}
	}
}

package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/h3x-io/h3x"
)

// TestEnvExample checks that .env.example lists exactly the variables the
// command reads.
func TestEnvExample(t *testing.T) {
	used := map[string]bool{}
	files, _ := filepath.Glob("*.go")
	re := regexp.MustCompile(`"(H3X_[A-Z_]+)"`)
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllStringSubmatch(string(b), -1) {
			used[m[1]] = true
		}
	}
	b, err := os.ReadFile(".env.example")
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^(H3X_[A-Z_]+)=`).FindAllStringSubmatch(string(b), -1) {
		listed[m[1]] = true
	}
	for v := range used {
		if !listed[v] {
			t.Errorf("%s is read but not in .env.example", v)
		}
	}
	for v := range listed {
		if !used[v] {
			t.Errorf("%s is in .env.example but read nowhere", v)
		}
	}
}

func TestFlagEnvPrecedence(t *testing.T) {
	env := map[string]string{"H3X_ADDR": "env:1", "H3X_TOKEN": "env-token", "H3X_NAMESPACE": "a,b"}
	e := &cmdEnv{name: "test", stdout: new(bytes.Buffer), stderr: new(bytes.Buffer), getenv: func(k string) string { return env[k] }}
	var cf clientFlags
	var ns listFlag
	fs := newFlagSet(e, "", "")
	cf.register(fs)
	fs.value(&ns, "ns", "H3X_NAMESPACE", "namespaces")
	if err := fs.parse([]string{"--addr", "flag:2", "--ns", "c"}); err != nil {
		t.Fatal(err)
	}
	if cf.addr != "flag:2" || cf.token != "env-token" || cf.clientID != defaultClientID || !slices.Equal(ns, []string{"c"}) {
		t.Errorf("addr %q token %q client %q ns %v", cf.addr, cf.token, cf.clientID, ns)
	}
	if !fs.cli["addr"] || fs.cli["token"] || !fs.given["token"] {
		t.Errorf("cli %v given %v", fs.cli, fs.given)
	}
}

func TestEventJSONRoundTrip(t *testing.T) {
	events := []h3x.Event{
		{ID: "1", Namespace: "orders", Type: "t", Message: "m", Data: []byte(`{"a":[1,2]}`), Metadata: map[string]string{"k": "v"}, Time: time.Unix(1700000000, 0)},
		{ID: "2", Namespace: "orders", Data: []byte("plain text")},
		{ID: "3", Namespace: "orders", Data: []byte{0xff, 0x00, 0x01}},
		{ID: "4", Namespace: "orders", Data: []byte("42")},
		{ID: "5", Namespace: "orders"},
	}
	for _, ev := range events {
		var buf bytes.Buffer
		if err := jsonEncode(&buf, eventToJSON(&ev, 3)); err != nil {
			t.Fatal(err)
		}
		got, err := parseEventLine(bytes.TrimSpace(buf.Bytes()), "")
		if err != nil {
			t.Fatalf("parsing %s: %v", buf.String(), err)
		}
		if got.ID != ev.ID || got.Namespace != ev.Namespace || got.Type != ev.Type || got.Message != ev.Message ||
			!bytes.Equal(got.Data, ev.Data) || !got.Time.Equal(ev.Time) || len(got.Metadata) != len(ev.Metadata) {
			t.Errorf("round trip of %+v through %s gave %+v", ev, buf.String(), got)
		}
	}
}

func TestParseEventLine(t *testing.T) {
	for _, tc := range []struct {
		line, defaultNS string
		want            string // error substring, or "" for success
		data            string
	}{
		{`{"namespace":"a","data":"x"}`, "", "", "x"},
		{`{"data":{"b": 1}}`, "dflt", "", `{"b":1}`},
		{`{"data_base64":"AAE="}`, "dflt", "", "\x00\x01"},
		{`{"time":1700000000.5}`, "dflt", "", ""},
		{`{"time":"yesterday"}`, "dflt", "not RFC 3339", ""},
		{`{"time":1700000000000}`, "dflt", "out of range", ""}, // milliseconds: year 55,840
		{`{"time":1e300}`, "dflt", "out of range", ""},
		{`{"time":-62135596801}`, "dflt", "out of range", ""},
		{`{}`, "", "no namespace", ""},
		{`{"namespace":"no space"}`, "", "invalid namespace", ""},
		{`{"data":"a","data_base64":"AA=="}`, "d", `both "data" and "data_base64"`, ""},
		{`{"x":1}`, "d", `unknown field "x"`, ""},
		{`{} {}`, "d", "more than one JSON value", ""},
		{`[1]`, "d", "not a JSON event", ""},
	} {
		ev, err := parseEventLine([]byte(tc.line), tc.defaultNS)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.line, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v, want %q", tc.line, err, tc.want)
		case tc.want == "" && string(ev.Data) != tc.data:
			t.Errorf("%s: data %q, want %q", tc.line, ev.Data, tc.data)
		}
	}
}

func TestProgressBar(t *testing.T) {
	got := progressBar(450, 1000, time.Second, 100)
	if !strings.HasPrefix(got, "[") || !strings.Contains(got, " 45%  450/1,000  450 ev/s  ETA 1s") {
		t.Errorf("progressBar = %q", got)
	}
	if got := progressBar(1234567, 0, time.Second, 80); got != "1,234,567 events  1,234,567 ev/s" {
		t.Errorf("progressBar without total = %q", got)
	}
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", -12345: "-12,345"} {
		if got := groupDigits(n); got != want {
			t.Errorf("groupDigits(%d) = %q, want %q", n, got, want)
		}
	}
}

// TestProgressOutPipe checks that a pipe gets plain lines, no bar.
func TestProgressOutPipe(t *testing.T) {
	var buf bytes.Buffer
	p := newProgressOut(&buf, 2)
	p.line("a")
	p.add(1)
	p.line("b")
	p.add(1)
	if err := p.finish(); err != nil {
		t.Fatal(err)
	}
	p.finish() // idempotent
	if buf.String() != "a\nb\n" {
		t.Errorf("got %q", buf.String())
	}
}

func TestRunInProcess(t *testing.T) {
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"version"}, strings.NewReader(""), &out, &errb, func(string) string { return "" })
	if code != 0 || !strings.HasPrefix(out.String(), "h3x ") {
		t.Errorf("version: %d %q %q", code, out.String(), errb.String())
	}
	out.Reset()
	code = run(context.Background(), []string{"help", "nope"}, strings.NewReader(""), &out, &errb, func(string) string { return "" })
	if code != 2 {
		t.Errorf("help nope: %d", code)
	}
}

// TestFlagsAfterArguments: flags may follow positional arguments (Go's
// flag package stops at the first one, so "tail orders --max 1" used to
// follow the namespaces "orders", "--max" and "1"); "--" ends the flags.
func TestFlagsAfterArguments(t *testing.T) {
	for _, tc := range []struct {
		args []string
		pos  []string
		max  int
		ack  bool
		ns   []string
	}{
		{[]string{"orders", "--max", "1"}, []string{"orders"}, 1, true, nil},
		{[]string{"--max", "2", "a", "--ns", "b", "c"}, []string{"a", "c"}, 2, true, []string{"b"}},
		{[]string{"a", "--ack=false", "b", "--max=3"}, []string{"a", "b"}, 3, false, nil},
		{[]string{"a", "--ack", "b"}, []string{"a", "b"}, 0, true, nil},
		{[]string{"--max", "4", "--", "-odd", "--max", "5"}, []string{"-odd", "--max", "5"}, 4, true, nil},
		{[]string{"a", "--", "--"}, []string{"a", "--"}, 0, true, nil},
		{[]string{"--ns", "--", "x"}, []string{"x"}, 0, true, []string{"--"}}, // a value, as for the flag package
		{[]string{"-", "--max", "1"}, []string{"-"}, 1, true, nil},
		{nil, nil, 0, true, nil},
	} {
		e := &cmdEnv{name: "test", stdout: new(bytes.Buffer), stderr: new(bytes.Buffer), getenv: func(string) string { return "" }}
		fs := newFlagSet(e, "", "")
		var maxN int
		var ack bool
		var ns listFlag
		fs.intVar(&maxN, "max", "", 0, "")
		fs.boolVar(&ack, "ack", "", true, "")
		fs.value(&ns, "ns", "", "")
		if err := fs.parse(tc.args); err != nil {
			t.Errorf("%q: %v", tc.args, err)
			continue
		}
		if !slices.Equal(fs.Args(), tc.pos) || fs.NArg() != len(tc.pos) || maxN != tc.max || ack != tc.ack || !slices.Equal(ns, tc.ns) {
			t.Errorf("%q: arguments %q, --max %d, --ack %v, --ns %q; want %q, %d, %v, %q", tc.args, fs.Args(), maxN, ack, ns, tc.pos, tc.max, tc.ack, tc.ns)
		}
	}
}

// TestOneLine: oneLine drops the "h3x: " prefixes of library errors but
// keeps "h3x: " inside a message: it used to drop every one, and cut the
// end of paths named h3x ("open /etc/h3x: no such file" became "open
// /etc/no such file").
func TestOneLine(t *testing.T) {
	for in, want := range map[string]string{
		"h3x: x":      "x",
		"h3x: h3x: x": "x",
		"h3x: authenticating: h3x: unauthenticated: y": "authenticating: unauthenticated: y",
		"malformed registry: h3x: invalid argument: z": "malformed registry: invalid argument: z",
		"open /etc/h3x: no such file or directory":     "open /etc/h3x: no such file or directory",
		"h3x: open /var/lib/h3x: permission denied":    "open /var/lib/h3x: permission denied",
		"mkdir h3x: h3x: denied":                       "mkdir h3x: denied",
		"first\nh3x: second\n":                         "first; second;",
		"a\n\nb":                                       "a; ; b",
		"the h3x: command":                             "the h3x: command",
	} {
		if got := oneLine(errors.New(in)); got != want {
			t.Errorf("oneLine(%q) = %q, want %q", in, got, want)
		}
	}
}

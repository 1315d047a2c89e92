package h3x

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// wantEntry is an expected parsed entry: the plain token whose digest it holds.
type wantEntry struct {
	token string
	grant Grant
}

func checkEntries(t *testing.T, r *StaticRegistry, want map[string][]wantEntry) {
	t.Helper()
	n := 0
	for client, entries := range want {
		got := r.clients[client]
		if len(got) != len(entries) {
			t.Errorf("client %q: %d entries, want %d", client, len(got), len(entries))
			continue
		}
		for i, w := range entries {
			if got[i].grant != w.grant {
				t.Errorf("client %q entry %d: grant %v, want %v", client, i, got[i].grant, w.grant)
			}
			if got[i].digest != sha256.Sum256([]byte(w.token)) {
				t.Errorf("client %q entry %d: digest is not that of token %q", client, i, w.token)
			}
		}
		n += len(entries)
	}
	if len(r.clients) != len(want) || r.entries != n {
		t.Errorf("registry has %d clients and %d entries, want %d and %d", len(r.clients), r.entries, len(want), n)
	}
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func TestParseRegistry(t *testing.T) {
	all := func(ns string) Grant { return Grant{Namespace: ns, Permission: PermAll} }
	tests := []struct {
		name string
		text string
		want map[string][]wantEntry
	}{
		{"empty", "", map[string][]wantEntry{}},
		{"blank", " \n\t\r\n ,;, ", map[string][]wantEntry{}},
		{"comments only", "# a:b=c\n  # d:e=f, g:h=i", map[string][]wantEntry{}},
		{"one entry", "alice:orders=s3cret", map[string][]wantEntry{
			"alice": {{"s3cret", all("orders")}},
		}},
		{"separators", "a:n1=t1,b:n2=t2;c:n3=t3\nd:n4=t4\r\ne:n5=t5", map[string][]wantEntry{
			"a": {{"t1", all("n1")}}, "b": {{"t2", all("n2")}}, "c": {{"t3", all("n3")}},
			"d": {{"t4", all("n4")}}, "e": {{"t5", all("n5")}},
		}},
		{"whitespace around entries and parts", " \talice \t: orders\t=  s3 cret \r\n", map[string][]wantEntry{
			"alice": {{"s3 cret", all("orders")}},
		}},
		{"permission suffixes", "a:n/pub=t, a:n/sub=t, a:n/all=t, a:n=t", map[string][]wantEntry{
			"a": {
				{"t", Grant{Namespace: "n", Permission: PermPublish}},
				{"t", Grant{Namespace: "n", Permission: PermConsume}},
				{"t", Grant{Namespace: "n", Permission: PermAll}},
				{"t", Grant{Namespace: "n", Permission: PermAll}},
			},
		}},
		{"wildcard", "ops:*=t1, ro:*/sub=t2", map[string][]wantEntry{
			"ops": {{"t1", all("*")}},
			"ro":  {{"t2", Grant{Namespace: "*", Permission: PermConsume}}},
		}},
		{"namespace charset", "a:A-Z_a.z-0.9=t, a:x.dlq=t, a:" + strings.Repeat("n", 124) + "=t, a:" + strings.Repeat("n", 124) + ".dlq=t", map[string][]wantEntry{
			"a": {{"t", all("A-Z_a.z-0.9")}, {"t", all("x.dlq")}, {"t", all(strings.Repeat("n", 124))}, {"t", all(strings.Repeat("n", 124) + ".dlq")}},
		}},
		{"token with = and :", "a:n=dG9r:ZW4==", map[string][]wantEntry{
			"a": {{"dG9r:ZW4==", all("n")}},
		}},
		{"token with #", "a:n=#t#", map[string][]wantEntry{
			"a": {{"#t#", all("n")}},
		}},
		{"escapes", "we%3Aird%2C%3b%25:n=%3D%2c%3B%0a%0D%09%20%25%41%e2%9C%93", map[string][]wantEntry{
			"we:ird,;%": {{"=,;\n\r\t %A✓", all("n")}},
		}},
		{"escaped comment marker", "%23a:n=t", map[string][]wantEntry{
			"#a": {{"t", all("n")}},
		}},
		{"escaped blanks", "%20a%20:n=%20t%20", map[string][]wantEntry{
			" a ": {{" t ", all("n")}},
		}},
		{"sha256 tokens", "a:n=sha256:" + sha256Hex("hunter2") + ", b:m/pub=sha256:" + strings.ToUpper(sha256Hex("x")), map[string][]wantEntry{
			"a": {{"hunter2", all("n")}},
			"b": {{"x", Grant{Namespace: "m", Permission: PermPublish}}},
		}},
		{"escaped sha256 prefix is a plain token", "a:n=sha256%3A" + sha256Hex("hunter2"), map[string][]wantEntry{
			"a": {{"sha256:" + sha256Hex("hunter2"), all("n")}},
		}},
		{"several entries per client", "a:n1=t1\na:n2/sub=t2\na:n1=t1\nb:n1=t1", map[string][]wantEntry{
			"a": {{"t1", all("n1")}, {"t2", Grant{Namespace: "n2", Permission: PermConsume}}, {"t1", all("n1")}},
			"b": {{"t1", all("n1")}},
		}},
		{"file layout", "# H3X registry\n\n  # orders\norders-svc:orders/pub=tok1, orders-svc:audit/sub=tok1\r\n\r\nops:*/sub=tok2\n", map[string][]wantEntry{
			"orders-svc": {{"tok1", Grant{Namespace: "orders", Permission: PermPublish}}, {"tok1", Grant{Namespace: "audit", Permission: PermConsume}}},
			"ops":        {{"tok2", Grant{Namespace: "*", Permission: PermConsume}}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseRegistry(tt.text)
			if err != nil {
				t.Fatalf("ParseRegistry: %v", err)
			}
			checkEntries(t, r, tt.want)
		})
	}
}

func TestParseRegistryMalformed(t *testing.T) {
	tests := []struct {
		name    string
		text    string
		want    []string // substrings of the error, in order
		secrets []string // must not appear in the error
	}{
		{"no colon", "aliceS3CRET", []string{"entry 1 (line 1): missing ':'"}, []string{"alice", "S3CRET"}},
		{"no equals", "alice:S3CRET", []string{"entry 1 (line 1): missing '='"}, []string{"S3CRET"}},
		{"empty client id", " :orders=S3CRET", []string{"empty client id"}, []string{"S3CRET"}},
		{"lone percent in client id", "%:orders=S3CRET", []string{"client id: '%' at offset 0"}, []string{"S3CRET"}},
		{"empty namespace", "alice:=S3CRET", []string{"invalid namespace: empty"}, []string{"S3CRET"}},
		{"empty token", "alice:orders=", []string{"empty token"}, nil},
		{"blank token", "alice:orders= \t", []string{"empty token"}, nil},
		{"unknown suffix", "alice:orders/pb=S3CRET", []string{"unknown permission suffix"}, []string{"S3CRET", "pb"}},
		{"empty suffix", "alice:orders/=S3CRET", []string{"unknown permission suffix"}, []string{"S3CRET"}},
		{"uppercase suffix", "alice:orders/PUB=S3CRET", []string{"unknown permission suffix"}, []string{"S3CRET"}},
		{"two suffixes", "alice:orders/pub/sub=S3CRET", []string{"unknown permission suffix"}, []string{"S3CRET"}},
		{"leading dot", "alice:.orders=S3CRET", []string{"invalid namespace: starts with '.'"}, []string{"S3CRET"}},
		{"bad namespace byte", "alice:or ders=S3CRET", []string{"invalid namespace: the byte at offset 2"}, []string{"S3CRET"}},
		{"colon in namespace", "alice:or:ders=S3CRET", []string{"invalid namespace: the byte at offset 2"}, []string{"S3CRET"}},
		{"escape in namespace", "alice:or%41ders=S3CRET", []string{"invalid namespace: the byte at offset 2"}, []string{"S3CRET"}},
		{"long namespace", "alice:" + strings.Repeat("n", 129) + "=S3CRET", []string{"invalid namespace: longer than 128 bytes"}, []string{"S3CRET"}},
		{"wildcard inside a name", "alice:ord*=S3CRET", []string{"invalid namespace: the byte at offset 3"}, []string{"S3CRET"}},
		{"short sha256", "alice:orders=sha256:ABCDEF0123", []string{"exactly 64 hex digits"}, []string{"ABCDEF0123"}},
		{"long sha256", "alice:orders=sha256:" + sha256Hex("S3CRET") + "00", []string{"exactly 64 hex digits"}, []string{sha256Hex("S3CRET")[:8]}},
		{"non-hex sha256", "alice:orders=sha256:" + strings.Repeat("g", 64), []string{"exactly 64 hex digits"}, []string{"gggg"}},
		{"empty sha256", "alice:orders=sha256:", []string{"exactly 64 hex digits"}, nil},
		{"bad escape in client id", "al%2Gice:orders=S3CRET", []string{"client id: '%' at offset 2 is not followed by two hex digits"}, []string{"S3CRET", "al%2G"}},
		{"bad escape at token end", "alice:orders=S3CRET%2", []string{"token: '%' at offset 6"}, []string{"S3CRET"}},
		{"bad escape in token", "alice:orders=S3%zzCRET", []string{"token: '%' at offset 2"}, []string{"S3", "CRET", "zz"}},
		{"token not UTF-8", "alice:orders=S3CRET%FF", []string{"token is not valid UTF-8"}, []string{"S3CRET"}},
		{"raw token not UTF-8", "alice:orders=S3CRET\xff", []string{"token is not valid UTF-8"}, []string{"S3CRET"}},
		{"client id not UTF-8", "%C3%28:orders=S3CRET", []string{"client id is not valid UTF-8"}, []string{"S3CRET"}},
		{"token mistaken for a namespace", "alice:dGhpcyBpcyBh/c2VjcmV0==", []string{"unknown permission suffix"}, []string{"dGhpcyBpcyBh", "c2VjcmV0"}},
		{"token that looks like an entry", "alice:orders", []string{"missing '='"}, []string{"orders"}},
		{"everything wrong at once", " : /x = ", []string{"entry 1 (line 1): empty client id; unknown permission suffix", "; invalid namespace: empty; empty token"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseRegistry(tt.text)
			if err == nil {
				t.Fatalf("ParseRegistry(%q) = %v, want an error", tt.text, r)
			}
			if r != nil {
				t.Errorf("ParseRegistry returned a registry with its error")
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "h3x: registry entry ") {
				t.Errorf("error %q does not start with %q", msg, "h3x: registry entry ")
			}
			rest := msg
			for _, w := range tt.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Errorf("error %q does not contain %q (in order)", msg, w)
					break
				}
				rest = rest[i+len(w):]
			}
			for _, s := range tt.secrets {
				if strings.Contains(msg, s) {
					t.Errorf("error %q contains %q from the entry", msg, s)
				}
			}
			checkReasonsFromVocabulary(t, msg)
		})
	}
}

// TestParseRegistryReportsEveryEntry checks that every malformed entry is
// reported, by entry and line, and that valid ones are not.
func TestParseRegistryReportsEveryEntry(t *testing.T) {
	text := "# header, with:a=comment\n" + // not an entry
		"good:n=TOKEN-A, bad1:n=\n" + // entries 1, 2
		"\n" +
		"bad2:.n=TOKEN-B;good:m=TOKEN-C\n" + // entries 3, 4
		"bad3-TOKEN-D\n" + // entry 5
		"good:*/sub=TOKEN-E, bad4:n/x=TOKEN-F" // entries 6, 7
	_, err := ParseRegistry(text)
	if err == nil {
		t.Fatal("ParseRegistry succeeded, want errors")
	}
	var joined interface{ Unwrap() []error }
	if !errors.As(err, &joined) {
		t.Fatalf("error %v does not join the entries' errors", err)
	}
	var got []string
	for _, e := range joined.Unwrap() {
		var ee *registryEntryError
		if !errors.As(e, &ee) {
			t.Fatalf("joined error %v (%T) is not a *registryEntryError", e, e)
		}
		got = append(got, fmt.Sprintf("%d@%d", ee.entry, ee.line))
	}
	if want := []string{"2@2", "3@4", "5@5", "7@6"}; !slices.Equal(got, want) {
		t.Errorf("reported entry@line %v, want %v\n%v", got, want, err)
	}
	for _, s := range []string{"TOKEN", "bad", "good"} {
		if strings.Contains(err.Error(), s) {
			t.Errorf("error contains %q:\n%v", s, err)
		}
	}
}

var (
	entryErrorRE = regexp.MustCompile(`^h3x: (?:[^\n]*: )?registry entry \d+ \(line \d+\): (.*)$`)
	digitsRE     = regexp.MustCompile(`\d+`)

	// reasonVocabulary is every problem a registry error may state, with
	// numbers as N: errors are built only from these, so they quote nothing
	// from the text.
	reasonVocabulary = func() map[string]bool {
		m := map[string]bool{}
		for _, r := range []string{
			"missing ':' after the client id (want client_id:namespace=token)",
			"missing '=' before the token (want client_id:namespace=token)",
			"client id: '%' at offset 0 is not followed by two hex digits (write %25 for '%')",
			"empty client id",
			"client id is not valid UTF-8",
			"unknown permission suffix (want /pub, /sub or /all)",
			"invalid namespace: empty",
			"invalid namespace: the wildcard * is valid only in registry grants",
			"invalid namespace: longer than 128 bytes",
			"invalid namespace: longer than 124 bytes (room is kept for the \".dlq\" dead-letter suffix)",
			"rate limit must be a positive number of events per second (@rate or @rate:burst)",
			"rate limit burst must be a positive integer (@rate:burst)",
			"invalid namespace: starts with '.'",
			"invalid namespace: the byte at offset 0 is not an ASCII letter, digit, '.', '_' or '-'",
			"a sha256: token must be followed by exactly 64 hex digits",
			"token: '%' at offset 0 is not followed by two hex digits (write %25 for '%')",
			"empty token",
			"token is not valid UTF-8",
		} {
			m[digitsRE.ReplaceAllString(r, "N")] = true
		}
		return m
	}()
)

// checkReasonsFromVocabulary checks that every line of a ParseRegistry error
// is an entry error stating only problems from reasonVocabulary.
func checkReasonsFromVocabulary(t *testing.T, msg string) {
	t.Helper()
	for line := range strings.SplitSeq(msg, "\n") {
		m := entryErrorRE.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("error line %q is not an entry error", line)
			continue
		}
		for reason := range strings.SplitSeq(m[1], "; ") {
			if !reasonVocabulary[digitsRE.ReplaceAllString(reason, "N")] {
				t.Errorf("error line %q states %q, which is not in the vocabulary", line, reason)
			}
		}
	}
}

func TestPermissionString(t *testing.T) {
	for p, want := range map[Permission]string{
		0: "none", PermPublish: "pub", PermConsume: "sub", PermAll: "all", 4: "Permission(4)",
	} {
		if got := p.String(); got != want {
			t.Errorf("Permission(%d).String() = %q, want %q", uint8(p), got, want)
		}
	}
	if got := (Grant{Namespace: "orders", Permission: PermPublish}).String(); got != "orders/pub" {
		t.Errorf("Grant.String() = %q, want orders/pub", got)
	}
}

func TestGrantsAllows(t *testing.T) {
	g := Grants{
		{Namespace: "orders", Permission: PermPublish},
		{Namespace: "orders", Permission: PermConsume},
		{Namespace: "audit", Permission: PermConsume},
		{Namespace: "billing", Permission: PermPublish},
	}
	wild := Grants{{Namespace: "*", Permission: PermConsume}, {Namespace: "billing", Permission: PermPublish}}
	tests := []struct {
		g    Grants
		ns   string
		p    Permission
		want bool
	}{
		{g, "orders", PermPublish, true},
		{g, "orders", PermConsume, true},
		{g, "orders", PermAll, true}, // the union of two grants
		{g, "audit", PermConsume, true},
		{g, "audit", PermPublish, false},
		{g, "audit", PermAll, false},
		{g, "billing", PermPublish, true},
		{g, "billing", PermConsume, false},
		{g, "other", PermPublish, false},
		{g, "Orders", PermPublish, false},
		{g, "*", PermConsume, false},
		{g, "orders", 0, false},
		{g, "orders", 4, false},
		{wild, "anything", PermConsume, true},
		{wild, "anything", PermPublish, false},
		{wild, "billing", PermAll, true}, // wildcard consume + billing publish
		{wild, "anything", 0, false},
		{nil, "orders", PermPublish, false},
		{Grants{{Namespace: "*", Permission: PermAll}}, "x", PermAll, true},
	}
	for _, tt := range tests {
		if got := tt.g.Allows(tt.ns, tt.p); got != tt.want {
			t.Errorf("%v.Allows(%q, %v) = %v, want %v", tt.g, tt.ns, tt.p, got, tt.want)
		}
	}
}

func TestValidateNamespace(t *testing.T) {
	for _, ns := range []string{"a", "orders", "A-Z_a.z-0.9", "orders.dlq", "_x", "-x", "0", strings.Repeat("n", 124), strings.Repeat("n", 124) + ".dlq"} {
		if err := ValidateNamespace(ns); err != nil {
			t.Errorf("ValidateNamespace(%q) = %v, want nil", ns, err)
		}
	}
	for _, ns := range []string{"", "*", ".", ".orders", "a b", "a/b", "a:b", "a*", "ü", "a\x00", " a", strings.Repeat("n", 129)} {
		err := ValidateNamespace(ns)
		if err == nil {
			t.Errorf("ValidateNamespace(%q) = nil, want an error", ns)
			continue
		}
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("ValidateNamespace(%q) = %v, want one matching ErrInvalidArgument", ns, err)
		}
	}
	long := strings.Repeat("x", 1000) + " "
	if err := ValidateNamespace(long); err == nil || len(err.Error()) > 300 {
		t.Errorf("ValidateNamespace(1001 bytes) = %v, want a short error", err)
	}
}

func TestStaticRegistryAuthenticate(t *testing.T) {
	r, err := ParseRegistry("alice:orders=tok-1, alice:audit/sub=tok-1, alice:billing/pub=tok-2, bob:*=sha256:" + sha256Hex("tok-3"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	g, err := r.Authenticate(ctx, "alice", "tok-1")
	if want := (Grants{{Namespace: "orders", Permission: PermAll}, {Namespace: "audit", Permission: PermConsume}}); err != nil || !slices.Equal(g, want) {
		t.Errorf("Authenticate(alice, tok-1) = %v, %v; want %v", g, err, want)
	}
	g, err = r.Authenticate(ctx, "bob", "tok-3")
	if want := (Grants{{Namespace: "*", Permission: PermAll}}); err != nil || !slices.Equal(g, want) {
		t.Errorf("Authenticate(bob, tok-3) = %v, %v; want %v", g, err, want)
	}
	_, wrong := r.Authenticate(ctx, "alice", "tok-3")
	_, unknown := r.Authenticate(ctx, "carol", "tok-1")
	for _, err := range []error{wrong, unknown} {
		var e *Error
		if !errors.As(err, &e) || e.Code != CodeUnauthenticated || e.Remote {
			t.Errorf("bad credentials gave %#v, want a local *Error of CodeUnauthenticated", err)
		}
	}
	if wrong.Error() != unknown.Error() {
		t.Errorf("wrong token gives %q, unknown client %q: want the same", wrong, unknown)
	}

	var zero StaticRegistry
	if g, err := zero.Authenticate(ctx, "", ""); !errors.Is(err, ErrUnauthenticated) {
		t.Errorf("zero StaticRegistry: Authenticate = %v, %v; want ErrUnauthenticated", g, err)
	}
}

// TestStaticRegistryConstantWork checks the shape of the constant-time path:
// every entry of a client is compared whether or not one matches, and an
// unknown client costs one comparison, like a client with one entry.
func TestStaticRegistryConstantWork(t *testing.T) {
	r, err := ParseRegistry("alice:a=first, alice:b=second, alice:c=third, bob:a=bobs")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		client, token    string
		grants, compared int
	}{
		{"alice", "first", 1, 3}, // a match on the first entry does not stop the loop
		{"alice", "third", 1, 3},
		{"alice", "wrong", 0, 3},
		{"alice", "", 0, 3},
		{"bob", "wrong", 0, 1},
		{"carol", "first", 0, 1}, // unknown: the dummy digest
		{"", "", 0, 1},
	}
	for _, tt := range tests {
		g, n := r.match(tt.client, sha256.Sum256([]byte(tt.token)))
		if len(g) != tt.grants || n != tt.compared {
			t.Errorf("match(%q, %q) gave %d grants after %d comparisons, want %d after %d",
				tt.client, tt.token, len(g), n, tt.grants, tt.compared)
		}
	}
	// A token whose digest is the dummy's (all zeros) must not let an unknown client in.
	if g, _ := r.match("carol", [sha256.Size]byte{}); len(g) != 0 {
		t.Errorf("the dummy digest matched for an unknown client: %v", g)
	}

	ctx := context.Background()
	wrong := testing.AllocsPerRun(100, func() { r.Authenticate(ctx, "bob", "wrong") })
	unknown := testing.AllocsPerRun(100, func() { r.Authenticate(ctx, "carol", "wrong") })
	if wrong != unknown {
		t.Errorf("a wrong token allocates %v times, an unknown client %v: want the same work", wrong, unknown)
	}
}

func TestStaticRegistryPrintsNoSecrets(t *testing.T) {
	const token = "very-secret-token"
	r, err := ParseRegistry("alice:orders=" + token + ", bob:*=sha256:" + sha256Hex("other"))
	if err != nil {
		t.Fatal(err)
	}
	secrets := []string{token, sha256Hex(token)[:16], sha256Hex("other")[:16], fmt.Sprintf("%x", sha256.Sum256([]byte(token)))[:16]}
	digest := sha256.Sum256([]byte(token))
	for _, f := range []string{"%v", "%+v", "%#v", "%s", "%x", "%q"} {
		for _, v := range []any{r, *r, []*StaticRegistry{r}, struct{ R StaticRegistry }{*r}} {
			s := fmt.Sprintf(f, v)
			for _, secret := range secrets {
				if strings.Contains(strings.ToLower(s), secret) {
					t.Errorf("Sprintf(%q, %T) = %q shows a token or its digest", f, v, s)
				}
			}
			if strings.Contains(s, fmt.Sprint(digest[0], " ", digest[1], " ", digest[2])) {
				t.Errorf("Sprintf(%q, %T) = %q shows a digest's bytes", f, v, s)
			}
		}
	}
	if got, want := r.String(), "h3x.StaticRegistry(2 clients, 2 entries)"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestLoadRegistryFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "registry")
	text := "\ufeff# H3X registry\r\n\r\n# orders\r\norders-svc:orders/pub=file-token-1, orders-svc:audit/sub=file-token-1\r\nops:*/sub=file-token-2\r\n"
	if err := os.WriteFile(good, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := LoadRegistryFile(good)
	if err != nil {
		t.Fatalf("LoadRegistryFile: %v", err)
	}
	checkEntries(t, r, map[string][]wantEntry{
		"orders-svc": {{"file-token-1", Grant{Namespace: "orders", Permission: PermPublish}}, {"file-token-1", Grant{Namespace: "audit", Permission: PermConsume}}},
		"ops":        {{"file-token-2", Grant{Namespace: "*", Permission: PermConsume}}},
	})

	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(bad, []byte("# comment\nok:n=file-token-3\nbroken:n=\n\nbroken2:.n=file-token-4\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = LoadRegistryFile(bad)
	if err == nil {
		t.Fatal("LoadRegistryFile(bad) succeeded")
	}
	msg := err.Error()
	for _, want := range []string{bad + ": registry entry 2 (line 3): empty token", bad + ": registry entry 3 (line 5): invalid namespace"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not contain %q", msg, want)
		}
	}
	if strings.Contains(msg, "file-token") {
		t.Errorf("error %q contains a token", msg)
	}

	_, err = LoadRegistryFile(filepath.Join(dir, "missing"))
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "missing") {
		t.Errorf("LoadRegistryFile(missing) = %v, want fs.ErrNotExist naming the file", err)
	}
}

func TestRegistryFromEnv(t *testing.T) {
	t.Run("unset", func(t *testing.T) {
		t.Setenv(RegistryEnv, "")
		os.Unsetenv(RegistryEnv)
		if r, err := RegistryFromEnv(); !errors.Is(err, ErrNoRegistry) {
			t.Errorf("RegistryFromEnv() = %v, %v; want ErrNoRegistry", r, err)
		}
	})
	for _, text := range []string{"", "  \n\t", "# nothing here\n", " , ; "} {
		t.Run(fmt.Sprintf("empty %q", text), func(t *testing.T) {
			t.Setenv(RegistryEnv, text)
			if r, err := RegistryFromEnv(); !errors.Is(err, ErrNoRegistry) {
				t.Errorf("RegistryFromEnv() = %v, %v; want ErrNoRegistry", r, err)
			}
		})
	}
	t.Run("valid", func(t *testing.T) {
		t.Setenv(RegistryEnv, "alice:orders=env-token-1;bob:*/sub=env-token-2")
		r, err := RegistryFromEnv()
		if err != nil {
			t.Fatalf("RegistryFromEnv: %v", err)
		}
		checkEntries(t, r, map[string][]wantEntry{
			"alice": {{"env-token-1", Grant{Namespace: "orders", Permission: PermAll}}},
			"bob":   {{"env-token-2", Grant{Namespace: "*", Permission: PermConsume}}},
		})
	})
	t.Run("malformed", func(t *testing.T) {
		t.Setenv(RegistryEnv, "alice:orders=env-token-1,bob:orders/nope=env-token-2")
		_, err := RegistryFromEnv()
		if err == nil || errors.Is(err, ErrNoRegistry) {
			t.Fatalf("RegistryFromEnv() error = %v, want a parse error", err)
		}
		if want := "h3x: H3X_REGISTRY: registry entry 2 (line 1): unknown permission suffix"; !strings.HasPrefix(err.Error(), want) {
			t.Errorf("error %q, want it to start with %q", err, want)
		}
		if strings.Contains(err.Error(), "env-token") {
			t.Errorf("error %q contains a token", err)
		}
	})
}

// escapeRegistryValue percent-escapes every byte of s outside [A-Za-z0-9_-].
func escapeRegistryValue(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if isNamespaceByte(c) && c != '.' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// FuzzRegistryRoundTrip checks that any client id and token can be written
// in the format and authenticate.
func FuzzRegistryRoundTrip(f *testing.F) {
	f.Add("alice", "orders", "s3cret")
	f.Add("we:ird, id", "a.b", "=,;\n %#")
	f.Add("#x", "*", "sha256:abc")
	f.Add("✓", "n", " ")
	f.Fuzz(func(t *testing.T, clientID, ns, token string) {
		if clientID == "" || token == "" || !utf8.ValidString(clientID) || !utf8.ValidString(token) {
			t.Skip()
		}
		if ns != "*" && ValidateNamespace(ns) != nil {
			ns = "n"
		}
		text := escapeRegistryValue(clientID) + ":" + ns + "/sub=" + escapeRegistryValue(token)
		r, err := ParseRegistry(text)
		if err != nil {
			t.Fatalf("ParseRegistry(%q): %v", text, err)
		}
		g, err := r.Authenticate(context.Background(), clientID, token)
		if want := (Grants{{Namespace: ns, Permission: PermConsume}}); err != nil || !slices.Equal(g, want) {
			t.Fatalf("Authenticate after ParseRegistry(%q) = %v, %v; want %v", text, g, err, want)
		}
	})
}

// FuzzParseRegistry checks that no text panics the parser and that its errors
// only ever state problems from the fixed vocabulary, so they can quote no
// token.
func FuzzParseRegistry(f *testing.F) {
	for _, s := range []string{
		"alice:orders=s3cret", "a:n/pub=t, b:*/sub=u; c:x=sha256:" + sha256Hex("t"),
		"# c\n a : n = t \r\n", ":=", "a:b", "abc", "a:%zz=%", "a:.b/x=", "a:n=sha256:00",
		"%FF:n=%C3%28", "\n\n,,;;\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		r, err := ParseRegistry(text)
		if err != nil {
			if r != nil {
				t.Fatal("a registry returned with an error")
			}
			checkReasonsFromVocabulary(t, err.Error())
			return
		}
		if r.String() == "" {
			t.Fatal("empty String")
		}
	})
}

func BenchmarkRegistryAuthenticate(b *testing.B) {
	r, err := ParseRegistry("alice:orders=" + strings.Repeat("t", 32) + ", bob:orders/pub=bobs-token")
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for _, bc := range []struct{ name, client, token string }{
		{"ok", "alice", strings.Repeat("t", 32)},
		{"wrong-token", "alice", strings.Repeat("u", 32)},
		{"unknown-client", "carol", strings.Repeat("t", 32)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				r.Authenticate(ctx, bc.client, bc.token)
			}
		})
	}
}

func TestRegistryRateSuffix(t *testing.T) {
	r, err := ParseRegistry("a:orders/pub@100:200=t, a:audit@7.5=t, a:*/sub=t")
	if err != nil {
		t.Fatal(err)
	}
	g, err := r.Authenticate(context.Background(), "a", "t")
	if err != nil {
		t.Fatal(err)
	}
	want := Grants{
		{Namespace: "orders", Permission: PermPublish, Rate: 100, Burst: 200},
		{Namespace: "audit", Permission: PermAll, Rate: 7.5, Burst: 8},
		{Namespace: "*", Permission: PermConsume},
	}
	if !slices.Equal(g, want) {
		t.Fatalf("grants %v, want %v", g, want)
	}
	if s := want[0].String(); s != "orders/pub@100:200" {
		t.Fatalf("String %q", s)
	}
	for _, bad := range []string{"a:x@=t", "a:x@0=t", "a:x@-1=t", "a:x@1:0=t", "a:x@abc=t", "a:x@1:2.5=t", "a:" + strings.Repeat("n", 125) + "=t"} {
		if _, err := ParseRegistry(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

package h3xtest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/h3x-io/h3x"
)

// RegistryFactory returns a Registry holding exactly the given entries, written in the
// H3X_REGISTRY text format (see h3x.ParseRegistry).
type RegistryFactory func(t testing.TB, entries string) h3x.Registry

// TestRegistry checks that the registries made by newRegistry keep the
// contracts of h3x.Registry for the whole registry text format: the grants
// of the entries whose token matches, as written (permission suffixes, the
// wildcard, several entries per client, sha256: tokens, percent-escapes,
// comments); ErrUnauthenticated, the same for an unknown client as for a
// wrong token and never quoting a token, for every bad credential; returned
// grants the caller owns; and concurrent use (run it with -race).
//
// Grants are compared as sets: a namespace's permissions are the union of
// its grants, so an implementation may merge or reorder them.
//
//	func TestMyRegistry(t *testing.T) {
//		h3xtest.TestRegistry(t, func(t testing.TB, entries string) h3x.Registry {
//			return newMyRegistry(t, entries)
//		})
//	}
func TestRegistry(t *testing.T, newRegistry RegistryFactory) {
	t.Helper()
	rt := registryTester{newRegistry: newRegistry}
	t.Run("Grants", rt.testGrants)
	t.Run("Permissions", rt.testPermissions)
	t.Run("Wildcard", rt.testWildcard)
	t.Run("SeveralEntries", rt.testSeveralEntries)
	t.Run("SHA256Tokens", rt.testSHA256Tokens)
	t.Run("Escapes", rt.testEscapes)
	t.Run("WhitespaceAndComments", rt.testWhitespaceAndComments)
	t.Run("BadCredentials", rt.testBadCredentials)
	t.Run("Empty", rt.testEmpty)
	t.Run("GrantsAreCopies", rt.testGrantsAreCopies)
	t.Run("Concurrent", rt.testConcurrent)
}

type registryTester struct {
	newRegistry RegistryFactory
}

// perms maps a namespace (or "*") to the union of its granted permissions.
type perms map[string]h3x.Permission

func (rt registryTester) registry(t *testing.T, entries string) h3x.Registry {
	t.Helper()
	r := rt.newRegistry(t, entries)
	if r == nil {
		t.Fatal("RegistryFactory returned nil")
	}
	return r
}

// authOK authenticates and checks the grants against want.
func authOK(t *testing.T, r h3x.Registry, clientID, token string, want perms) h3x.Grants {
	t.Helper()
	g, err := r.Authenticate(context.Background(), clientID, token)
	if err != nil {
		t.Errorf("Authenticate(%q, <token>) = %v, want grants %v", clientID, err, want)
		return nil
	}
	got := perms{}
	for _, gr := range g {
		if gr.Permission == 0 || gr.Permission&^h3x.PermAll != 0 {
			t.Errorf("Authenticate(%q, <token>) returned grant %v with permission %d", clientID, gr, gr.Permission)
		}
		got[gr.Namespace] |= gr.Permission
	}
	if !maps.Equal(got, want) {
		t.Errorf("Authenticate(%q, <token>) grants = %v (as a set: %v), want %v", clientID, g, got, want)
	}
	return g
}

// authFail authenticates with bad credentials and checks the refusal. secrets
// are tokens (stored or presented) that must not appear in the error. It
// returns the error's text.
func authFail(t *testing.T, r h3x.Registry, clientID, token string, secrets ...string) string {
	t.Helper()
	g, err := r.Authenticate(context.Background(), clientID, token)
	if err == nil {
		t.Errorf("Authenticate(%q, <token>) = grants %v, want an error matching h3x.ErrUnauthenticated", clientID, g)
		return ""
	}
	if !errors.Is(err, h3x.ErrUnauthenticated) {
		t.Errorf("Authenticate(%q, <token>) error = %v, want one matching h3x.ErrUnauthenticated", clientID, err)
	}
	if len(g) != 0 {
		t.Errorf("Authenticate(%q, <token>) failed but returned grants %v", clientID, g)
	}
	msg := err.Error()
	for _, s := range append(secrets, token) {
		if len(s) >= 4 && strings.Contains(msg, s) {
			t.Errorf("Authenticate(%q, <token>) error %q contains a token", clientID, msg)
		}
	}
	return msg
}

func (rt registryTester) testGrants(t *testing.T) {
	r := rt.registry(t, "alice:orders=alice-secret-4f1c, alice:audit/sub=alice-secret-4f1c\nbob:orders/pub=bob-secret-9d2e")
	g := authOK(t, r, "alice", "alice-secret-4f1c", perms{"orders": h3x.PermAll, "audit": h3x.PermConsume})
	for _, c := range []struct {
		ns   string
		p    h3x.Permission
		want bool
	}{
		{"orders", h3x.PermPublish, true},
		{"orders", h3x.PermAll, true},
		{"audit", h3x.PermConsume, true},
		{"audit", h3x.PermPublish, false},
		{"billing", h3x.PermConsume, false},
	} {
		if got := g.Allows(c.ns, c.p); got != c.want {
			t.Errorf("alice's grants %v: Allows(%q, %v) = %v, want %v", g, c.ns, c.p, got, c.want)
		}
	}
	authOK(t, r, "bob", "bob-secret-9d2e", perms{"orders": h3x.PermPublish})
}

func (rt registryTester) testPermissions(t *testing.T) {
	r := rt.registry(t, strings.Join([]string{
		"p:orders/pub=pub-secret-1a",
		"s:orders/sub=sub-secret-2b",
		"a:orders/all=all-secret-3c",
		"d:orders=default-secret-4d",
	}, ","))
	authOK(t, r, "p", "pub-secret-1a", perms{"orders": h3x.PermPublish})
	authOK(t, r, "s", "sub-secret-2b", perms{"orders": h3x.PermConsume})
	authOK(t, r, "a", "all-secret-3c", perms{"orders": h3x.PermAll})
	authOK(t, r, "d", "default-secret-4d", perms{"orders": h3x.PermAll})
}

func (rt registryTester) testWildcard(t *testing.T) {
	r := rt.registry(t, "ops:*/sub=ops-secret-77aa;root:*=root-secret-88bb")
	g := authOK(t, r, "ops", "ops-secret-77aa", perms{"*": h3x.PermConsume})
	if !g.Allows("any.namespace", h3x.PermConsume) || g.Allows("any.namespace", h3x.PermPublish) {
		t.Errorf("ops's grants %v: want consume and not publish on any namespace", g)
	}
	g = authOK(t, r, "root", "root-secret-88bb", perms{"*": h3x.PermAll})
	if !g.Allows("orders", h3x.PermAll) {
		t.Errorf("root's grants %v: want everything on orders", g)
	}
}

func (rt registryTester) testSeveralEntries(t *testing.T) {
	r := rt.registry(t, strings.Join([]string{
		"erin:a=erin-first-5e5e",
		"erin:b/pub=erin-second-6f6f",
		"erin:c/sub=erin-first-5e5e",
		"erin:c/pub=erin-first-5e5e",
		"frank:a/sub=erin-second-6f6f",
	}, "\n"))
	authOK(t, r, "erin", "erin-first-5e5e", perms{"a": h3x.PermAll, "c": h3x.PermAll})
	authOK(t, r, "erin", "erin-second-6f6f", perms{"b": h3x.PermPublish})
	authOK(t, r, "frank", "erin-second-6f6f", perms{"a": h3x.PermConsume})
	authFail(t, r, "frank", "erin-first-5e5e", "erin-first-5e5e", "erin-second-6f6f")
}

func (rt registryTester) testSHA256Tokens(t *testing.T) {
	const plain = "dave-plain-secret-0b0b"
	sum := sha256.Sum256([]byte(plain))
	lower := hex.EncodeToString(sum[:])
	upper := strings.ToUpper(lower)
	r := rt.registry(t, fmt.Sprintf("dave:metrics=sha256:%s, eve:logs/pub=sha256:%s", lower, upper))
	authOK(t, r, "dave", plain, perms{"metrics": h3x.PermAll})
	authOK(t, r, "eve", plain, perms{"logs": h3x.PermPublish})
	for _, wrong := range []string{lower, upper, "sha256:" + lower, plain + " "} {
		authFail(t, r, "dave", wrong, plain, lower)
	}
}

func (rt registryTester) testEscapes(t *testing.T) {
	r := rt.registry(t, strings.Join([]string{
		"we%3Aird%2Cid%25:ns1=p%3Ds%2Cs%3B%25%20x", // client "we:ird,id%", token "p=s,s;% x"
		"%23hash%20:ns2=%20padded%0Anewline%20",    // client "#hash ", token " padded\nnewline "
		"plain:ns3=a=b:c==",                        // '=' and ':' need no escape in a token
		"lit:ns4=sha256%3Anot-a-digest",            // a plain token that starts with "sha256:"
		"utf8:ns5=%E2%9C%93-%e2%9c%93",             // "✓-✓", hex of either case
	}, "\n"))
	authOK(t, r, "we:ird,id%", "p=s,s;% x", perms{"ns1": h3x.PermAll})
	authOK(t, r, "#hash ", " padded\nnewline ", perms{"ns2": h3x.PermAll})
	authOK(t, r, "plain", "a=b:c==", perms{"ns3": h3x.PermAll})
	authOK(t, r, "lit", "sha256:not-a-digest", perms{"ns4": h3x.PermAll})
	authOK(t, r, "utf8", "✓-✓", perms{"ns5": h3x.PermAll})

	authFail(t, r, "we%3Aird%2Cid%25", "p=s,s;% x")
	authFail(t, r, "we:ird,id%", "p%3Ds%2Cs%3B%25%20x")
	authFail(t, r, "#hash ", "padded\nnewline")
}

func (rt registryTester) testWhitespaceAndComments(t *testing.T) {
	// A comment is a whole line, commas included; '#' inside an entry is
	// an ordinary character.
	r := rt.registry(t, "# gina:ignored=comment-secret-1111, hal:ignored=comment-secret-1111\n"+
		"  gina : ns1 = gina-secret-2222  ;  gina:ns2/sub=gina-secret-2222 ,\r\n"+
		"\t# another comment\n"+
		"\n,;\n"+
		"hal:ns3=x#y\n")
	authOK(t, r, "gina", "gina-secret-2222", perms{"ns1": h3x.PermAll, "ns2": h3x.PermConsume})
	authOK(t, r, "hal", "x#y", perms{"ns3": h3x.PermAll})
	authFail(t, r, "gina", "comment-secret-1111")
	authFail(t, r, "hal", "comment-secret-1111")
	authFail(t, r, "gina", " gina-secret-2222")
}

func (rt registryTester) testBadCredentials(t *testing.T) {
	const aliceTok, bobTok = "alice-secret-4f1c", "bob-secret-9d2e"
	r := rt.registry(t, "alice:orders="+aliceTok+", bob:billing/pub="+bobTok)
	secrets := []string{aliceTok, bobTok}
	cases := []struct{ name, clientID, token string }{
		{"wrong token", "alice", "not-the-secret-1234"},
		{"another client's token", "alice", bobTok},
		{"unknown client with a valid token", "carol", aliceTok},
		{"unknown client", "carol", "carol-secret-5678"},
		{"empty token", "alice", ""},
		{"empty client id", "", aliceTok},
		{"both empty", "", ""},
		{"token prefix", "alice", aliceTok[:len(aliceTok)-1]},
		{"token with a suffix", "alice", aliceTok + "x"},
		{"token with a NUL", "alice", aliceTok + "\x00"},
		{"token with spaces", "alice", " " + aliceTok + " "},
		{"token in another case", "alice", strings.ToUpper(aliceTok)},
		{"client id in another case", "Alice", aliceTok},
		{"client id with spaces", " alice", aliceTok},
		{"the stored digest", "alice", hexSHA256(aliceTok)},
	}
	msgs := map[string]string{}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			msgs[c.name] = authFail(t, r, c.clientID, c.token, secrets...)
		})
	}
	if a, b := msgs["wrong token"], msgs["unknown client"]; a != b {
		t.Errorf("errors tell an unknown client (%q) from a wrong token (%q)", b, a)
	}
}

func (rt registryTester) testEmpty(t *testing.T) {
	for _, text := range []string{"", "\n# only a comment\n"} {
		r := rt.registry(t, text)
		authFail(t, r, "alice", "alice-secret-4f1c")
		authFail(t, r, "", "")
	}
}

func (rt registryTester) testGrantsAreCopies(t *testing.T) {
	r := rt.registry(t, "alice:orders/sub=alice-secret-4f1c")
	g := authOK(t, r, "alice", "alice-secret-4f1c", perms{"orders": h3x.PermConsume})
	for i := range g {
		g[i] = h3x.Grant{Namespace: "*", Permission: h3x.PermAll}
	}
	_ = append(g, h3x.Grant{Namespace: "*", Permission: h3x.PermAll})
	authOK(t, r, "alice", "alice-secret-4f1c", perms{"orders": h3x.PermConsume})
}

func (rt registryTester) testConcurrent(t *testing.T) {
	const clients, workers, rounds = 4, 8, 200
	var entries []string
	for i := range clients {
		entries = append(entries, fmt.Sprintf("c%d:ns%d/pub=secret-%d-abcd", i, i, i))
	}
	r := rt.registry(t, strings.Join(entries, ","))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range rounds {
				c := (w + i) % clients
				id, tok := fmt.Sprintf("c%d", c), fmt.Sprintf("secret-%d-abcd", c)
				if i%3 == 0 {
					tok = fmt.Sprintf("secret-%d-abcd", (c+1)%clients) // another client's token
				}
				g, err := r.Authenticate(context.Background(), id, tok)
				switch {
				case i%3 == 0 && !errors.Is(err, h3x.ErrUnauthenticated):
					t.Errorf("Authenticate(%q, <wrong token>) = %v, %v; want ErrUnauthenticated", id, g, err)
				case i%3 != 0 && (err != nil || !slices.Equal(g, h3x.Grants{{Namespace: fmt.Sprintf("ns%d", c), Permission: h3x.PermPublish}})):
					t.Errorf("Authenticate(%q, <token>) = %v, %v; want [ns%d/pub]", id, g, err, c)
				}
			}
		})
	}
	wg.Wait()
}

func hexSHA256(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

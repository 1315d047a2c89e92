package h3x

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Registry authenticates clients and says what they may do.
//
// The conformance suite h3xtest.TestRegistry checks every contract below.
type Registry interface {
	// Authenticate checks clientID's token and returns its grants. Bad
	// credentials (unknown client or wrong token) give an error matching
	// ErrUnauthenticated that does not say which part was wrong; no error
	// contains a token. Other failures, such as an unreachable backend, give
	// errors that do not match ErrUnauthenticated. Success returns at least
	// one grant, in a slice the caller may modify. Safe for concurrent use.
	Authenticate(ctx context.Context, clientID, token string) (Grants, error)
}

// ErrNoRegistry is returned by RegistryFromEnv when H3X_REGISTRY is unset or
// holds no entries.
var ErrNoRegistry = errors.New("h3x: no registry: H3X_REGISTRY is unset or empty")

// RegistryEnv is the environment variable RegistryFromEnv reads.
const RegistryEnv = "H3X_REGISTRY"

// MaxNamespaceLength is the longest namespace name, in bytes. A name that
// does not end in DeadLetterSuffix may be at most 4 bytes shorter, so that
// its dead-letter namespace fits too.
const MaxNamespaceLength = 128

// Permission is a set of rights on a namespace.
type Permission uint8

// Permissions.
const (
	// PermPublish allows publishing events (registry suffix /pub).
	PermPublish Permission = 1 << iota
	// PermConsume allows fetching, acking, nacking and extending leases
	// (registry suffix /sub).
	PermConsume
	// PermAll is both (registry suffix /all, the default).
	PermAll = PermPublish | PermConsume
)

// String returns the permission's registry suffix: "pub", "sub" or "all";
// "none" for 0.
func (p Permission) String() string {
	switch p {
	case 0:
		return "none"
	case PermPublish:
		return "pub"
	case PermConsume:
		return "sub"
	case PermAll:
		return "all"
	}
	return "Permission(" + strconv.Itoa(int(p)) + ")"
}

// Grant gives a Permission on a namespace.
type Grant struct {
	Namespace  string     // a namespace, or "*" for all
	Permission Permission // what the client may do there
	// Rate limits this client's publishing to the namespace, in events per
	// second (registry suffix @rate or @rate:burst); 0 means no limit of
	// its own (server-wide limits still apply). With "*", every namespace
	// gets its own bucket of this rate. At most MaxRate. A client's tokens
	// that grant the same limit share its buckets; tokens granting
	// different limits each get their own.
	Rate float64
	// Burst is the bucket size: how many events may be published at once.
	// Default: Rate rounded up (one second's worth), at least 1.
	Burst int
}

// String returns the grant as the namespace part of a registry entry, such as
// "orders/pub" or "*/all".
func (g Grant) String() string {
	s := g.Namespace + "/" + g.Permission.String()
	if g.Rate > 0 {
		s += "@" + strconv.FormatFloat(g.Rate, 'g', -1, 64) + ":" + strconv.Itoa(g.Burst)
	}
	return s
}

// Grants are what an authenticated client may do.
type Grants []Grant

// Allows reports whether the grants together give every permission in p on
// namespace: the union of the grants naming namespace and those naming "*"
// must hold all of p's bits. A p of 0 is never allowed. Allows compares names
// exactly and does not validate namespace; check it with ValidateNamespace
// first.
func (g Grants) Allows(namespace string, p Permission) bool {
	if p == 0 {
		return false
	}
	var have Permission
	for _, gr := range g {
		if gr.Namespace == namespace || gr.Namespace == "*" {
			have |= gr.Permission
		}
	}
	return have&p == p
}

// ValidateNamespace reports whether ns may name a namespace in events and
// requests: 1 to 124 bytes, or up to 128 (MaxNamespaceLength) for a name
// ending in ".dlq", each an ASCII letter, a
// digit, '.', '_' or '-', not starting with '.'. The wildcard "*" is valid
// only in registry grants. The error is an *Error of CodeInvalidArgument.
func ValidateNamespace(ns string) error {
	if reason := namespaceProblem(ns); reason != "" {
		shown := ns
		if len(shown) > 64 {
			shown = shown[:64] + "..."
		}
		return newError(CodeInvalidArgument, "invalid namespace %q: %s", shown, reason)
	}
	return nil
}

// namespaceProblem says what is wrong with ns as a namespace name, or returns
// "". The reason never quotes ns, so it is safe for registry errors.
func namespaceProblem(ns string) string {
	switch {
	case ns == "":
		return "empty"
	case ns == "*":
		return "the wildcard * is valid only in registry grants"
	case len(ns) > MaxNamespaceLength:
		return fmt.Sprintf("longer than %d bytes", MaxNamespaceLength)
	case len(ns) > MaxNamespaceLength-len(DeadLetterSuffix) && !strings.HasSuffix(ns, DeadLetterSuffix):
		return fmt.Sprintf("longer than %d bytes (room is kept for the %q dead-letter suffix)", MaxNamespaceLength-len(DeadLetterSuffix), DeadLetterSuffix)
	case ns[0] == '.':
		return "starts with '.'"
	}
	for i := 0; i < len(ns); i++ {
		if !isNamespaceByte(ns[i]) {
			return fmt.Sprintf("the byte at offset %d is not an ASCII letter, digit, '.', '_' or '-'", i)
		}
	}
	return ""
}

func isNamespaceByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '.' || c == '_' || c == '-'
}

// StaticRegistry is an in-memory Registry made from the registry text format
// (see ParseRegistry). It keeps only SHA-256 digests of tokens, compares them
// in constant time, and never prints them. It is immutable and safe for
// concurrent use. The zero StaticRegistry holds no entries and authenticates
// no one.
type StaticRegistry struct {
	clients map[string][]registryEntry
	entries int
}

var _ Registry = (*StaticRegistry)(nil)

// registryEntry is one parsed entry: the digest of its token and its grant.
type registryEntry struct {
	digest [sha256.Size]byte
	grant  Grant
}

// dummyEntries stand in for the entries of an unknown client, so that it
// costs the same digest comparison as a known client's wrong token. No token
// has an all-zero SHA-256 that anyone can find, and a match would grant
// nothing anyway: Authenticate refuses unknown clients regardless.
var dummyEntries = []registryEntry{{}}

// Authenticate implements Registry. It hashes token with SHA-256 and compares
// the digest with every entry of clientID, without stopping at a match; an
// unknown client is compared against a dummy digest. ctx is not used.
func (r *StaticRegistry) Authenticate(_ context.Context, clientID, token string) (Grants, error) {
	grants, _ := r.match(clientID, sha256.Sum256([]byte(token)))
	if len(grants) == 0 || token == "" {
		return nil, errBadCredentials()
	}
	return grants, nil
}

// match returns the grants of clientID's entries whose digest equals digest,
// and how many digests it compared (for tests of the constant-work path).
func (r *StaticRegistry) match(clientID string, digest [sha256.Size]byte) (grants Grants, compared int) {
	entries, known := r.clients[clientID]
	if !known {
		entries = dummyEntries
	}
	for i := range entries {
		compared++
		if subtle.ConstantTimeCompare(digest[:], entries[i].digest[:]) == 1 && known {
			grants = append(grants, entries[i].grant)
		}
	}
	return grants, compared
}

// errBadCredentials is the one error for every authentication failure, so
// that it does not tell an unknown client from a wrong token.
func errBadCredentials() error {
	return &Error{Code: CodeUnauthenticated, Message: "unknown client or wrong token"}
}

// String describes the registry by size only; it never shows tokens or
// their digests. (Value receivers, so that a StaticRegistry printed by value,
// such as a field of a printed struct, shows no digests either.)
func (r StaticRegistry) String() string {
	return fmt.Sprintf("h3x.StaticRegistry(%d clients, %d entries)", len(r.clients), r.entries)
}

// Len returns the number of entries in the registry.
func (r *StaticRegistry) Len() int { return r.entries }

// GoString is String, so that %#v shows no digests either.
func (r StaticRegistry) GoString() string { return r.String() }

// ParseRegistry parses a registry written in the registry text format, the
// format of H3X_REGISTRY and of registry files:
//
//	# orders-svc publishes orders and reads audit; ops reads everything
//	orders-svc:orders/pub=s3cr3t, orders-svc:audit/sub=s3cr3t
//	ops:*/sub=sha256:d9310c002af91822beb0b3487d8b04f85bf6bf1f8a5496bff7d35fc7c5a29def
//
// (ops's token is stored as its SHA-256; ops presents "ops-token".)
//
// The text is a list of entries separated by ',', ';' or newlines. Spaces,
// tabs and carriage returns around an entry and around each of its three
// parts are ignored, and empty entries are skipped. A line whose first
// non-blank character is '#' is a comment; '#' elsewhere is an ordinary
// character.
//
// An entry is client_id:namespace=token (the original H3X's
// client:{namespace}={token}):
//
//   - The client id is everything before the first ':'.
//   - The namespace part runs from there to the first '='. It is a namespace
//     name (see ValidateNamespace) or "*" for every namespace, optionally
//     followed by a permission suffix: "/pub" (publish only), "/sub" (consume
//     only) or "/all" (both; the default), and optionally by a publish rate
//     limit "@rate" or "@rate:burst" in events per second, such as
//     "orders/pub@500:1000" (see Grant.Rate).
//   - The token is the rest of the entry. It may contain '=' and ':'.
//
// Client ids and tokens are percent-decoded: %XX, with two hex digits of
// either case, stands for the byte 0xXX, so any byte can be written; "%2C"
// for ',', "%3B" for ';', "%0A" for a newline, "%3A" for ':', "%3D" for '=',
// "%20" for a leading or trailing space, "%23" for a client id's leading '#',
// "%25" for '%'. A '%' not followed by two hex digits is an error. After
// decoding, both must be non-empty and valid UTF-8 (the wire protocol carries
// them as protobuf strings).
//
// A token written "sha256:" followed by 64 hex digits (either case) is stored
// as that SHA-256 digest: the client presents the token whose SHA-256 it is.
// The prefix is recognized before percent-decoding, so a plain token that
// starts with "sha256:" is written "sha256%3A...".
//
// A client may have several entries, with the same token or different ones.
// Authenticating with a token yields the grants of all of that client's
// entries whose token matches it, in the order written.
//
// ParseRegistry reports every malformed entry, joined with errors.Join, each
// by its position: "h3x: registry entry 3 (line 2): empty token", counting
// non-empty entries from 1. The errors never contain an entry's text, so no
// token leaks into logs. A text with no entries gives an empty registry that
// authenticates no one.
func ParseRegistry(text string) (*StaticRegistry, error) {
	return parseRegistry(text, "")
}

// LoadRegistryFile reads a registry file in the format of ParseRegistry.
// Errors name the file. A leading UTF-8 byte order mark is ignored.
func LoadRegistryFile(path string) (*StaticRegistry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("h3x: registry file: %w", err)
	}
	return parseRegistry(strings.TrimPrefix(string(b), "\ufeff"), path)
}

// RegistryFromEnv parses the registry in the H3X_REGISTRY environment
// variable (format: see ParseRegistry). When the variable is unset or holds
// no entries, the error matches ErrNoRegistry.
func RegistryFromEnv() (*StaticRegistry, error) {
	text := os.Getenv(RegistryEnv)
	if strings.TrimSpace(text) == "" {
		return nil, ErrNoRegistry
	}
	r, err := parseRegistry(text, RegistryEnv)
	if err != nil {
		return nil, err
	}
	if r.entries == 0 {
		return nil, ErrNoRegistry
	}
	return r, nil
}

// registryEntryError reports one malformed entry by position, never by its
// text.
type registryEntryError struct {
	source string // the file name or "H3X_REGISTRY"; empty for ParseRegistry
	entry  int    // counted from 1 over non-empty entries
	line   int    // counted from 1
	reason string
}

func (e *registryEntryError) Error() string {
	src := ""
	if e.source != "" {
		src = e.source + ": "
	}
	return fmt.Sprintf("h3x: %sregistry entry %d (line %d): %s", src, e.entry, e.line, e.reason)
}

const registryBlanks = " \t\r"

func parseRegistry(text, source string) (*StaticRegistry, error) {
	r := &StaticRegistry{clients: make(map[string][]registryEntry)}
	var errs []error
	entryNo := 0
	for lineNo, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(strings.TrimLeft(line, registryBlanks), "#") {
			continue
		}
		for raw := range strings.FieldsFuncSeq(line, func(c rune) bool { return c == ',' || c == ';' }) {
			raw = strings.Trim(raw, registryBlanks)
			if raw == "" {
				continue
			}
			entryNo++
			clientID, e, problems := parseRegistryEntry(raw)
			if len(problems) > 0 {
				errs = append(errs, &registryEntryError{
					source: source,
					entry:  entryNo,
					line:   lineNo + 1,
					reason: strings.Join(problems, "; "),
				})
				continue
			}
			r.clients[clientID] = append(r.clients[clientID], e)
			r.entries++
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return r, nil
}

// parseRegistryEntry parses one trimmed, non-empty entry. The problems it
// reports never quote the entry.
func parseRegistryEntry(raw string) (clientID string, e registryEntry, problems []string) {
	rawClient, rest, ok := strings.Cut(raw, ":")
	if !ok {
		return "", e, []string{"missing ':' after the client id (want client_id:namespace=token)"}
	}
	rawNS, rawToken, ok := strings.Cut(rest, "=")
	if !ok {
		return "", e, []string{"missing '=' before the token (want client_id:namespace=token)"}
	}
	rawClient = strings.Trim(rawClient, registryBlanks)
	rawNS = strings.Trim(rawNS, registryBlanks)
	rawToken = strings.Trim(rawToken, registryBlanks)

	switch id, err := percentDecode(rawClient); {
	case err != "":
		problems = append(problems, "client id: "+err)
	case id == "":
		problems = append(problems, "empty client id")
	case !utf8.ValidString(id):
		problems = append(problems, "client id is not valid UTF-8")
	default:
		clientID = id
	}

	if nsPart, rate, hasRate := strings.Cut(rawNS, "@"); hasRate {
		rawNS = nsPart
		r, b, problem := parseRate(rate)
		if problem != "" {
			problems = append(problems, problem)
		}
		e.grant.Rate, e.grant.Burst = r, b
	}
	ns, suffix, hasSuffix := strings.Cut(rawNS, "/")
	e.grant.Namespace = ns
	e.grant.Permission = PermAll
	if hasSuffix {
		switch suffix {
		case "pub":
			e.grant.Permission = PermPublish
		case "sub":
			e.grant.Permission = PermConsume
		case "all":
			e.grant.Permission = PermAll
		default:
			problems = append(problems, "unknown permission suffix (want /pub, /sub or /all)")
		}
	}
	if ns != "*" {
		if reason := namespaceProblem(ns); reason != "" {
			problems = append(problems, "invalid namespace: "+reason)
		}
	}

	if hexDigest, ok := strings.CutPrefix(rawToken, "sha256:"); ok {
		if len(hexDigest) != hex.EncodedLen(sha256.Size) {
			problems = append(problems, "a sha256: token must be followed by exactly 64 hex digits")
		} else if _, err := hex.Decode(e.digest[:], []byte(hexDigest)); err != nil {
			problems = append(problems, "a sha256: token must be followed by exactly 64 hex digits")
		} else if e.digest == sha256.Sum256(nil) {
			// What hashing an unset variable gives: no client may
			// authenticate with an empty token.
			problems = append(problems, "a sha256: token is the digest of the empty token")
		}
	} else {
		switch token, err := percentDecode(rawToken); {
		case err != "":
			problems = append(problems, "token: "+err)
		case token == "":
			problems = append(problems, "empty token")
		case !utf8.ValidString(token):
			problems = append(problems, "token is not valid UTF-8")
		default:
			e.digest = sha256.Sum256([]byte(token))
		}
	}
	return clientID, e, problems
}

// percentDecode decodes %XX escapes. Its error names the offset of a bad
// escape, never the text.
func percentDecode(s string) (string, string) {
	if strings.IndexByte(s, '%') < 0 {
		return s, ""
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b = append(b, s[i])
			continue
		}
		if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
			return "", fmt.Sprintf("'%%' at offset %d is not followed by two hex digits (write %%25 for '%%')", i)
		}
		b = append(b, unhex(s[i+1])<<4|unhex(s[i+2]))
		i += 2
	}
	return string(b), ""
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

// parseRate parses a grant's "rate[:burst]" suffix.
func parseRate(s string) (rate float64, burst int, problem string) {
	r, b, hasBurst := strings.Cut(s, ":")
	rate, err := strconv.ParseFloat(r, 64)
	if err != nil || !(rate > 0 && rate <= MaxRate) {
		return 0, 0, "rate limit must be a positive number of events per second, at most 1e9 (@rate or @rate:burst)"
	}
	burst = defaultBurst(rate)
	if hasBurst {
		burst, err = strconv.Atoi(b)
		if err != nil || burst <= 0 {
			return 0, 0, "rate limit burst must be a positive integer (@rate:burst)"
		}
	}
	return rate, burst, ""
}

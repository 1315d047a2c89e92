// Command h3x runs an H3X broker and talks to one: it publishes, follows,
// benchmarks and inspects.
//
//	h3x serve     run a broker (Prometheus metrics with --metrics-addr)
//	h3x inject    publish events from flags, JSON lines or a synthetic load
//	h3x tail      follow namespaces and print deliveries
//	h3x bench     measure publish and consume throughput and latency
//	h3x stats     show per-namespace queue counts
//	h3x version   print the version
//
// Build it with "go build ./cmd/h3x". "h3x <command> -h" lists a command's
// flags. Flags may come before or after a command's arguments ("h3x tail
// orders --max 1"); "--" ends the flags, so that every argument after it
// is an argument even when it begins with '-' ("h3x tail -- -old-ns").
// Every setting that has an environment variable (H3X_ADDR,
// H3X_REGISTRY, H3X_TOKEN, ...; .env.example beside this file lists them
// all) can be given either way, and a flag wins over its variable.
//
// # A first session
//
//	export H3X_REGISTRY='me:*=dev-token'
//	h3x serve --queue memory &          # logs the certificate's sha256
//	export H3X_CLIENT_ID=me H3X_TOKEN=dev-token H3X_FINGERPRINT=<sha256>
//	h3x inject --ns orders --type order.created --data '{"sku":"A-1"}'
//	h3x tail orders                     # Ctrl-C to stop
//	h3x bench --duration 5s             # an embedded server of its own
//
// # Errors and exit status
//
// A command that fails prints one line, "h3x <command>: <problem>", on
// stderr and exits with status 1; a mistake in the command line (an
// unknown command or flag, a bad value) exits with status 2. Interrupting
// tail or serve (SIGINT, SIGTERM) is a normal end: status 0.
//
// # The admin stream
//
// The wire protocol has no statistics frame, so "h3x serve" registers an
// application stream handler (see h3x.Server.Handle) that "h3x stats" uses.
// It is outside the protocol and specific to this command; other programs
// that embed a server can serve the same frames.
//
// The client opens a stream and sends one frame of type 0xF0 whose payload
// is a JSON request, then finishes its side:
//
//	{"op":"stats","namespaces":["orders","audit"]}
//
// "namespaces" is optional (default: every namespace the queue knows). The
// server answers with one frame of type 0xF1, then ends the stream:
//
//	{"stats":[{"namespace":"orders","ready":3,"leased":2,"delayed":0,
//	           "dead_lettered":1,"expired":4,"oldest_ready_ms":1500,"bytes":912}]}
//
// or {"stats":null,"error":"..."}. A session sees only the namespaces it may
// consume (its consume grants, within the namespaces it asked for at
// authentication); naming another one is an error ("permission denied:
// ..."). Statistics are sorted by namespace.
package main

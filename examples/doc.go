// Package examples holds runnable H3X programs, one per directory, each
// started with go run from the repository root:
//
//   - quickstart: an embedded broker on the Badger default, a client that
//     publishes, fetches and acks; prints what happened and exits.
//   - producer and consumer: separate programs against a running server,
//     configured by flags (address, credentials, TLS trust).
//   - custom-handler: an application protocol of its own on frame types
//     from 0x80, served with Server.Handle and spoken with Client.OpenStream.
//   - embedded-test: a user's package and its tests, which start a broker
//     per test with h3xtest.NewServer and restart it under a running worker.
//
// The tests here build and run each program under a timeout and check what
// it prints; for producer and consumer they start a broker with h3xtest.
// embedded-test's own tests run with go test ./... like any other package.
package examples

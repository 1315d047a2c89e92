// Package h3xtest helps test code that uses H3X: a broker started in one line
// for a test (random loopback port, in-memory queue, stopped by t.Cleanup),
// fault hooks, and the conformance suites (TestQueue, TestRegistry) that every
// Queue and Registry implementation must pass, H3X's own included.
package h3xtest

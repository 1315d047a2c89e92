//go:build race

package reliability

// raceEnabled is true when the tests run under the race detector, which
// slows the server several times: load tests then measure the detector.
const raceEnabled = true

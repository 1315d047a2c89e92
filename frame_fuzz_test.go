package h3x

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"testing/iotest"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// fuzzMaxFrameSize is the frame readers' maximum in the fuzz targets: small,
// so that inputs can cross it.
const fuzzMaxFrameSize = 4 << 10

// FuzzFrameReader feeds arbitrary bytes to the frame reader, whole and one
// byte per Read. Every input must give frames and then exactly one of the
// documented errors, never a panic; the payload buffer never grows past the
// maximum; the frame bytes consumed re-encode to themselves; and a decoded
// payload re-encodes to a fixed point.
func FuzzFrameReader(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		whole := readAllFrames(t, bytes.NewReader(data), data)
		chunked := readAllFrames(t, iotest.OneByteReader(iotest.DataErrReader(bytes.NewReader(data))), data)
		if !slices.EqualFunc(whole, chunked, func(a, b fuzzFrame) bool {
			return a.t == b.t && bytes.Equal(a.payload, b.payload) && fmt.Sprint(a.err) == fmt.Sprint(b.err)
		}) {
			t.Fatalf("whole and one-byte reads differ:\n%v\n%v", whole, chunked)
		}
	})
}

type fuzzFrame struct {
	t       FrameType
	payload []byte
	err     error // set on the last element only
}

func (f fuzzFrame) String() string { return fmt.Sprintf("{%v %x %v}", f.t, f.payload, f.err) }

// readAllFrames reads r (whose bytes are data) to its first error and checks
// every frame on the way.
func readAllFrames(t *testing.T, r io.Reader, data []byte) []fuzzFrame {
	cr := &countingReader{r: r}
	fr := newFrameReader(cr, fuzzMaxFrameSize)
	fr.growFrom = 16 // payloads above 16 bytes grow as they arrive: fuzz that path too
	var frames []fuzzFrame
	for {
		start := cr.n
		ft, payload, err := fr.next()
		if cap(fr.buf) > fuzzMaxFrameSize {
			t.Fatalf("payload buffer grew to %d bytes, above the maximum %d", cap(fr.buf), fuzzMaxFrameSize)
		}
		if err != nil {
			switch {
			case err == io.EOF:
				if start != len(data) || cr.n != len(data) {
					t.Fatalf("io.EOF at offset %d of %d", start, len(data))
				}
			case errors.Is(err, ErrTruncatedHeader):
				if rest := len(data) - start; rest == 0 || rest >= frameHeaderLen {
					t.Fatalf("ErrTruncatedHeader with %d bytes left", rest)
				}
			case errors.Is(err, ErrTruncatedPayload):
				if rest := len(data) - start; rest < frameHeaderLen || rest >= frameHeaderLen+int(readLength(data[start:])) {
					t.Fatalf("ErrTruncatedPayload with %d bytes left", rest)
				}
			case errors.Is(err, ErrFrameTooLarge):
				if readLength(data[start:]) <= fuzzMaxFrameSize {
					t.Fatalf("ErrFrameTooLarge for a length of %d", readLength(data[start:]))
				}
				if cr.n-start != frameHeaderLen {
					t.Fatalf("read %d bytes of a frame that is too large", cr.n-start)
				}
			default:
				t.Fatalf("undocumented error %v", err)
			}
			return append(frames, fuzzFrame{t: ft, err: err})
		}
		if len(payload) > fuzzMaxFrameSize {
			t.Fatalf("payload of %d bytes", len(payload))
		}
		// The frame re-encodes to exactly the bytes it was read from.
		if raw := appendRawFrame(nil, ft, payload); !bytes.Equal(raw, data[start:cr.n]) {
			t.Fatalf("frame re-encodes to % x, read from % x", raw, data[start:cr.n])
		}
		checkPayloadRoundTrip(t, ft, payload)
		frames = append(frames, fuzzFrame{t: ft, payload: bytes.Clone(payload)})
	}
}

func readLength(b []byte) uint32 {
	var h [frameHeaderLen]byte
	copy(h[:], b)
	return uint32(h[1]) | uint32(h[2])<<8 | uint32(h[3])<<16 | uint32(h[4])<<24
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// FuzzDecodeFrame decodes arbitrary payloads as every frame type.
func FuzzDecodeFrame(f *testing.F) {
	f.Fuzz(func(t *testing.T, ft byte, payload []byte) {
		checkPayloadRoundTrip(t, FrameType(ft), payload)
	})
}

// checkPayloadRoundTrip decodes payload as a frame of type ft. An unknown
// type must give ErrUnknownFrameType and a bad payload ErrMalformedPayload.
// A decoded message must re-encode, and its encoding must be a fixed point:
// decoding and encoding it again gives the same message and the same bytes.
// (The input itself need not be canonical: protobuf allows fields in any
// order, repeated scalar fields, non-minimal varints and so on.)
func checkPayloadRoundTrip(t *testing.T, ft FrameType, payload []byte) {
	m, err := decodeFrame(ft, payload)
	if err != nil {
		known := newMessage(ft) != nil
		switch {
		case !known && errors.Is(err, ErrUnknownFrameType):
		case known && errors.Is(err, ErrMalformedPayload) && errors.Is(err, ErrProtocolViolation):
		default:
			t.Fatalf("decodeFrame(%v): undocumented error %v", ft, err)
		}
		if m != nil {
			t.Fatalf("decodeFrame(%v) returned a message and an error", ft)
		}
		return
	}
	frame, err := appendFrame(nil, ft, m)
	if err != nil {
		t.Fatalf("re-encoding a decoded %v: %v", ft, err)
	}
	m2, err := decodeFrame(ft, frame[frameHeaderLen:])
	if err != nil {
		t.Fatalf("decoding a re-encoded %v: %v", ft, err)
	}
	if !proto.Equal(m, m2) {
		t.Fatalf("%v changed through re-encoding:\n%v\n%v", ft, m, m2)
	}
	frame2, err := appendFrame(nil, ft, m2)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(frame, frame2) {
		t.Fatalf("%v encoding is not a fixed point:\n% x\n% x", ft, frame, frame2)
	}
}

// fuzzSeeds returns the checked-in seed corpus: every golden frame, all of
// them back to back, and edge cases for the header and the payload.
func fuzzSeeds(tb testing.TB) (reader map[string][]byte, decode map[string]struct {
	t       FrameType
	payload []byte
}) {
	reader = make(map[string][]byte)
	decode = make(map[string]struct {
		t       FrameType
		payload []byte
	})
	addDecode := func(name string, t FrameType, payload []byte) {
		decode[name] = struct {
			t       FrameType
			payload []byte
		}{t, payload}
	}

	var all []byte
	for ft := range FrameType(FirstApplicationFrameType) {
		m, ok := goldenMessages()[ft]
		if !ok {
			continue
		}
		frame := mustFrame(tb, ft, m)
		reader["golden-"+ft.String()] = frame
		addDecode("golden-"+ft.String(), ft, frame[frameHeaderLen:])
		all = append(all, frame...)
	}
	reader["golden-all"] = all

	ping := mustFrame(tb, FramePing, goldenMessages()[FramePing])
	reader["empty"] = nil
	reader["truncated-header"] = ping[:3]
	reader["truncated-payload"] = ping[:len(ping)-1]
	reader["header-only"] = ping[:frameHeaderLen]
	reader["frame-then-truncated-header"] = append(bytes.Clone(ping), ping[:2]...)
	reader["length-4GiB"] = []byte{byte(FrameSendEvent), 0xff, 0xff, 0xff, 0xff, 0xaa, 0xaa}
	reader["length-max"] = appendRawFrame(nil, 0x80, make([]byte, fuzzMaxFrameSize))
	reader["length-max-plus-1"] = []byte{0x80, 0x01, 0x10, 0x00, 0x00, 0x00}
	reader["length-1MiB-plus-1"] = []byte{byte(FramePing), 0x01, 0x00, 0x10, 0x00}
	reader["empty-frames"] = []byte{byte(FramePing), 0, 0, 0, 0, byte(FrameGoAway), 0, 0, 0, 0, 0x00, 0, 0, 0, 0}
	reader["unknown-type"] = appendRawFrame(nil, 0x7f, []byte{0x08, 0x01})
	reader["application-type"] = appendRawFrame(nil, 0xff, []byte("application payload"))

	malformed := map[string]struct {
		t       FrameType
		payload []byte
	}{
		"malformed-truncated-string": {FrameAuth, []byte{0x0a, 0x05, 'a'}},
		"malformed-truncated-varint": {FramePing, []byte{0x08, 0x80}},
		"malformed-wire-type-7":      {FramePing, []byte{0x0f}},
		"malformed-field-zero":       {FramePing, []byte{0x00, 0x01}},
		"malformed-invalid-utf8":     {FrameAuth, []byte{0x0a, 0x01, 0xff}},
		"malformed-varint-overflow":  {FramePing, []byte{0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}},
		"malformed-group":            {FrameAckEvent, []byte{0x0b, 0x0c}},
		// Valid but not canonical: they decode, and re-encode differently.
		"noncanonical-unknown-fields":  {FramePing, protowire.AppendString(protowire.AppendTag([]byte{0x08, 0x01}, 99, protowire.BytesType), "future")},
		"noncanonical-reversed-fields": {FramePing, []byte{0x10, 0x02, 0x08, 0x01}},
		"noncanonical-repeated-scalar": {FramePing, []byte{0x08, 0x01, 0x08, 0x02}},
		"noncanonical-long-varint":     {FramePing, []byte{0x08, 0x81, 0x80, 0x80, 0x00}},
		"noncanonical-unpacked":        {FrameAckEvent, []byte{0x18, 0x01, 0x18, 0x02}},
		"noncanonical-duplicate-key":   {FrameSendEvent, []byte{0x12, 0x10, 0x3a, 0x06, 0x0a, 0x01, 'k', 0x12, 0x01, 'a', 0x3a, 0x06, 0x0a, 0x01, 'k', 0x12, 0x01, 'b'}},
		"noncanonical-nan":             {FrameRateLimitNotice, []byte{0x19, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0x7f}},
		"noncanonical-unknown-enum":    {FrameError, []byte{0x08, 0x63}},
	}
	for name, c := range malformed {
		reader[name] = appendRawFrame(nil, c.t, c.payload)
		addDecode(name, c.t, c.payload)
	}
	addDecode("unknown-type", 0x7f, []byte{0x08, 0x01})
	addDecode("application-type", 0x80, []byte("application payload"))
	addDecode("empty-payload", FrameAuthResult, nil)
	return reader, decode
}

// TestFuzzSeedCorpus checks that testdata/fuzz holds the current seed
// corpus (with -update, writes it). Files the fuzzer added are left alone.
func TestFuzzSeedCorpus(t *testing.T) {
	reader, decode := fuzzSeeds(t)
	files := make(map[string][]byte)
	for name, data := range reader {
		files[filepath.Join("testdata/fuzz/FuzzFrameReader", name)] = corpusFile(data)
	}
	for name, c := range decode {
		files[filepath.Join("testdata/fuzz/FuzzDecodeFrame", name)] = corpusFile(byte(c.t), c.payload)
	}
	for name, c := range wireDecoderSeeds(t) {
		files[filepath.Join("testdata/fuzz/FuzzWireDecoders", name)] = corpusFile(c.pick, c.payload)
	}
	for path, content := range files {
		if *update {
			writeFile(t, path, string(content))
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(got, content) {
			t.Errorf("seed %s is missing or stale; run go test -run TestFuzzSeedCorpus -update", path)
		}
	}
}

// corpusFile renders a seed in the "go test fuzz v1" format.
func corpusFile(vals ...any) []byte {
	var b bytes.Buffer
	b.WriteString("go test fuzz v1\n")
	for _, v := range vals {
		switch v := v.(type) {
		case byte:
			fmt.Fprintf(&b, "byte(%q)\n", v)
		case []byte:
			fmt.Fprintf(&b, "[]byte(%q)\n", v)
		}
	}
	return b.Bytes()
}

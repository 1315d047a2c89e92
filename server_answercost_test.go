package h3x

import (
	"strings"
	"testing"

	"github.com/h3x-io/h3x/proto/h3xpb"
	"google.golang.org/protobuf/encoding/protowire"
)

// Finding 131's fix counts the longest id an event can hold only when the
// event's first field is not its id. An event whose first field is a short
// id and whose last is a second, long id (protobuf: the last one wins) is
// still counted with the first, short one: the answer echoes the long one.
func TestAnswerCostOfARepeatedID(t *testing.T) {
	long := strings.Repeat("i", MaxEventIDLen)
	var ev []byte
	ev = protowire.AppendTag(ev, 1, protowire.BytesType) // a short id first
	ev = protowire.AppendString(ev, "a")
	ev = protowire.AppendTag(ev, 2, protowire.BytesType)
	ev = protowire.AppendString(ev, "n")
	ev = protowire.AppendTag(ev, 1, protowire.BytesType) // the id that counts, last
	ev = protowire.AppendString(ev, long)
	var b []byte
	b = protowire.AppendTag(b, 2, protowire.BytesType) // SendEvent.events
	b = protowire.AppendBytes(b, ev)

	var m h3xpb.SendEvent
	if err := unmarshalPayload(FrameSendEvent, b, &m); err != nil {
		t.Fatal(err)
	}
	if got := m.GetEvents()[0].GetId(); got != long {
		t.Fatalf("decoded id %q, want the last one", got)
	}
	if got, want := answerCost(FrameSendEvent, b), int64(112+len(long)); got < want {
		t.Errorf("answerCost %d, want at least %d: the answer echoes the %d-byte id the event decodes to", got, want, len(long))
	}
}

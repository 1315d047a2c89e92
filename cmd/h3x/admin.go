package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/h3x-io/h3x"
)

// The admin application protocol of h3x serve (see the package doc).
const (
	adminRequestFrame  h3x.FrameType = 0xF0
	adminResponseFrame h3x.FrameType = 0xF1
)

type adminRequest struct {
	Op         string   `json:"op"`
	Namespaces []string `json:"namespaces,omitempty"`
}

type adminResponse struct {
	Stats []namespaceStats `json:"stats"`
	// Omitted counts the namespaces left out (the first Stats, by name,
	// fill the answer's frame): name namespaces to see the others.
	Omitted int    `json:"omitted,omitempty"`
	Error   string `json:"error,omitempty"`
}

type namespaceStats struct {
	Namespace     string `json:"namespace"`
	Ready         int    `json:"ready"`
	Leased        int    `json:"leased"`
	Delayed       int    `json:"delayed"`
	DeadLettered  int    `json:"dead_lettered"`
	Expired       int    `json:"expired"`
	OldestReadyMs int64  `json:"oldest_ready_ms"`
	Bytes         int64  `json:"bytes"`
}

type statsSource interface {
	Stats(ctx context.Context, namespaces ...string) ([]h3x.NamespaceStats, error)
}

// adminHandler serves the admin stream: one request frame, one response
// frame.
func adminHandler(src statsSource) h3x.Handler {
	return h3x.HandlerFunc(func(ctx context.Context, s *h3x.Stream) error {
		_, payload, err := s.ReadFrame()
		if err != nil {
			return err
		}
		var req adminRequest
		var resp adminResponse
		if err := json.Unmarshal(payload, &req); err != nil {
			resp.Error = "malformed admin request: " + err.Error()
		} else {
			resp = serveAdmin(ctx, src, s.Session(), req)
		}
		// Many namespaces may not fit one frame: the answer keeps the first
		// ones that do (WriteFrame refuses a larger frame without sending).
		all := resp.Stats
		for {
			b, err := json.Marshal(resp)
			if err != nil {
				return err
			}
			err = s.WriteFrame(adminResponseFrame, b)
			if !errors.Is(err, h3x.ErrFrameTooLarge) || len(resp.Stats) == 0 {
				return err
			}
			resp.Stats = all[:len(resp.Stats)*3/4]
			resp.Omitted = len(all) - len(resp.Stats)
		}
	})
}

// mayRead reports whether the session may see a namespace's counts: it may
// consume there.
func mayRead(sess *h3x.Session, ns string) bool {
	if len(sess.Namespaces) > 0 && !slices.Contains(sess.Namespaces, ns) {
		return false
	}
	return sess.Grants.Allows(ns, h3x.PermConsume)
}

func serveAdmin(ctx context.Context, src statsSource, sess *h3x.Session, req adminRequest) adminResponse {
	if req.Op != "stats" {
		return adminResponse{Error: fmt.Sprintf("unknown admin op %q", req.Op)}
	}
	for _, ns := range req.Namespaces {
		if err := h3x.ValidateNamespace(ns); err != nil {
			return adminResponse{Error: fmt.Sprintf("invalid namespace %q", ns)}
		}
		if !mayRead(sess, ns) {
			return adminResponse{Error: fmt.Sprintf("permission denied: namespace %q is not granted for consuming", ns)}
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	stats, err := src.Stats(ctx, req.Namespaces...)
	if err != nil {
		return adminResponse{Error: "queue stats failed"}
	}
	resp := adminResponse{Stats: []namespaceStats{}}
	for _, s := range stats {
		if !mayRead(sess, s.Namespace) {
			continue
		}
		resp.Stats = append(resp.Stats, namespaceStats{
			Namespace:     s.Namespace,
			Ready:         s.Ready,
			Leased:        s.Leased,
			Delayed:       s.Delayed,
			DeadLettered:  s.DeadLettered,
			Expired:       s.Expired,
			OldestReadyMs: s.OldestReady.Milliseconds(),
			Bytes:         s.Bytes,
		})
	}
	slices.SortFunc(resp.Stats, func(a, b namespaceStats) int {
		switch {
		case a.Namespace < b.Namespace:
			return -1
		case a.Namespace > b.Namespace:
			return 1
		}
		return 0
	})
	return resp
}

// adminStats asks the server for namespace counts over an admin stream.
func adminStats(ctx context.Context, c *h3x.Client, namespaces []string) ([]namespaceStats, error) {
	st, err := c.OpenStream(ctx)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { st.Close() }) // unblocks ReadFrame
	defer stop()
	req, _ := json.Marshal(adminRequest{Op: "stats", Namespaces: namespaces})
	if err := st.WriteFrame(adminRequestFrame, req); err != nil {
		return nil, adminError(ctx, err)
	}
	// The server may answer and stop reading before the FIN is sent: a
	// failed CloseWrite does not matter, the answer does.
	st.CloseWrite()
	t, payload, err := st.ReadFrame()
	if err != nil {
		return nil, adminError(ctx, err)
	}
	if t != adminResponseFrame {
		return nil, fmt.Errorf("unexpected %v frame in the admin answer", t)
	}
	var resp adminResponse
	if err := json.Unmarshal(payload, &resp); err != nil {
		return nil, fmt.Errorf("malformed admin answer: %v", err)
	}
	if resp.Error != "" {
		return nil, errors.New(resp.Error)
	}
	if resp.Omitted > 0 {
		return resp.Stats, fmt.Errorf("%w: %d more namespaces than fit one answer; name the namespaces to show", errOmitted, resp.Omitted)
	}
	return resp.Stats, nil
}

// errOmitted: the stats answer left namespaces out (the rest is printed).
var errOmitted = errors.New("not all namespaces shown")

func adminError(ctx context.Context, err error) error {
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, h3x.ErrUnknownFrameType):
		return errors.New("the server does not serve stats (it is not h3x serve, or an older one)")
	case errors.Is(err, io.EOF):
		return errors.New("the server closed the admin stream without answering")
	}
	return err
}

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"syscall"

	"github.com/h3x-io/h3x"
)

const tailAbout = `
Tail follows namespaces (as arguments or --ns; default: the client's
explicit consume grants) and prints each delivery as it arrives, as a JSON
line (the format inject reads, plus "attempt") or, with --format text, a
line for people. Flags may also follow the namespaces ("h3x tail orders
--max 1"); every argument after "--" is a namespace.

With --ack (the default) each delivery is acked once it is written out, so
tail consumes the events. With --no-ack deliveries stay leased to tail
until it exits (their leases are then released and the events delivered
again, to tail or another consumer) or until their ack deadline passes;
each delivery counts as an attempt towards dead-lettering.

Tail stops after --max deliveries, or on Ctrl-C or SIGTERM: it sends the
acks still queued, releases its leases and exits with status 0, or 1 if
some acks could not be sent (those events will be delivered again).`

func runTail(ctx context.Context, e *cmdEnv, args []string) error {
	var cf clientFlags
	var ns listFlag
	var ack, noAck bool
	var maxN, batch int
	format := newChoice("json", "json", "text")
	fs := newFlagSet(e, "[flags] [namespace ...]", tailAbout)
	cf.register(fs)
	fs.value(&ns, "ns", "H3X_NAMESPACE", "`namespaces` to follow, comma-separated (or as arguments, which replace $H3X_NAMESPACE)")
	fs.value(format, "format", "", "output `format`: json (JSON lines) or text")
	fs.boolVar(&ack, "ack", "", true, "ack each delivery once printed")
	fs.boolVar(&noAck, "no-ack", "", false, "leave deliveries leased until tail exits (same as --ack=false)")
	fs.intVar(&maxN, "max", "", 0, "exit after `n` deliveries (0: follow until interrupted)")
	fs.intVar(&batch, "batch", "", 100, "most deliveries fetched at once")
	if err := fs.parse(args); err != nil {
		return err
	}
	if fs.cli["ack"] && fs.cli["no-ack"] && ack == noAck {
		return usagef("--ack and --no-ack contradict each other")
	}
	if noAck {
		ack = false
	}
	if maxN < 0 {
		return usagef("--max must not be negative")
	}
	if batch < 1 || batch > h3x.DefaultMaxFetchLimit {
		return usagef("--batch must be between 1 and %d", h3x.DefaultMaxFetchLimit)
	}
	namespaces, err := namespacesFrom(fs, ns, fs.Args())
	if err != nil {
		return err
	}
	var extra []h3x.ClientOption
	if len(namespaces) > 0 {
		extra = append(extra, h3x.WithNamespaces(namespaces...))
		cf.namespaces = namespaces
	}
	c, err := cf.dial(ctx, e, extra...)
	if err != nil {
		return err
	}
	err = tailDeliveries(ctx, e, c, namespaces, format.v, ack, maxN, batch)
	// Close sends the acks still queued (Delivery.Ack only queues them) and
	// makes the server release the leases still held. An ack that did not
	// reach the server means its event will be delivered again: not a
	// clean exit, whether tail stopped at --max or was interrupted.
	if cerr := c.Close(); cerr != nil && ack && err == nil {
		err = fmt.Errorf("acking: %w (the events printed last will be delivered again)", cerr)
	}
	return err
}

// tailDeliveries fetches and prints deliveries until maxN (0: no limit)
// are printed or ctx ends, acking each batch once written out if ack.
func tailDeliveries(ctx context.Context, e *cmdEnv, c *h3x.Client, namespaces []string, format string, ack bool, maxN, batch int) error {
	out := bufio.NewWriterSize(e.stdout, 64<<10)
	enc := json.NewEncoder(out)
	enc.SetEscapeHTML(false)
	n := 0
	for maxN == 0 || n < maxN {
		limit := batch
		if maxN > 0 {
			limit = min(limit, maxN-n) // never lease what will not be printed
		}
		ds, err := c.Fetch(ctx, limit, namespaces...)
		if err != nil {
			if ctx.Err() != nil {
				return nil // interrupted: a clean exit
			}
			return tailError(err)
		}
		for _, d := range ds {
			if format == "text" {
				out.WriteString(formatHuman(&d.Event, d.Attempt()))
				out.WriteByte('\n')
			} else {
				enc.Encode(eventToJSON(&d.Event, d.Attempt()))
			}
		}
		if err := out.Flush(); err != nil {
			// Nothing of this batch is acked: it will be delivered again.
			if errors.Is(err, syscall.EPIPE) {
				return nil // the reader went away (h3x tail | head)
			}
			return fmt.Errorf("writing output: %w", err)
		}
		n += len(ds)
		if ack {
			for _, d := range ds {
				if err := d.Ack(); err != nil {
					return fmt.Errorf("acking: %w", err)
				}
			}
		}
	}
	return nil
}

func tailError(err error) error {
	var e *h3x.Error
	if errors.As(err, &e) && e.Code == h3x.CodeInvalidArgument && e.Remote {
		return fmt.Errorf("%s (name the namespaces to follow: arguments or --ns)", e.Message)
	}
	return err
}

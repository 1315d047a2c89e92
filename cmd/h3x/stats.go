package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"
)

const statsAbout = `
Stats prints each namespace's counts: events ready, leased, delayed (nacked
with a delay) and dead-lettered so far, leases expired so far, stored bytes
and the age of the oldest ready event ("so far": since the server's queue
was opened). It lists the given namespaces (as arguments or --ns; flags
may also follow them, and every argument after "--" is a namespace), or
every namespace the client may consume.

It asks over the admin stream of h3x serve (see "go doc ./cmd/h3x"), which
shows a client only the namespaces it may consume.`

func runStats(ctx context.Context, e *cmdEnv, args []string) error {
	var cf clientFlags
	var ns listFlag
	var asJSON bool
	fs := newFlagSet(e, "[flags] [namespace ...]", statsAbout)
	cf.register(fs)
	fs.value(&ns, "ns", "H3X_NAMESPACE", "`namespaces` to show, comma-separated (or as arguments, which replace $H3X_NAMESPACE)")
	fs.boolVar(&asJSON, "json", "", false, "print JSON instead of a table")
	if err := fs.parse(args); err != nil {
		return err
	}
	namespaces, err := namespacesFrom(fs, ns, fs.Args())
	if err != nil {
		return err
	}
	c, err := cf.dial(ctx, e)
	if err != nil {
		return err
	}
	defer c.Close()
	actx, cancel := context.WithTimeout(ctx, cf.timeout)
	defer cancel()
	stats, err := adminStats(actx, c, namespaces)
	var omitted error
	if errors.Is(err, errOmitted) {
		omitted, err = err, nil // printed after the counts shown
	}
	if err != nil {
		if ctx.Err() == nil && actx.Err() != nil {
			return fmt.Errorf("no answer from %s within %v", cf.addr, cf.timeout)
		}
		return err
	}
	if asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(stats); err != nil {
			return err
		}
		return omitted
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tREADY\tLEASED\tDELAYED\tDEAD-LETTERED\tEXPIRED\tBYTES\tOLDEST READY\t")
	for _, s := range stats {
		oldest := "-"
		if s.OldestReadyMs > 0 {
			oldest = (time.Duration(s.OldestReadyMs) * time.Millisecond).String()
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t\n", s.Namespace, s.Ready, s.Leased, s.Delayed, s.DeadLettered, s.Expired, s.Bytes, oldest)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	return omitted
}

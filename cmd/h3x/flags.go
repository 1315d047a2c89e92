package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// errHelp ends a command that printed its help: exit status 0.
var errHelp = errors.New("help requested")

// flagSet is a flag.FlagSet whose flags may fall back on environment
// variables: a flag given on the command line wins, then its variable, then
// its default. Secrets are never shown as defaults, because environment
// values are applied after parsing.
type flagSet struct {
	*flag.FlagSet
	e        *cmdEnv
	synopsis string // after "Usage: h3x <cmd> "
	about    string // paragraphs after the usage line
	envOf    map[string]string
	given    map[string]bool // set on the command line or by the environment
	cli      map[string]bool // set on the command line
	order    []string        // flag names in definition order, for the help
	// groups are flags that choose between alternatives (--fingerprint,
	// --ca-file, --insecure): one of them on the command line overrides
	// the environment of all of them.
	groups [][]string
	args   []string // the positional arguments, from parse
}

// alternatives makes names a group of flags choosing between alternatives:
// when one of them is given on the command line, the environment sets none
// of the others (the command line wins over the environment, also across a
// choice).
func (fs *flagSet) alternatives(names ...string) {
	fs.groups = append(fs.groups, names)
}

// cliInGroup reports whether a flag of name's alternatives was given on the
// command line.
func (fs *flagSet) cliInGroup(name string) bool {
	for _, g := range fs.groups {
		if slices.Contains(g, name) {
			for _, o := range g {
				if fs.cli[o] {
					return true
				}
			}
		}
	}
	return false
}

func newFlagSet(e *cmdEnv, synopsis, about string) *flagSet {
	fs := &flagSet{
		FlagSet:  flag.NewFlagSet(e.name, flag.ContinueOnError),
		e:        e,
		synopsis: synopsis,
		about:    about,
		envOf:    make(map[string]string),
		given:    make(map[string]bool),
		cli:      make(map[string]bool),
	}
	fs.SetOutput(io.Discard)
	return fs
}

func (fs *flagSet) bind(name, envVar string) {
	fs.order = append(fs.order, name)
	if envVar != "" {
		fs.envOf[name] = envVar
	}
}

func (fs *flagSet) stringVar(p *string, name, envVar, def, usage string) {
	fs.StringVar(p, name, def, usage)
	fs.bind(name, envVar)
}

func (fs *flagSet) boolVar(p *bool, name, envVar string, def bool, usage string) {
	fs.BoolVar(p, name, def, usage)
	fs.bind(name, envVar)
}

func (fs *flagSet) intVar(p *int, name, envVar string, def int, usage string) {
	fs.IntVar(p, name, def, usage)
	fs.bind(name, envVar)
}

func (fs *flagSet) int64Var(p *int64, name, envVar string, def int64, usage string) {
	fs.Int64Var(p, name, def, usage)
	fs.bind(name, envVar)
}

func (fs *flagSet) floatVar(p *float64, name, envVar string, def float64, usage string) {
	fs.Float64Var(p, name, def, usage)
	fs.bind(name, envVar)
}

func (fs *flagSet) durationVar(p *time.Duration, name, envVar string, def time.Duration, usage string) {
	fs.DurationVar(p, name, def, usage)
	fs.bind(name, envVar)
}

func (fs *flagSet) value(v flag.Value, name, envVar, usage string) {
	fs.Var(v, name, usage)
	fs.bind(name, envVar)
}

// parse parses args, then applies the environment to flags not given. It
// returns errHelp after printing the help for -h, and a usageError for a
// bad flag or value. Flags may come before, between and after positional
// arguments (Args); "--" ends the flags: every argument after it is
// positional, even one that starts with '-'.
func (fs *flagSet) parse(args []string) error {
	flags, positional := fs.split(args)
	fs.args = positional
	if err := fs.Parse(flags); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.printHelp(fs.e.stdout)
			return errHelp
		}
		return usageError{err}
	}
	fs.Visit(func(f *flag.Flag) { fs.given[f.Name], fs.cli[f.Name] = true, true })
	for _, name := range fs.order {
		ev, ok := fs.envOf[name]
		if !ok || fs.given[name] || fs.cliInGroup(name) {
			continue
		}
		v := fs.e.getenv(ev)
		if v == "" {
			continue
		}
		if err := fs.Lookup(name).Value.Set(v); err != nil {
			// The value is not repeated: it may be a secret.
			return usagef("invalid value in $%s: %v", ev, err)
		}
		fs.given[name] = true
	}
	return nil
}

// split separates the flags in args (with their values) from the
// positional arguments, as the flag package would parse them if it did not
// stop at the first positional argument: a flag that is not boolean takes
// the next argument as its value unless written --name=value. "--" ends
// the flags; a lone "-" is positional. Unknown flags are left for Parse to
// report.
func (fs *flagSet) split(args []string) (flags, positional []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return flags, append(positional, args[i+1:]...)
		case len(a) < 2 || a[0] != '-':
			positional = append(positional, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		if strings.Contains(name, "=") {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			continue
		}
		if bf, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && bf.IsBoolFlag() {
			continue
		}
		if i+1 < len(args) {
			i++
			flags = append(flags, args[i])
		}
	}
	return flags, positional
}

// Args returns the positional arguments, wherever they stood among the
// flags. It hides flag.FlagSet's Args, which would hold only those after
// the last flag.
func (fs *flagSet) Args() []string { return fs.args }

// NArg is the number of positional arguments.
func (fs *flagSet) NArg() int { return len(fs.args) }

// Arg returns the i'th positional argument, or "".
func (fs *flagSet) Arg(i int) string {
	if i < 0 || i >= len(fs.args) {
		return ""
	}
	return fs.args[i]
}

// source names where the value of flag name came from, for messages: its
// environment variable ("$H3X_ADDR") when the environment set it, else the
// flag ("--addr").
func (fs *flagSet) source(name string) string {
	if fs.given[name] && !fs.cli[name] && fs.envOf[name] != "" {
		return "$" + fs.envOf[name]
	}
	return "--" + name
}

// onCLI returns those of names given on the command line, as "--name",
// and whether they are several.
func (fs *flagSet) onCLI(names ...string) (list string, several bool) {
	var given []string
	for _, n := range names {
		if fs.cli[n] {
			given = append(given, "--"+n)
		}
	}
	switch len(given) {
	case 0:
		return "", false
	case 1:
		return given[0], false
	}
	return strings.Join(given[:len(given)-1], ", ") + " and " + given[len(given)-1], true
}

// ignoredFlags is the usage error for flags given on the command line
// that would be ignored: "--a and --b are <why>" (or "--a is <why>").
func (fs *flagSet) ignoredFlags(why string, names ...string) error {
	list, several := fs.onCLI(names...)
	if list == "" {
		return nil
	}
	verb := "is"
	if several {
		verb = "are"
	}
	return usagef("%s %s %s", list, verb, why)
}

// noArgs fails with a usage error if positional arguments remain.
func (fs *flagSet) noArgs() error {
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

func (fs *flagSet) printHelp(w io.Writer) {
	fmt.Fprintf(w, "Usage: h3x %s %s\n", fs.e.name, fs.synopsis)
	if fs.about != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimSpace(fs.about))
	}
	fmt.Fprintf(w, "\nFlags:\n")
	for _, name := range fs.order {
		f := fs.Lookup(name)
		typ, usage := flag.UnquoteUsage(f)
		line := "  --" + name
		if typ != "" {
			line += " " + typ
		}
		fmt.Fprintf(w, "%s\n    \t%s", line, strings.ReplaceAll(usage, "\n", "\n    \t"))
		if f.DefValue != "" && f.DefValue != "0" && f.DefValue != "false" && f.DefValue != "0s" {
			fmt.Fprintf(w, " (default %s)", f.DefValue)
		}
		if ev := fs.envOf[name]; ev != "" {
			fmt.Fprintf(w, " [$%s]", ev)
		}
		fmt.Fprintln(w)
	}
}

// listFlag is a repeatable flag whose values may also be comma-separated.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

// mapFlag is a repeatable key=value flag.
type mapFlag map[string]string

func (m mapFlag) String() string {
	var parts []string
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	return strings.Join(parts, ",")
}

func (m mapFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want key=value, got %q", s)
	}
	m[k] = v
	return nil
}

// choiceFlag is a string flag limited to some values.
type choiceFlag struct {
	v       string
	choices []string
}

func newChoice(def string, choices ...string) *choiceFlag {
	return &choiceFlag{v: def, choices: choices}
}

func (c *choiceFlag) String() string {
	if c == nil {
		return ""
	}
	return c.v
}

func (c *choiceFlag) Set(s string) error {
	for _, ch := range c.choices {
		if s == ch {
			c.v = s
			return nil
		}
	}
	return fmt.Errorf("want one of %s", strings.Join(c.choices, ", "))
}

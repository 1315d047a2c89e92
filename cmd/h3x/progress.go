package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/term"
)

// isTerminal reports whether w is a terminal.
func isTerminal(w any) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// progressOut writes result lines to a terminal or a pipe. On a terminal,
// once a run has lasted progressDelay, it keeps a progress bar on the last
// line and prints result lines above it.
type progressOut struct {
	mu       sync.Mutex
	w        *bufio.Writer
	tty      bool
	fd       int
	total    int64 // 0: unknown
	done     int64
	start    time.Time
	barShown bool
	err      error

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
}

const progressDelay = time.Second

func newProgressOut(w io.Writer, total int64) *progressOut {
	p := &progressOut{w: bufio.NewWriterSize(w, 64<<10), tty: isTerminal(w), total: total, start: time.Now(), stop: make(chan struct{})}
	if p.tty {
		p.fd = int(w.(*os.File).Fd())
	}
	if p.tty {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			t := time.NewTicker(200 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-p.stop:
					return
				case <-t.C:
					p.mu.Lock()
					p.draw()
					p.mu.Unlock()
				}
			}
		}()
	}
	return p
}

// line prints one result line.
func (p *progressOut) line(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clear()
	p.w.WriteString(s)
	p.w.WriteByte('\n')
}

// add counts n more events done.
func (p *progressOut) add(n int) {
	p.mu.Lock()
	p.done += int64(n)
	p.mu.Unlock()
}

// flush writes out what is buffered, redrawing the bar on a terminal; it
// returns the first write error (a closed pipe, say).
func (p *progressOut) flush() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.barShown || (p.tty && time.Since(p.start) >= progressDelay) {
		p.draw()
	} else if err := p.w.Flush(); err != nil && p.err == nil {
		p.err = err
	}
	return p.err
}

// finish stops the bar, erases it and flushes. It may be called again.
func (p *progressOut) finish() error {
	p.stopOnce.Do(func() { close(p.stop) })
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clear()
	if err := p.w.Flush(); err != nil && p.err == nil {
		p.err = err
	}
	return p.err
}

func (p *progressOut) clear() {
	if p.barShown {
		p.w.WriteString("\r\033[K")
		p.barShown = false
	}
}

func (p *progressOut) draw() {
	if !p.tty || time.Since(p.start) < progressDelay {
		return
	}
	p.clear()
	p.w.WriteString(progressBar(p.done, p.total, time.Since(p.start), termWidth(p.fd)))
	p.barShown = true
	if err := p.w.Flush(); err != nil && p.err == nil {
		p.err = err
	}
}

func termWidth(fd int) int {
	if w, _, err := term.GetSize(fd); err == nil && w > 20 {
		return w
	}
	return 80
}

// progressBar renders "[=====>    ]  45%  45,000/100,000  12,345 ev/s  ETA 4s"
// (or, with total unknown, "45,000 events  12,345 ev/s").
func progressBar(done, total int64, elapsed time.Duration, width int) string {
	rate := float64(done) / max(elapsed.Seconds(), 1e-9)
	if total <= 0 {
		return fmt.Sprintf("%s events  %s ev/s", groupDigits(done), groupDigits(int64(rate)))
	}
	frac := min(float64(done)/float64(total), 1)
	tail := fmt.Sprintf(" %3.0f%%  %s/%s  %s ev/s", frac*100, groupDigits(done), groupDigits(total), groupDigits(int64(rate)))
	if rate > 0 && done < total {
		eta := time.Duration(float64(total-done) / rate * float64(time.Second)).Round(time.Second)
		tail += "  ETA " + eta.String()
	}
	barW := min(40, width-len(tail)-3)
	if barW < 5 {
		return strings.TrimSpace(tail)
	}
	fill := int(frac * float64(barW))
	bar := strings.Repeat("=", fill)
	if fill < barW {
		bar += ">" + strings.Repeat(" ", barW-fill-1)
	}
	return "[" + bar + "]" + tail
}

// groupDigits writes n with thousands separators: 1234567 → "1,234,567".
func groupDigits(n int64) string {
	s := fmt.Sprint(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

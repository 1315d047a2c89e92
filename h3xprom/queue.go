package h3xprom

import (
	"context"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/h3x-io/h3x"
)

// StatsSource reports per-namespace queue statistics: an *h3x.Server or an
// h3x.Queue.
type StatsSource interface {
	Stats(ctx context.Context, namespaces ...string) ([]h3x.NamespaceStats, error)
}

// QueueCollector is a prometheus.Collector that asks a StatsSource for
// per-namespace counts at each scrape (metrics listed in the package doc).
// A failed Stats call fails the scrape of these metrics only (with
// promhttp.ContinueOnError, the others are still served).
type QueueCollector struct {
	src StatsSource
	cfg config

	ready, leased, delayed, bytes, oldest, deadLettered, expired *prometheus.Desc
}

var _ prometheus.Collector = (*QueueCollector)(nil)

// NewQueueCollector returns a collector of src's statistics, configured by
// opts (WithPrefix, WithConstLabels, WithStatsTimeout, WithNamespaces).
func NewQueueCollector(src StatsSource, opts ...Option) *QueueCollector {
	c := newConfig(opts)
	desc := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(c.name(name), help, []string{"namespace"}, c.constLabels)
	}
	return &QueueCollector{
		src:          src,
		cfg:          c,
		ready:        desc("queue_ready", "Events deliverable now."),
		leased:       desc("queue_leased", "Events leased and not yet settled."),
		delayed:      desc("queue_delayed", "Events nacked with a delay that has not passed."),
		bytes:        desc("queue_bytes", "Stored event bytes (ready, leased and delayed)."),
		oldest:       desc("queue_oldest_ready_seconds", "Age of the oldest ready event (0 if none)."),
		deadLettered: desc("events_dead_lettered_total", "Events moved to the namespace's dead-letter namespace since the queue opened."),
		expired:      desc("leases_expired_total", "Leases that ended by expiry of their ack deadline since the queue opened (0 if the queue does not count them)."),
	}
}

// Describe implements prometheus.Collector.
func (q *QueueCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{q.ready, q.leased, q.delayed, q.bytes, q.oldest, q.deadLettered, q.expired} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (q *QueueCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), q.cfg.statsTimeout)
	defer cancel()
	stats, err := q.src.Stats(ctx, q.cfg.namespaces...)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(q.ready, fmt.Errorf("h3xprom: queue stats: %w", err))
		return
	}
	for _, s := range stats {
		gauge := func(d *prometheus.Desc, v float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, s.Namespace)
		}
		gauge(q.ready, float64(s.Ready))
		gauge(q.leased, float64(s.Leased))
		gauge(q.delayed, float64(s.Delayed))
		gauge(q.bytes, float64(s.Bytes))
		gauge(q.oldest, s.OldestReady.Seconds())
		ch <- prometheus.MustNewConstMetric(q.deadLettered, prometheus.CounterValue, float64(s.DeadLettered), s.Namespace)
		ch <- prometheus.MustNewConstMetric(q.expired, prometheus.CounterValue, float64(s.Expired), s.Namespace)
	}
}

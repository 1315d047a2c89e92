// Package h3xprom exports an H3X server's metrics to Prometheus.
//
// The h3x package reports metrics through its Hooks interface and depends on
// no metrics library; this package adapts those hooks to the Prometheus
// client (github.com/prometheus/client_golang), so only programs that import
// h3xprom pull it in.
//
//	m := h3xprom.New()
//	srv, err := h3x.NewServer(h3x.WithHooks(m), ...)
//	...
//	reg := prometheus.NewRegistry()
//	reg.MustRegister(m, h3xprom.NewQueueCollector(srv))
//	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
//
// # Metrics
//
// Metrics counts what the server's hooks report (names with the default
// prefix "h3x"):
//
//	h3x_events_published_total{namespace}         counter   events stored
//	h3x_events_duplicate_total{namespace}         counter   publishes deduplicated by ID
//	h3x_events_refused_total{namespace,reason}    counter   events refused (reason: rate_limited, queue_full, ...)
//	h3x_events_rate_limited_total{namespace}      counter   the rate_limited part of the above
//	h3x_events_delivered_total{namespace}         counter   deliveries handed out
//	h3x_events_redelivered_total{namespace}       counter   the deliveries of them with attempt > 1
//	h3x_events_acked_total{namespace}             counter   acks applied
//	h3x_events_nacked_total{namespace}            counter   nacks applied
//	h3x_lease_extensions_total{namespace}         counter   lease extensions applied
//	h3x_settlements_refused_total{op}             counter   acks, nacks, extensions refused (stale, unknown or denied)
//	h3x_auth_failures_total{reason}               counter   refused authentications
//	h3x_connections_opened_total                  counter   connections accepted
//	h3x_connections                               gauge     live connections
//	h3x_publish_durable_seconds                   histogram per SendEvent and namespace: time until durable
//	h3x_fetch_wait_seconds                        histogram per fetch that delivered: time it waited
//	h3x_delivery_latency_seconds                  histogram per delivery: the event's age (now − its timestamp)
//
// QueueCollector asks the queue at scrape time (Server.Stats or Queue.Stats):
//
//	h3x_queue_ready{namespace}                    gauge     events deliverable now
//	h3x_queue_leased{namespace}                   gauge     events leased, not yet settled
//	h3x_queue_delayed{namespace}                  gauge     events nacked with a delay not yet passed
//	h3x_queue_bytes{namespace}                    gauge     stored event bytes
//	h3x_queue_oldest_ready_seconds{namespace}     gauge     age of the oldest ready event
//	h3x_events_dead_lettered_total{namespace}     counter   events moved to the namespace's dead-letter namespace since the queue opened
//	h3x_leases_expired_total{namespace}           counter   leases ended by expiry of their ack deadline since the queue opened
//
// The two counters come from NamespaceStats' cumulative counts: they restart
// from zero when the queue is reopened (Prometheus treats that as a counter
// reset), and h3x_leases_expired_total stays 0 for a Queue that does not
// count expiries (the built-in queues do).
//
// # Caveats
//
// Namespace labels of refusals for an invalid or ungranted namespace are
// left empty: those names come from clients that may not use them, and
// would otherwise let anyone grow the label set without bound. Client ids
// never appear in labels.
//
// Acks, nacks and extensions are counted per namespace through
// h3x.SettledInHooks, by the namespace the client named for each event
// (the Go client always does); one named by none counts under the empty
// namespace. Only applied settlements carry a namespace, and the queue
// applies one only to an event of the namespace named, so these labels stay
// among the namespaces that hold events. Refused settlements are counted
// by operation only. A Hooks that wraps Metrics must forward SettledIn, or
// the three counters stay at zero, and Fetched (h3x.FetchedHooks), or
// h3x_fetch_wait_seconds stays empty.
//
// Redeliveries (h3x_events_redelivered_total) follow nacked, released and
// expired leases alike; h3x_leases_expired_total counts the expiries alone.
//
// The delivery latency is measured from the event's timestamp, which the
// wire carries in whole seconds: it is precise only for events published
// without a timestamp (the queue then stamps them itself).
package h3xprom

import (
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/h3x-io/h3x"
)

// Option configures Metrics and QueueCollector.
type Option func(*config)

type config struct {
	prefix       string
	constLabels  prometheus.Labels
	statsTimeout time.Duration
	namespaces   []string
}

func newConfig(opts []Option) config {
	c := config{prefix: "h3x", statsTimeout: 5 * time.Second}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// WithPrefix sets the prefix of every metric name (Prometheus calls it the
// namespace). Default "h3x"; "" gives unprefixed names.
func WithPrefix(prefix string) Option {
	return func(c *config) { c.prefix = prefix }
}

// WithConstLabels adds labels with fixed values to every metric, such as
// the server's name when one process runs several. Default: none.
func WithConstLabels(l prometheus.Labels) Option {
	return func(c *config) { c.constLabels = l }
}

// WithStatsTimeout bounds a QueueCollector's Stats call at each scrape.
// Default 5 s. Metrics ignores it.
func WithStatsTimeout(d time.Duration) Option {
	return func(c *config) { c.statsTimeout = d }
}

// WithNamespaces makes a QueueCollector report only these namespaces.
// Default: every namespace the queue knows. Metrics ignores it.
func WithNamespaces(namespaces ...string) Option {
	return func(c *config) { c.namespaces = append([]string(nil), namespaces...) }
}

func (c *config) name(n string) string {
	if c.prefix == "" {
		return n
	}
	return c.prefix + "_" + n
}

// Metrics is an h3x.Hooks that counts a server's events in Prometheus
// metrics (listed in the package doc), and the prometheus.Collector that
// exports them. Pass it to h3x.WithHooks and register it with a
// prometheus.Registerer. Its methods are safe for concurrent use.
type Metrics struct {
	published, duplicates   *prometheus.CounterVec
	refused, rateLimited    *prometheus.CounterVec
	delivered, redelivered  *prometheus.CounterVec
	acked, nacked, extended *prometheus.CounterVec
	settleRefused           *prometheus.CounterVec
	authFailures            *prometheus.CounterVec
	connsOpened             prometheus.Counter
	conns                   prometheus.Gauge
	durable                 prometheus.Histogram
	fetchWait               prometheus.Histogram
	deliveryLatency         prometheus.Histogram

	collectors []prometheus.Collector

	// perNS caches each namespace's counters, so a hook costs a map read
	// instead of a label lookup.
	perNS sync.Map // string → *nsCounters
}

type nsCounters struct {
	published, duplicates, delivered, redelivered prometheus.Counter
	acked, nacked, extended                       prometheus.Counter
}

var (
	_ h3x.Hooks            = (*Metrics)(nil)
	_ h3x.SettledInHooks   = (*Metrics)(nil)
	_ h3x.FetchedHooks     = (*Metrics)(nil)
	_ prometheus.Collector = (*Metrics)(nil)
)

// New returns Metrics configured by opts (WithPrefix, WithConstLabels).
func New(opts ...Option) *Metrics {
	c := newConfig(opts)
	counterVec := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: c.name(name), Help: help, ConstLabels: c.constLabels}, labels)
	}
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: c.name(name), Help: help, ConstLabels: c.constLabels})
	}
	histogram := func(name, help string, buckets []float64) prometheus.Histogram {
		return prometheus.NewHistogram(prometheus.HistogramOpts{Name: c.name(name), Help: help, ConstLabels: c.constLabels, Buckets: buckets})
	}
	m := &Metrics{
		published:     counterVec("events_published_total", "Events stored by publishes.", "namespace"),
		duplicates:    counterVec("events_duplicate_total", "Published events already stored under their ID (deduplicated).", "namespace"),
		refused:       counterVec("events_refused_total", "Published events refused, by reason.", "namespace", "reason"),
		rateLimited:   counterVec("events_rate_limited_total", "Published events refused because their namespace was over its rate.", "namespace"),
		delivered:     counterVec("events_delivered_total", "Deliveries handed out by fetches.", "namespace"),
		redelivered:   counterVec("events_redelivered_total", "Deliveries with an attempt number above 1 (after a nack, an expired lease or a closed connection).", "namespace"),
		acked:         counterVec("events_acked_total", "Acks applied.", "namespace"),
		nacked:        counterVec("events_nacked_total", "Nacks applied.", "namespace"),
		extended:      counterVec("lease_extensions_total", "Lease extensions applied.", "namespace"),
		settleRefused: counterVec("settlements_refused_total", "Acks, nacks and lease extensions refused (stale, unknown or denied).", "op"),
		authFailures:  counterVec("auth_failures_total", "Refused authentications, by reason.", "reason"),
		connsOpened:   counter("connections_opened_total", "Connections accepted."),
		conns: prometheus.NewGauge(prometheus.GaugeOpts{Name: c.name("connections"), Help: "Live connections.",
			ConstLabels: c.constLabels}),
		durable: histogram("publish_durable_seconds", "Time from a publish's arrival until its events were durable, per publish and namespace.",
			prometheus.ExponentialBucketsRange(50e-6, 10, 16)),
		fetchWait: histogram("fetch_wait_seconds", "Time a fetch that delivered events waited for them.",
			prometheus.ExponentialBucketsRange(100e-6, 30, 16)),
		deliveryLatency: histogram("delivery_latency_seconds", "Age of each delivered event: the delivery's time minus the event's timestamp.",
			prometheus.ExponentialBucketsRange(100e-6, 300, 18)),
	}
	m.collectors = []prometheus.Collector{
		m.published, m.duplicates, m.refused, m.rateLimited, m.delivered, m.redelivered,
		m.acked, m.nacked, m.extended, m.settleRefused, m.authFailures, m.connsOpened, m.conns,
		m.durable, m.fetchWait, m.deliveryLatency,
	}
	return m
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors {
		c.Collect(ch)
	}
}

func (m *Metrics) ns(namespace string) *nsCounters {
	if v, ok := m.perNS.Load(namespace); ok {
		return v.(*nsCounters)
	}
	v, _ := m.perNS.LoadOrStore(namespace, &nsCounters{
		published:   m.published.WithLabelValues(namespace),
		duplicates:  m.duplicates.WithLabelValues(namespace),
		delivered:   m.delivered.WithLabelValues(namespace),
		redelivered: m.redelivered.WithLabelValues(namespace),
		acked:       m.acked.WithLabelValues(namespace),
		nacked:      m.nacked.WithLabelValues(namespace),
		extended:    m.extended.WithLabelValues(namespace),
	})
	return v.(*nsCounters)
}

// Published implements h3x.Hooks.
func (m *Metrics) Published(namespace string, stored, duplicates int, durable time.Duration) {
	c := m.ns(namespace)
	if stored > 0 {
		c.published.Add(float64(stored))
	}
	if duplicates > 0 {
		c.duplicates.Add(float64(duplicates))
	}
	m.durable.Observe(durable.Seconds())
}

// Refused implements h3x.Hooks.
func (m *Metrics) Refused(namespace string, code h3x.ErrorCode, n int) {
	if code == h3x.CodeInvalidArgument || code == h3x.CodePermissionDenied {
		namespace = "" // a name the client may not use: keep it out of the label set
	}
	m.refused.WithLabelValues(namespace, reason(code)).Add(float64(n))
	if code == h3x.CodeRateLimited {
		m.rateLimited.WithLabelValues(namespace).Add(float64(n))
	}
}

// Delivered implements h3x.Hooks.
func (m *Metrics) Delivered(namespace string, n, redelivered int, fetchWait time.Duration, ages []time.Duration) {
	c := m.ns(namespace)
	c.delivered.Add(float64(n))
	if redelivered > 0 {
		c.redelivered.Add(float64(redelivered))
	}
	for _, a := range ages {
		m.deliveryLatency.Observe(max(a, 0).Seconds())
	}
}

// Fetched implements h3x.FetchedHooks: it observes the fetch's wait (once
// per fetch, whatever the namespaces it delivered from).
func (m *Metrics) Fetched(_ int, wait time.Duration) {
	m.fetchWait.Observe(wait.Seconds())
}

// Settled implements h3x.Hooks. It counts the refused settlements; the
// applied ones are counted per namespace by SettledIn.
func (m *Metrics) Settled(t h3x.FrameType, _, refused int) {
	var op string
	switch t {
	case h3x.FrameAckEvent:
		op = "ack"
	case h3x.FrameNackEvent:
		op = "nack"
	case h3x.FrameExtendLease:
		op = "extend"
	default:
		return
	}
	if refused > 0 {
		m.settleRefused.WithLabelValues(op).Add(float64(refused))
	}
}

// SettledIn implements h3x.SettledInHooks: it counts applied acks, nacks
// and extensions per namespace.
func (m *Metrics) SettledIn(namespace string, t h3x.FrameType, n int) {
	c := m.ns(namespace)
	switch t {
	case h3x.FrameAckEvent:
		c.acked.Add(float64(n))
	case h3x.FrameNackEvent:
		c.nacked.Add(float64(n))
	case h3x.FrameExtendLease:
		c.extended.Add(float64(n))
	}
}

// AuthFailed implements h3x.Hooks.
func (m *Metrics) AuthFailed(code h3x.ErrorCode) {
	m.authFailures.WithLabelValues(reason(code)).Inc()
}

// ConnectionOpened implements h3x.Hooks.
func (m *Metrics) ConnectionOpened() {
	m.connsOpened.Inc()
	m.conns.Inc()
}

// ConnectionClosed implements h3x.Hooks.
func (m *Metrics) ConnectionClosed() { m.conns.Dec() }

// reason turns an error code into a label value: "rate limited" becomes
// "rate_limited".
func reason(code h3x.ErrorCode) string {
	return strings.ReplaceAll(code.String(), " ", "_")
}

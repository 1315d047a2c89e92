package h3xprom_test

import (
	"context"
	"log"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/h3x-io/h3x"
	"github.com/h3x-io/h3x/h3xprom"
)

// A server whose metrics are served at /metrics.
func Example() {
	metrics := h3xprom.New()
	srv, err := h3x.NewServer(h3x.WithHooks(metrics) /* , WithRegistry, ... */)
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(metrics, h3xprom.NewQueueCollector(srv))
	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	go http.ListenAndServe("127.0.0.1:9090", nil)

	if err := srv.ListenAndServe(context.Background()); err != nil {
		log.Print(err)
	}
}

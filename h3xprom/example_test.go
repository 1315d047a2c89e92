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
	reg, err := h3x.ParseRegistry("app:orders=s3cr3t")
	if err != nil {
		log.Fatal(err)
	}
	srv, err := h3x.NewServer(h3x.WithHooks(metrics), h3x.WithRegistry(reg))
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()

	prom := prometheus.NewRegistry()
	prom.MustRegister(metrics, h3xprom.NewQueueCollector(srv))
	http.Handle("/metrics", promhttp.HandlerFor(prom, promhttp.HandlerOpts{}))
	go http.ListenAndServe("127.0.0.1:9090", nil)

	if err := srv.ListenAndServe(context.Background()); err != nil {
		log.Print(err)
	}
}

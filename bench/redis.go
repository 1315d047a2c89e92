package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisParams are the client-side knobs of the Redis runs.
type redisParams struct {
	pipeline, conns int // pipelining publisher: XADDs per pipeline, pipelines in flight
	readCount       int // consumer: XREADGROUP COUNT
}

type redisTarget struct {
	p    *proc
	addr string
	rdb  *redis.Client // publishers
	sub  *redis.Client // consumers
	prm  redisParams
}

// startRedis starts redis-server with the append-only file in dir,
// fsynced every second (crash-safe class) or on every write (fsync
// class). RDB snapshots are off: the AOF is the durability mechanism
// being compared, and a snapshot's fork would only add noise.
func startRedis(ctx context.Context, bin, dir string, cls class, prm redisParams) (*redisTarget, error) {
	port, err := freeTCPPort()
	if err != nil {
		return nil, err
	}
	fsync := "everysec"
	if cls == fsyncAck {
		fsync = "always"
	}
	p, _, err := startProc("redis-server", filepath.Join(dir, "redis.log"), false, bin,
		"--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--dir", dir,
		"--appendonly", "yes", "--appendfsync", fsync, "--save", "",
		"--protected-mode", "no", "--daemonize", "no")
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := waitTCP(wctx, p, addr); err != nil {
		p.stop()
		return nil, err
	}
	t := &redisTarget{
		p:    p,
		addr: addr,
		rdb:  redis.NewClient(&redis.Options{Addr: addr, PoolSize: prm.conns + 2}),
		sub:  redis.NewClient(&redis.Options{Addr: addr, PoolSize: 4}),
		prm:  prm,
	}
	for _, s := range []string{"bench", "lat"} {
		if err := t.sub.XGroupCreateMkStream(ctx, s, "g", "0").Err(); err != nil {
			t.Close()
			return nil, fmt.Errorf("redis: create group: %w", err)
		}
	}
	return t, nil
}

func (t *redisTarget) Proc() *proc { return t.p }

func (t *redisTarget) Close() {
	t.rdb.Close()
	t.sub.Close()
	t.p.stop()
}

func (t *redisTarget) Publish(ctx context.Context, count int) (int, time.Duration, error) {
	return t.publishOn(ctx, t.rdb, "bench", count)
}

// Flood publishes into the flood stream as Publish does, on connections of
// its own, until ctx ends.
func (t *redisTarget) Flood(ctx context.Context) (int, error) {
	c := redis.NewClient(&redis.Options{Addr: t.addr, PoolSize: t.prm.conns + 2})
	defer c.Close()
	n, _, _ := t.publishOn(ctx, c, "flood", math.MaxInt)
	return n, nil
}

// publishOn adds count events to stream with c, in pipelines.
func (t *redisTarget) publishOn(ctx context.Context, c *redis.Client, stream string, count int) (int, time.Duration, error) {
	var (
		mu      sync.Mutex
		total   int
		first   error
		wg      sync.WaitGroup
		claimed atomic.Int64 // events taken by the pipelines so far
	)
	start := time.Now()
	for range t.prm.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := 0
			var err error
			for ctx.Err() == nil {
				end := int(claimed.Add(int64(t.prm.pipeline)))
				k := min(t.prm.pipeline, count-(end-t.prm.pipeline))
				if k <= 0 {
					break
				}
				pipe := c.Pipeline()
				for range k {
					pipe.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"d", payload}})
				}
				if _, err = pipe.Exec(ctx); err != nil {
					break
				}
				n += k
			}
			mu.Lock()
			total += n
			if err != nil && first == nil {
				first = err
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	return total, time.Since(start), first
}

// readAck acks the previous batch and reads the next in one round trip.
func (t *redisTarget) readAck(ctx context.Context, stream string, ack []string, count int, block time.Duration) ([]redis.XMessage, error) {
	pipe := t.sub.Pipeline()
	if len(ack) > 0 {
		pipe.XAck(ctx, stream, "g", ack...)
	}
	rd := pipe.XReadGroup(ctx, &redis.XReadGroupArgs{
		Group: "g", Consumer: "c", Streams: []string{stream, ">"}, Count: int64(count), Block: block,
	})
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	res, err := rd.Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil || len(res) == 0 {
		return nil, err
	}
	return res[0].Messages, nil
}

func (t *redisTarget) Consume(ctx context.Context, n int) (time.Duration, error) {
	start := time.Now()
	var ack []string
	for got := 0; got < n; {
		msgs, err := t.readAck(ctx, "bench", ack, min(t.prm.readCount, n-got), -1)
		if err != nil {
			return 0, err
		}
		if len(msgs) == 0 {
			return 0, fmt.Errorf("redis: backlog ran out after %d of %d", got, n)
		}
		ack = ack[:0]
		for _, m := range msgs {
			ack = append(ack, m.ID)
		}
		got += len(msgs)
	}
	if err := t.sub.XAck(ctx, "bench", "g", ack...).Err(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

func (t *redisTarget) Latency(ctx context.Context, rate int, warm, d time.Duration) ([]time.Duration, float64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	col := newLatencyCollector(rate, warm, d)
	go func() {
		var ack []string
		for ctx.Err() == nil {
			msgs, err := t.readAck(ctx, "lat", ack, 100, time.Second)
			if err != nil {
				return
			}
			ack = ack[:0]
			for _, m := range msgs {
				if s, ok := m.Values["d"].(string); ok {
					col.add([]byte(s))
				}
				ack = append(ack, m.ID)
			}
		}
	}()
	// The publisher does not wait for each reply (as H3X's PublishAsync and
	// JetStream's PublishAsync do not): up to 32 XADDs in flight on their
	// own connections. Waiting for each one held Redis far below the rate
	// in the fsync class (about 1,000 events/s), with the delay hidden from
	// the latency.
	pub := redis.NewClient(&redis.Options{Addr: t.rdb.Options().Addr, PoolSize: 32})
	defer pub.Close()
	sem := make(chan struct{}, 32)
	var inflight sync.WaitGroup
	var failed atomic.Int64
	_, achieved, err := pace(ctx, rate, warm+d, func(i int, at time.Time) error {
		data := latencyPayload(i, at)
		sem <- struct{}{}
		inflight.Go(func() {
			defer func() { <-sem }()
			if pub.XAdd(ctx, &redis.XAddArgs{Stream: "lat", Values: []any{"d", data}}).Err() != nil {
				failed.Add(1)
			}
		})
		return nil
	})
	inflight.Wait()
	if err != nil {
		return nil, 0, err
	}
	if n := failed.Load(); n > 0 {
		return nil, 0, fmt.Errorf("latency: %d XADDs failed", n)
	}
	lat, err := col.wait(ctx)
	return lat, achieved, err
}

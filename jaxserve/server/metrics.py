"""Prometheus metrics, named like vLLM's (`vllm:` -> `jaxserve:`) so that existing dashboards
need only the prefix changed.

Gauges are read from the engine at scrape time; counters and histograms are updated by the
engine thread as outputs come out of each step (`observe_step`).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Bucket edges in seconds, spanning a fast accelerator (ms) to this 2-core CPU (s).
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        disable_created_metrics()  # no *_created series (as vLLM): they double the scrape size
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.async_engine = None  # set by the app: the gauges read it
        labels, values = ["model_name"], [model_name]

        def counter(name, doc, extra=()):
            c = Counter(name, doc, labels + list(extra), registry=self.registry)
            return c if extra else c.labels(*values)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(*values)

        self.prompt_tokens = counter("jaxserve:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("jaxserve:generation_tokens", "Generated tokens.")
        self.preemptions = counter("jaxserve:num_preemptions", "Sequences preempted (recomputed).")
        self._success = counter("jaxserve:request_success", "Finished requests by finish reason.",
                                ["finished_reason"])
        self.ttft = histogram("jaxserve:time_to_first_token_seconds",
                              "Arrival to first output token.", _TTFT)
        self.itl = histogram("jaxserve:inter_token_latency_seconds",
                             "Time between consecutive output tokens of a request.", _ITL)
        self.e2e = histogram("jaxserve:e2e_request_latency_seconds",
                             "Arrival to finish.", _E2E)
        self.queue_time = histogram("jaxserve:request_queue_time_seconds",
                                    "Arrival to first scheduled step.", _TTFT)
        self.registry.register(_EngineGauges(self))

    def observe_step(self, out, tracked, num_tokens: int, now: float):
        """One RequestOutput from the engine thread; `tracked` holds what was seen before it."""
        new = num_tokens - tracked.num_tokens
        m = out.metrics
        if tracked.num_tokens == 0 and num_tokens:
            self.prompt_tokens.inc(tracked.num_prompt_tokens)
            self.ttft.observe(now - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        elif new and tracked.last_token_time is not None:
            self.itl.observe(now - tracked.last_token_time)
        self.generation_tokens.inc(max(0, new))
        if out.finished:
            self.e2e.observe(now - m.arrival_time)
            for c in out.outputs:
                self._success.labels(self.model_name, c.finish_reason or "abort").inc()

    def count_abort(self, n: int = 1):
        self._success.labels(self.model_name, "abort").inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """Scrape-time gauges: running and waiting requests, KV cache usage."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        engine = self.metrics.async_engine
        if engine is None:
            return
        name = self.metrics.model_name
        for metric, doc, value in (
                ("jaxserve:num_requests_running", "Sequences in the running batch.", engine.num_running),
                ("jaxserve:num_requests_waiting", "Sequences waiting to be scheduled.", engine.num_waiting),
                ("jaxserve:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).",
                 engine.kv_cache_usage)):
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            yield g
        yield from _scheduling_metrics(engine.engine, name)


def _scheduling_metrics(engine, name: str):
    """Preemptions by mode, layered prefill stages and swaps by direction, read from the scheduler and the runner's
    swapper at scrape time (plain reads of numbers the engine thread only increments)."""
    sched = engine.scheduler
    for metric, doc, value in (
            ("jaxserve:num_requests_swapped", "Sequences whose KV is in host memory.",
             sched.num_swapped),
            ("jaxserve:host_kv_pages", "KV pages held in host memory.",
             sched.host_pool.num_used_pages)):
        g = GaugeMetricFamily(metric, doc, labels=["model_name"])
        g.add_metric([name], value)
        yield g
    tier = sched.host_tier
    for metric, doc, value in (
            ("jaxserve:host_prefix_cache_hit_pages", "Prefix pages copied back from the host "
             "tier instead of recomputed.", 0 if tier is None else tier.num_hit_pages),
            ("jaxserve:host_prefix_cache_offloaded_pages", "Prefix-cached pages the device "
             "evicted that were copied to the host tier.",
             0 if tier is None else tier.num_offloaded_pages)):
        c = CounterMetricFamily(metric, doc, labels=["model_name"])
        c.add_metric([name], value)
        yield c
    c = CounterMetricFamily("jaxserve:preemptions_by_mode", "Sequences preempted, by mode.",
                            labels=["model_name", "mode"])
    for mode, n in sched.num_preemptions.items():
        c.add_metric([name, mode], n)
    yield c
    c = CounterMetricFamily("jaxserve:layered_prefill_stages",
                            "Steps of layered prefill batches (one group of layers each).",
                            labels=["model_name"])
    c.add_metric([name], sched.num_prefill_stages_run)
    yield c
    swapper = engine.runner.swapper
    stats = swapper.stats if swapper is not None else {}
    for what, doc in (("pages", "KV pages copied between device and host memory."),
                      ("bytes", "Bytes copied between device and host memory (as copied)."),
                      ("copies", "Copies between device and host memory (one per swap)."),
                      ("seconds", ("Seconds from dispatch to completion of swap copies, found "
                                   "complete at the end of a step (an upper bound)."))):
        c = CounterMetricFamily(f"jaxserve:swap_{what}", doc, labels=["model_name", "direction"])
        for way, direction in (("out", "device_to_host"), ("in", "host_to_device")):
            c.add_metric([name, direction], stats.get(f"{way}_{what}", 0))
        yield c

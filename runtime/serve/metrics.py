"""Prometheus metrics of one server (one registry per app, so two servers in a process don't mix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tablefree_requests", "Completions that ended, by finish reason "
                                "(stop, length, cancelled, error)", ["finish"], registry=r)
        self.rejected = Counter("tablefree_rejected_requests", "Requests refused before running, by HTTP status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("tablefree_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("tablefree_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("tablefree_queue_depth", "Requests waiting for a cache slot", registry=r)
        self.active_slots = Gauge("tablefree_active_slots", "Cache slots in use (batch occupancy)", registry=r)
        self.max_slots = Gauge("tablefree_max_slots", "Cache slots (--max-batch)", registry=r)
        self.max_slots.set(max_batch)
        self.batch_size = Histogram("tablefree_decode_batch_size", "Rows of each decode step", registry=r,
                                    buckets=tuple(float(b) for b in (1, 2, 4, 8, 16, 32, 64, 128)))
        # with batch_size's sum (rows decoded), the aggregate decode throughput: rows / step seconds
        self.step_seconds = Histogram("tablefree_decode_step_seconds", "Wall time of each decode step (all rows, "
                                      "token choice and text included)", registry=r, buckets=_LATENCY)
        self.prefix_queries = Counter("tablefree_prefix_cache_queries", "Requests admitted with a prefix "
                                      "cache lookup", registry=r)
        self.prefix_hits = Counter("tablefree_prefix_cache_hits", "Requests whose prompt start was copied from "
                                   "the prefix cache instead of prefilled", registry=r)
        self.prefix_tokens = Counter("tablefree_prefix_cache_reused_tokens", "Prompt tokens copied from the "
                                     "prefix cache (not prefilled)", registry=r)
        self.prefix_bytes = Gauge("tablefree_prefix_cache_bytes", "Bytes of keys and values the prefix cache "
                                  "holds", registry=r)
        self.ttft = Histogram("tablefree_time_to_first_token_seconds", "Submit to first token", registry=r,
                              buckets=_LATENCY)
        self.itl = Histogram("tablefree_inter_token_latency_seconds", "Between two tokens of a request", registry=r,
                             buckets=_LATENCY)

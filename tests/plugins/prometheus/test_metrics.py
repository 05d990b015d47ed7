"""/metrics, parsed by prometheus_client's own parser, moves with the traffic."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(base):
    response = httpx.get(f"{base}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_histograms_and_gauges_move(server, client):
    base = server[0]
    before = scrape(base)
    reply = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 7
    after = scrape(base)
    finished = ("enigma:request_success_total", {"model_name": "tiny", "finished_reason": "length"})
    assert value(after, finished[0], **finished[1]) == value(before, finished[0], **finished[1]) + 1
    assert (value(after, "enigma:generation_tokens_total", model_name="tiny")
            - value(before, "enigma:generation_tokens_total", model_name="tiny")) == 7
    assert (value(after, "enigma:prompt_tokens_total", model_name="tiny")
            - value(before, "enigma:prompt_tokens_total", model_name="tiny")) == reply.usage.prompt_tokens
    for histogram in ("enigma:time_to_first_token_seconds", "enigma:e2e_request_latency_seconds",
                      "enigma:inter_token_latency_seconds"):
        assert (value(after, f"{histogram}_count", model_name="tiny")
                == value(before, f"{histogram}_count", model_name="tiny") + 1), histogram
    assert value(after, "enigma:num_requests_running", model_name="tiny") == 0
    assert value(after, "enigma:kv_cache_blocks_total", model_name="tiny") > 0
    assert 0 <= value(after, "enigma:kv_cache_usage_perc", model_name="tiny") <= 1
    assert ("enigma:prefix_cache_hit_rate", (("model_name", "tiny"),)) in after

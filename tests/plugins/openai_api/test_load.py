"""The load scenario of benchmarks/serve_load.py, asserted: 64 streams, 16 disconnects, one throttled key."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import serve_load
from serving import stop


@pytest.mark.slow
def test_64_concurrent_streams_match_solo_runs_and_disconnects_leak_nothing(tmp_path):
    process, base, keys = serve_load.start_server("enigma-tiny", tmp_path)
    try:
        result = asyncio.run(serve_load.scenario(base, keys, clients=64, disconnects=16))
    finally:
        stop(process)
    assert result["all_ok"] and result["mismatches"] == []
    assert result["tokens_per_s"] > 2 * result["solo_tokens_per_s"]  # batching, not one after another
    assert result["kv_blocks_used_after_disconnects"] == 0 and result["running_after_disconnects"] == 0
    statuses = result["limited_statuses"]
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]

"""Adapters served per request: a batch mixing the base and three adapters answers as each merged model alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from enigma import LLM, SamplingParams
from enigma.errors import BadRequestError, NotFoundError
from enigma.testing import make_tiny_llama
from enigma_lora import merge_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_models import make_random_adapter

PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 87, 111, 114, 108, 100, 33], [256, 65, 66], [256, 120, 121, 122, 32]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("multi-lora")
    base = make_tiny_llama(root / "base", seed=5)
    targets = (["q_proj", "v_proj"], ["o_proj", "down_proj"], ["k_proj", "gate_proj", "up_proj"])
    adapters = {f"tuned{index}": make_random_adapter(base, root / f"adapter{index}", targets=names, rank=2 + 2 * index,
                                                     seed=index)
                for index, names in enumerate(targets)}
    return base, adapters


def merged_outputs(base: Path, adapter: Path | None, tmp: Path) -> list[list[int]]:
    folder = base if adapter is None else merge_adapter(base, adapter, output=tmp / f"merged-{adapter.name}")
    llm = LLM(folder, dtype="float32")
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]


def test_a_mixed_batch_equals_each_merged_model(setup, tmp_path: Path) -> None:
    base, adapters = setup
    llm = LLM(base, dtype="float32", adapters=adapters, max_loras=4)
    names = [None, "tuned0", "tuned1", "tuned2"]
    expected = {name: merged_outputs(base, adapters.get(name), tmp_path) for name in names}
    assert len({tuple(map(tuple, v)) for v in expected.values()}) == 4  # the adapters do change the answers
    prompts = [prompt for prompt in PROMPTS for _ in names]
    chosen = [name for _ in PROMPTS for name in names]
    outputs = llm.generate(prompts, GREEDY, adapter=chosen)
    for index, (output, name) in enumerate(zip(outputs, chosen)):
        assert output.outputs[0].token_ids == expected[name][index // len(names)], (index, name)
    # and again, now from the prefix cache: each adapter's blocks are its own
    again = llm.generate(prompts, GREEDY, adapter=chosen)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs]


def test_adapters_are_evicted_least_recently_used(setup) -> None:
    base, adapters = setup
    llm = LLM(base, dtype="float32", adapters=adapters, max_loras=1)
    one = llm.generate(PROMPTS[0], GREEDY, adapter="tuned0")[0].outputs[0].token_ids
    llm.generate(PROMPTS[0], GREEDY, adapter="tuned1")
    registry = llm.loaded.model.adapters
    assert list(registry.loaded) == ["tuned1"]
    assert llm.generate(PROMPTS[0], GREEDY, adapter="tuned0")[0].outputs[0].token_ids == one
    assert registry.loads == 3
    both = llm.generate([PROMPTS[0], PROMPTS[1]], GREEDY, adapter=["tuned0", "tuned2"])  # more than max_loras
    assert len(both) == 2


def test_unknown_adapter_is_refused(setup) -> None:
    base, adapters = setup
    llm = LLM(base, dtype="float32", adapters={"tuned0": adapters["tuned0"]})
    with pytest.raises(NotFoundError, match="adapter 'nope' is not loaded with this model; its adapters: tuned0"):
        llm.generate(PROMPTS[0], GREEDY, adapter="nope")
    plain = LLM(base, dtype="float32")
    with pytest.raises(NotFoundError, match="its adapters: none"):
        plain.generate(PROMPTS[0], GREEDY, adapter="tuned0")


def test_the_prefix_cache_keeps_adapters_apart(setup, tmp_path: Path) -> None:
    """The same 40-token prompt under an adapter, then the base, then another adapter: no request may
    reuse another adapter's keys and values for the blocks they share."""
    base, adapters = setup
    long_prompt = [256] + [97 + (i * 7) % 26 for i in range(40)]
    llm = LLM(base, dtype="float32", adapters=adapters)
    expected = {name: LLM(base if name is None else merge_adapter(base, adapters[name], output=tmp_path / name),
                          dtype="float32").generate(long_prompt, GREEDY)[0].outputs[0].token_ids
                for name in (None, "tuned0", "tuned1")}
    for name in ("tuned0", None, "tuned1", "tuned0"):
        assert llm.generate(long_prompt, GREEDY, adapter=name)[0].outputs[0].token_ids == expected[name], name
    assert llm.engine.stats()["prefix_cache_hit_rate"] > 0  # the last run did reuse its own adapter's blocks


def test_enable_lora_takes_adapters_later(setup, tmp_path: Path) -> None:
    base, adapters = setup
    llm = LLM(base, dtype="float32", enable_lora=True)
    llm.add_adapter("late", adapters["tuned2"])
    expected = LLM(merge_adapter(base, adapters["tuned2"], output=tmp_path / "m"), dtype="float32")
    assert llm.generate(PROMPTS[1], GREEDY, adapter="late")[0].outputs[0].token_ids == \
        expected.generate(PROMPTS[1], GREEDY)[0].outputs[0].token_ids
    narrow = LLM(base, dtype="float32", adapters={"tuned0": adapters["tuned0"]})
    with pytest.raises(BadRequestError, match=r"adapts model\.layers\.0\.(self_attn\.o|mlp\.down)_proj, which this "
                                              r"model cannot adapt .* enable_lora=True"):
        narrow.add_adapter("other", adapters["tuned1"])
    with pytest.raises(BadRequestError, match="already served"):
        llm.add_adapter("late", adapters["tuned0"])

"""enigma.merging against mergekit: the same YAML on the same models gives the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from enigma.errors import BadRequestError, ConfigError, NotFoundError
from enigma.merging import MergeConfig, merge, merge_models, tensor_seed
from enigma.testing import make_tiny_llama

mergekit = pytest.importorskip("mergekit", reason="mergekit is the oracle (requirements-dev.txt installs it)")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three random three-layer Llamas of one shape."""
    root = tmp_path_factory.mktemp("merge-inputs")
    return [make_tiny_llama(root / f"m{i}", seed=i, layers=3) for i in range(3)]


def run_mergekit(config: dict, out: Path, *, seed: int | None = None) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(quiet=True, write_model_card=False, random_seed=seed))
    return load_folder(out)


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6, msg=name)


def configs(m: list[Path]) -> dict[str, dict]:
    a, b, c = (str(p) for p in m)
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": [0.1, 0.4]}}]},
        "linear-unnormalized-bf16": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.6}}],
            "parameters": {"normalize": False}},
        "slerp-filters-gradient": {"merge_method": "slerp", "base_model": a, "slices": [{"sources": [
            {"model": a, "layer_range": [0, 3]}, {"model": b, "layer_range": [0, 3]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3]},
                                 {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]}},
        "slerp-out-dtype": {"merge_method": "slerp", "base_model": b, "out_dtype": "float16",
                            "models": [{"model": a}, {"model": b}], "parameters": {"t": 0.3}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": a, "models": [
            {"model": b, "parameters": {"weight": 0.8}}, {"model": c, "parameters": {"weight": -0.3}}],
            "parameters": {"lambda": 0.9}},
        "ties": {"merge_method": "ties", "base_model": a, "models": [
            {"model": a}, {"model": b, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": c, "parameters": {"weight": [0.2, 0.9], "density": 0.7}}]},
        "ties-int8-mask-unnormalized": {"merge_method": "ties", "base_model": a, "models": [
            {"model": b, "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": c, "parameters": {"weight": 0.5, "density": 0.9}}],
            "parameters": {"int8_mask": True, "normalize": False}},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": a, "models": [
            {"model": b, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
            {"model": c, "parameters": {"weight": 0.5, "density": 0.6}}]},
        "passthrough-frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3]}]},
            {"sources": [{"model": c, "layer_range": [2, 3], "parameters": {"scale": 0.5}}]}]},
        "multislerp": {"merge_method": "multislerp", "models": [
            {"model": a, "parameters": {"weight": 0.2}}, {"model": b, "parameters": {"weight": 0.5}},
            {"model": c, "parameters": {"weight": 0.3}}]},
    }


@pytest.mark.parametrize("case", list(configs([Path("a"), Path("b"), Path("c")])))
def test_equals_mergekit(case: str, models: list[Path], tmp_path: Path) -> None:
    config = configs(models)[case]
    theirs = run_mergekit(config, tmp_path / "mergekit")
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    folder = merge(path, output=tmp_path / "enigma")
    assert_same(load_folder(folder), theirs)
    ours_config = json.loads((folder / "config.json").read_text())
    theirs_config = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert ours_config["num_hidden_layers"] == theirs_config["num_hidden_layers"]
    assert (folder / "tokenizer.json").read_bytes() == (models[0] / "tokenizer.json").read_bytes()
    assert yaml.safe_load((folder / "mergekit_config.yml").read_text()) == config


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della"])
def test_randomized_methods_equal_mergekit_with_the_same_seed(method: str, models: list[Path],
                                                              tmp_path: Path) -> None:
    """DARE's and DELLA's masks come from a generator seeded per tensor (:func:`tensor_seed`); mergekit's
    kernel, given the global generator seeded the same way, draws the same masks."""
    from mergekit.merge_methods import merge_tensors

    a, b, c = (str(p) for p in models)
    weights, densities = {1: 0.7, 2: 0.4}, {1: 0.5, 2: 0.3}
    config = {"merge_method": method, "base_model": a, "models": [
        {"model": b, "parameters": {"weight": weights[1], "density": densities[1]}},
        {"model": c, "parameters": {"weight": weights[2], "density": densities[2]}}]}
    folder = merge(MergeConfig.from_dict(config), output=tmp_path / "out", seed=1234)
    ours = load_folder(folder)
    inputs = [load_file(p / "model.safetensors") for p in models]
    for name, tensor in ours.items():
        torch.manual_seed(tensor_seed(1234, name))
        theirs = merge_tensors([inputs[0][name], inputs[1][name], inputs[2][name]], method, base_index=0,
                               parameters={"weight": weights, "density": densities})
        torch.testing.assert_close(tensor, theirs, rtol=1e-6, atol=1e-6, msg=name)
    again = load_folder(merge(MergeConfig.from_dict(config), output=tmp_path / "again", seed=1234))
    assert all(torch.equal(ours[name], again[name]) for name in ours)
    other = load_folder(merge(MergeConfig.from_dict(config), output=tmp_path / "other", seed=7))
    assert any(not torch.equal(ours[name], other[name]) for name in ours)


def test_merge_models_seed_call(models: list[Path], tmp_path: Path) -> None:
    inputs = [load_file(p / "model.safetensors") for p in models]
    folder = merge_models(models, weights=[0.5, 0.3, 0.2], method="linear", output=tmp_path / "linear")
    for name, tensor in load_folder(folder).items():
        expected = 0.5 * inputs[0][name] + 0.3 * inputs[1][name] + 0.2 * inputs[2][name]
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    two = load_folder(merge_models(models[:2], weights=[0.75, 0.25], method="slerp", output=tmp_path / "slerp"))
    theirs = run_mergekit({"merge_method": "slerp", "base_model": str(models[0]), "parameters": {"t": 0.25},
                           "models": [{"model": str(models[0])}, {"model": str(models[1])}]}, tmp_path / "mk")
    assert_same(two, theirs)
    three = merge_models(models, weights=[0.2, 0.5, 0.3], method="slerp", output=tmp_path / "multi")
    assert yaml.safe_load((three / "mergekit_config.yml").read_text())["merge_method"] == "multislerp"


def test_merged_model_loads_and_runs(models: list[Path], tmp_path: Path) -> None:
    """A result split into shards loads in transformers and in enigma, with the same logits."""
    transformers = pytest.importorskip("transformers")
    from enigma import LLM, SamplingParams

    folder = merge_models(models, weights=[1, 1, 1], method="linear", output=tmp_path / "sharded")
    config = MergeConfig.from_dict({"merge_method": "linear", "models": [
        {"model": str(p), "parameters": {"weight": 1}} for p in models]})
    sharded = merge(config, output=tmp_path / "shards", max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert load_folder(sharded).keys() == load_folder(folder).keys()
    reference = transformers.AutoModelForCausalLM.from_pretrained(sharded)
    ids = torch.tensor([[256, 72, 101, 108, 108, 111]])
    with torch.no_grad():
        expected = reference(ids).logits[0, -1].argmax().item()
    llm = LLM(sharded, dtype="float32")
    out = llm.generate([[int(i) for i in ids[0]]], SamplingParams(max_tokens=1, temperature=0))[0]
    assert out.outputs[0].token_ids[0] == expected


def test_merge_into_the_store(models: list[Path], enigma_home: Path) -> None:
    from enigma.store import Store

    folder = merge_models(models[:2], weights=[0.5, 0.5], name="blend:v1")
    manifest = Store().get("blend:v1")
    assert folder == Store().path("blend:v1")
    assert manifest.source.startswith("merge:linear:")
    assert {entry.path for entry in manifest.files} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert Store().verify("blend:v1") == []


def test_incompatible_shapes_name_the_tensor(models: list[Path], tmp_path: Path) -> None:
    small = make_tiny_llama(tmp_path / "small", layers=3, hidden_size=32)
    with pytest.raises(BadRequestError, match=r"tensor model\.embed_tokens\.weight has different shapes.*\[258, 32\]"):
        merge_models([models[0], small], weights=[1, 1], output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_different_architectures_are_refused(models: list[Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_tiny_llama(other, layers=3)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(BadRequestError, match=r"is \['MistralForCausalLM'\].*one architecture"):
        merge_models([models[0], other], weights=[1, 1], output=tmp_path / "out")


def test_config_errors_are_clear(models: list[Path], tmp_path: Path) -> None:
    a, b = str(models[0]), str(models[1])
    with pytest.raises(NotFoundError, match="'/no/such/model' not found"):
        merge_models([a, "/no/such/model"], weights=[1, 1], output=tmp_path / "out")
    with pytest.raises(BadRequestError, match="parameter 'weight' is required for model .*m1"):
        merge(MergeConfig.from_dict({"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 1}}, {"model": b}]}), output=tmp_path / "out")
    with pytest.raises(BadRequestError, match="slerp needs a base_model"):
        merge(MergeConfig.from_dict({"merge_method": "slerp", "models": [{"model": a}, {"model": b}],
                                     "parameters": {"t": 0.5}}), output=tmp_path / "out")
    with pytest.raises(BadRequestError, match="unknown merge method 'frobnicate'"):
        merge(MergeConfig.from_dict({"merge_method": "frobnicate", "models": [{"model": a}]}),
              output=tmp_path / "out")
    with pytest.raises(BadRequestError, match="layer_range .* past its 3 layers"):
        merge(MergeConfig.from_dict({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [2, 5]}]}]}), output=tmp_path / "out")
    with pytest.raises(ConfigError, match="exactly one of models: and slices:"):
        MergeConfig.from_dict({"merge_method": "linear"})
    with pytest.raises(ConfigError, match="unknown key.*modelz"):
        MergeConfig.from_dict({"merge_method": "linear", "modelz": []})
    with pytest.raises(ConfigError, match="does not exist"):
        MergeConfig.from_yaml(tmp_path / "missing.yml")
    (tmp_path / "exists").mkdir()
    with pytest.raises(BadRequestError, match="exists"):
        merge_models([a, b], weights=[1, 1], output=tmp_path / "exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_streaming_writer_refuses_out_of_order_tensors_and_leaves_nothing(tmp_path: Path) -> None:
    from enigma.saving import StreamingSafetensorsWriter, TensorLayout

    layout = [TensorLayout("a", torch.float32, (2, 3)), TensorLayout("b", torch.bfloat16, (4,))]
    with StreamingSafetensorsWriter(tmp_path / "ok", layout) as writer:
        writer.write("a", torch.arange(6, dtype=torch.float32).reshape(2, 3))
        writer.write("b", torch.ones(4, dtype=torch.bfloat16))
    with safe_open(str(tmp_path / "ok" / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("a").tolist() == [[0, 1, 2], [3, 4, 5]]
        assert handle.get_tensor("b").dtype == torch.bfloat16
    with (pytest.raises(ValueError, match="not the next in the layout"),
          StreamingSafetensorsWriter(tmp_path / "bad", layout) as writer):
        writer.write("b", torch.ones(4, dtype=torch.bfloat16))
    with (pytest.raises(ValueError, match="closed before tensor 'b'"),
          StreamingSafetensorsWriter(tmp_path / "short", layout) as writer):
        writer.write("a", torch.zeros(2, 3))
    assert list((tmp_path / "bad").iterdir()) == [] and list((tmp_path / "short").iterdir()) == []

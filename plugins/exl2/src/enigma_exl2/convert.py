"""EXL2 conversion, as exllamav2's converter runs it: measure, optimise, quantize, write.

1. **Measure** (the long part, resumable): layer by layer on the calibration
   states, each Linear's Hessian is collected, every option of
   :func:`enigma_exl2.qparams.block_options` is quantized with GPTQ, and the
   block's output error on the calibration rows is recorded with the bits it
   costs. The float layer's output feeds the next layer. After each layer the
   measurement so far and the states are saved in the work folder, so an
   interrupted run goes on where it stopped. The finished measurement
   (``measurement.json``) can be reused for any other bits-per-weight.
2. **Optimise**: each block's option chosen to spend ``bpw × decoder weights``
   bits with the least summed error (:mod:`enigma_exl2.optimize`).
3. **Quantize**: layer by layer again, now feeding each layer the outputs of
   the already quantized ones, every Linear quantized with GPTQ at its chosen
   recipe; the head at ``head_bits`` from the final states.
4. **Write** ``output.safetensors`` (EXL2 tensors, other weights in float16)
   and config.json with ``quantization_config``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enigma.errors import BadRequestError
from enigma_exl2.calibration import Calibration
from enigma_exl2.gptq import Hessian, Prepared, prepare, quantize_linear
from enigma_exl2.layers import LayerRunner, recording_inputs, relative_accuracy, swapped_weights
from enigma_exl2.optimize import choose
from enigma_exl2.qparams import ATTENTION, HEAD_OPTIONS, MLP, QParams, block_options

log = logging.getLogger(__name__)

MEASUREMENT_VERSION = 1
MIN_BPW, MAX_BPW = 2.5, 8.0
HEAD_BITS = (*sorted(HEAD_OPTIONS), 16)
OUTPUT_FILE = "output.safetensors"
MEASUREMENT_FILE = "measurement.json"
SUPPORTED = ("LlamaForCausalLM",)
"""enigma classes whose layers the converter knows (Llama, Mistral, Qwen2, SmolLM, TinyLlama... build them)."""

Progress = Callable[[int, int], None]


def check_target(bpw: float, head_bits: int) -> None:
    if not MIN_BPW <= bpw <= MAX_BPW:
        raise BadRequestError(f"--bpw {bpw} is out of range; EXL2 targets {MIN_BPW} to {MAX_BPW} bits per weight")
    if head_bits not in HEAD_BITS:
        raise BadRequestError(f"--head-bits {head_bits} is not one of {', '.join(map(str, HEAD_BITS))}")


def check_model(model: nn.Module, architecture: str) -> None:
    if type(model).__name__ not in SUPPORTED or not hasattr(model, "model"):
        raise BadRequestError(f"EXL2 quantization supports the Llama family (Llama, Mistral, Qwen2, SmolLM...); "
                              f"{architecture} ({type(model).__name__}) is not one of them")


def _linears(layer: nn.Module, block: str) -> dict[str, nn.Linear]:
    owner = layer.self_attn if block == "attention" else layer.mlp
    return {name: getattr(owner, name) for name in (ATTENTION if block == "attention" else MLP)}


_SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def _hessians(runner: LayerRunner, layer: nn.Module, states: torch.Tensor) -> tuple[dict[str, Prepared],
                                                                                      torch.Tensor, torch.Tensor]:
    """Each Linear's prepared Hessian on ``states``, the attention block's output and the layer's output."""
    linears = {**_linears(layer, "attention"), **_linears(layer, "mlp")}
    recorded = {name: Hessian(module.in_features) for name, module in linears.items()
                if name not in _SHARED_INPUT}
    watched = {name: linears[name] for name in recorded}
    with recording_inputs(watched, lambda name, x: recorded[name].add(x)):
        middle = runner.attention(layer, states)
        output = runner.mlp(layer, middle)
    prepared = {name: prepare(h.matrix()) for name, h in recorded.items()}
    prepared.update({name: prepared[source] for name, source in _SHARED_INPUT.items()})
    return prepared, middle, output


def measure_layer(runner: LayerRunner, layer: nn.Module, states: torch.Tensor) -> tuple[dict[str, Any],
                                                                                        torch.Tensor]:
    """Every option's accuracy and bits for the layer's two blocks, and the layer's float output."""
    prepared, middle, output = _hessians(runner, layer, states)
    result: dict[str, Any] = {}
    for block, inputs, targets, run in (("attention", states, middle, runner.attention),
                                        ("mlp", middle, output, runner.mlp)):
        linears = _linears(layer, block)
        quantized: dict[tuple[str, QParams], torch.Tensor] = {}
        options = []
        for recipe in block_options(block):
            weights = {}
            for name, qparams in recipe.items():
                key = (name, qparams)
                if key not in quantized:
                    quantized[key] = quantize_linear(linears[name].weight, prepared[name], qparams).weight
                weights[name] = quantized[key]
            with swapped_weights(linears, weights):
                accuracy = relative_accuracy(run(layer, inputs), targets)
            bits = sum(q.total_bits(linears[n].in_features, linears[n].out_features) for n, q in recipe.items())
            options.append({"accuracy": accuracy, "total_bits": bits,
                            "recipe": {name: q.to_dict() for name, q in recipe.items()}})
        result[block] = options
    return result, output


def embed(model: nn.Module, calibration: Calibration) -> torch.Tensor:
    with torch.no_grad():
        return model.model.embed_tokens(calibration.tokens).float()


def fingerprint(folder: Path, hf_config: Mapping[str, Any], calibration: Calibration) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(hf_config, sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(f"{path.name}:{path.stat().st_size}:{int(path.stat().st_mtime)}".encode())
    digest.update(f"{calibration.fingerprint()}:{MEASUREMENT_VERSION}".encode())
    return digest.hexdigest()[:20]


def _write_json(path: Path, data: Any) -> None:
    scratch = path.with_suffix(".partial")
    scratch.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(scratch, path)


def measure(model: nn.Module, calibration: Calibration, work: Path, key: str,
            progress: Progress | None = None) -> dict[str, Any]:
    """The model's measurement, resumed from ``work`` where an earlier run with the same ``key`` stopped."""
    from safetensors.torch import load_file, save_file

    work.mkdir(parents=True, exist_ok=True)
    path, states_path = work / MEASUREMENT_FILE, work / "states.safetensors"
    layers = model.model.layers
    measurement = {"version": MEASUREMENT_VERSION, "key": key, "calibration": calibration.describe(), "layers": []}
    states = None
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key and saved.get("version") == MEASUREMENT_VERSION:
            measurement = saved
            if len(saved["layers"]) == len(layers):
                return measurement
            if states_path.exists():
                stored = load_file(str(states_path))
                if int(stored["layer"]) == len(saved["layers"]):
                    states = stored["states"]
                    log.info("resuming the EXL2 measurement at layer %d of %d", len(saved["layers"]), len(layers))
            if states is None:
                measurement["layers"] = []
    runner = LayerRunner(model, calibration.length)
    if states is None:
        states = embed(model, calibration)
    for index in range(len(measurement["layers"]), len(layers)):
        started = time.monotonic()
        result, states = measure_layer(runner, layers[index], states)
        measurement["layers"].append(result)
        save_file({"states": states.contiguous(), "layer": torch.tensor(index + 1)}, str(states_path) + ".partial")
        os.replace(str(states_path) + ".partial", states_path)
        _write_json(path, measurement)
        log.info("measured layer %d of %d in %.1f s", index + 1, len(layers), time.monotonic() - started)
        if progress:
            progress(index + 1, len(layers))
    states_path.unlink(missing_ok=True)
    return measurement


def decoder_weights(model: nn.Module) -> int:
    """Weights of the decoder layers' Linears: what a bits-per-weight target is of (the head is separate)."""
    return sum(module.weight.numel() for layer in model.model.layers
               for module in (*_linears(layer, "attention").values(), *_linears(layer, "mlp").values()))


def strategy(measurement: Mapping[str, Any], model: nn.Module, bpw: float) -> list[dict[str, Any]]:
    """Per layer, the chosen option of each block (its recipe, accuracy and bits)."""
    blocks = [layer[block] for layer in measurement["layers"] for block in ("attention", "mlp")]
    picks = choose(blocks, bpw * decoder_weights(model))
    chosen = [options[index] for options, index in zip(blocks, picks)]
    return [{"attention": chosen[2 * i], "mlp": chosen[2 * i + 1]} for i in range(len(chosen) // 2)]


def quantize_model(model: nn.Module, calibration: Calibration, plan: list[dict[str, Any]], head_bits: int,
                   progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Every Linear GPTQ-quantized at its chosen recipe, fed the quantized layers' outputs; the EXL2 tensors of
    the model by checkpoint name (quantized Linears) — the other weights are the caller's."""
    runner = LayerRunner(model, calibration.length)
    states = embed(model, calibration)
    tensors: dict[str, torch.Tensor] = {}
    layers = model.model.layers
    for index, layer in enumerate(layers):
        prepared, _, _ = _hessians(runner, layer, states)
        for block in ("attention", "mlp"):
            owner = "self_attn" if block == "attention" else "mlp"
            for name, module in _linears(layer, block).items():
                qparams = QParams.from_dict(plan[index][block]["recipe"][name])
                result = quantize_linear(module.weight, prepared[name], qparams)
                for suffix, tensor in result.tensors(module.bias).items():
                    tensors[f"model.layers.{index}.{owner}.{name}.{suffix}"] = tensor
                module.weight.data = result.weight          # the next layers see this layer quantized
        states = runner.mlp(layer, runner.attention(layer, states))
        if progress:
            progress(index + 1, len(layers) + 1)
    if head_bits != 16:
        hessian = Hessian(model.lm_head.in_features)
        with torch.no_grad():
            for row in states:
                hessian.add(model.model.norm(row))
        head = model.lm_head.weight.detach().clone()
        result = quantize_linear(head, prepare(hessian.matrix()), HEAD_OPTIONS[head_bits])
        tensors.update({f"lm_head.{suffix}": tensor for suffix, tensor in result.tensors().items()})
    if progress:
        progress(len(layers) + 1, len(layers) + 1)
    return tensors


def describe(plan: list[dict[str, Any]], model: nn.Module) -> list[dict[str, Any]]:
    """The strategy as config.json records it: per layer and block, its accuracy, bits per weight, recipe."""
    described = []
    for layer, chosen in zip(model.model.layers, plan):
        entry = {}
        for block, option in chosen.items():
            numel = sum(module.weight.numel() for module in _linears(layer, block).values())
            entry[block] = {"accuracy": round(option["accuracy"], 6), "bpw": round(option["total_bits"] / numel, 4),
                            "recipe": option["recipe"]}
        described.append(entry)
    return described


def achieved_bpw(plan: list[dict[str, Any]], model: nn.Module) -> float:
    return sum(layer[block]["total_bits"] for layer in plan for block in layer) / decoder_weights(model)

"""Quantizer ``exl2``: a model into an EXL2 folder exllamav2 loads, and EXL2 folders loaded into enigma."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from enigma.errors import BadRequestError, NotAvailableError
from enigma_exl2 import __version__

log = logging.getLogger(__name__)

OPTIONS = {
    "bpw": "target bits per weight of the decoder layers, 2.5 to 8.0 (default 4.0)",
    "head_bits": "bits of the output head: 2, 3, 4, 5, 6, 8, or 16 to keep it in float16 (default 6)",
    "calibration": "calibration text files (.txt, or .jsonl with a text field); default: the Python docs' tutorial",
    "calibration_texts": "calibration texts themselves (Python: a list of strings), instead of files",
    "calibration_rows": "calibration rows (default 32)",
    "calibration_length": "tokens per calibration row (default 512, at most the model's context)",
    "measurement": "a measurement.json from an earlier conversion of the same model: skips measuring",
    "work_dir": "where the resumable measurement is kept (default: enigma's cache folder)",
}


class EXL2Quantizer:
    """exllamav2's EXL2: per-layer mixed-bit GPTQ chosen by measurement to meet a bits-per-weight target."""

    def types(self) -> Mapping[str, str]:
        return {"EXL2": "exllamav2's mixed-bit GPTQ at a target bits per weight (--bpw 2.5..8.0, calibrated)"}

    def quantize(self, model: Any, *, type: str, output: Path, options: Mapping[str, Any],
                 progress: Callable[[int, int], None] | None = None) -> None:
        from safetensors.torch import save_file

        from enigma.paths import get_paths
        from enigma_exl2 import convert

        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise BadRequestError(f"exl2 takes no option {', '.join(unknown)}; it takes {', '.join(OPTIONS)}")
        if type.upper() != "EXL2":
            raise BadRequestError(f"exl2 makes type EXL2, not {type!r}")
        bpw = float(options.get("bpw", 4.0))
        head_bits = int(options.get("head_bits", 6))
        convert.check_target(bpw, head_bits)
        if model.quantization is not None and model.quantization.upper() not in ("F32", "F16", "BF16"):
            raise NotAvailableError(f"{model.folder} is quantized already ({model.quantization}); EXL2 is made "
                                    "from float weights")
        architecture = (model.hf_config.get("architectures") or ["?"])[0]
        convert.check_model(model.module_tree(), architecture)
        loaded = model.load(dtype="float32")
        calibration = _calibration(model, options)
        net = loaded.model
        layers = net.num_layers
        key = convert.fingerprint(model.folder, model.hf_config, calibration)
        work = Path(options.get("work_dir") or get_paths().cache_dir / "exl2" / key)
        reused = options.get("measurement")
        steps = 2 * layers + 1 if reused is None else layers + 1
        report = (lambda done, total, offset=0: progress(offset + done, steps)) if progress else None
        if reused is not None:
            measurement = _read_measurement(Path(reused), layers)
        else:
            measurement = convert.measure(net, calibration, work, key, progress=report)
        plan = convert.strategy(measurement, net, bpw)
        achieved = convert.achieved_bpw(plan, net)
        log.info("EXL2 strategy: %.3f bpw for a target of %.2f", achieved, bpw)
        offset = 0 if reused is not None else layers
        tensors = convert.quantize_model(net, calibration, plan, head_bits,
                                         progress=(lambda d, t: report(d, t, offset)) if report else None)
        quantized = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".q_weight")}
        for name, tensor in net.checkpoint_tensors().items():
            module = name.rsplit(".", 1)[0]
            if module not in quantized and name not in tensors:
                tensors[name] = tensor.detach().to(torch.float16).contiguous()
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(output / convert.OUTPUT_FILE),
                  metadata={"format": "pt"})
        (output / convert.MEASUREMENT_FILE).write_text(json.dumps(measurement, indent=1) + "\n", encoding="utf-8")
        config = {**model.hf_config, "torch_dtype": "float16", "quantization_config": {
            "quant_method": "exl2", "type": "EXL2", "version": f"enigma-plugin-exl2 {__version__}",
            "bits": bpw, "head_bits": head_bits, "calibration": calibration.describe(),
            "achieved_bpw": round(achieved, 4), "strategy": convert.describe(plan, net)}}
        (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if reused is None:
            shutil.rmtree(work, ignore_errors=True)           # the measurement now lives in the output

    def transform(self, model: nn.Module, *, context: Any) -> None:
        swap_exl2_modules(model, context.folder)


def _calibration(model: Any, options: Mapping[str, Any]) -> Any:
    from enigma.tokenizer import Tokenizer
    from enigma_exl2.calibration import DEFAULT_LENGTH, DEFAULT_ROWS, calibration_rows, read_texts

    if options.get("calibration_texts") is not None:
        texts, dataset = [str(t) for t in options["calibration_texts"]], "texts"
    else:
        paths = options.get("calibration")
        texts, dataset = read_texts([paths] if isinstance(paths, (str, Path)) else paths)
    length = int(options.get("calibration_length", DEFAULT_LENGTH))
    context = int(model.hf_config.get("max_position_embeddings") or length)
    return calibration_rows(Tokenizer(model.folder), texts, rows=int(options.get("calibration_rows", DEFAULT_ROWS)),
                            length=min(length, context), dataset=dataset)


def _read_measurement(path: Path, layers: int) -> dict[str, Any]:
    from enigma_exl2.convert import MEASUREMENT_VERSION

    try:
        measurement = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadRequestError(f"measurement {path} cannot be read ({exc}); give the measurement.json of an "
                              "earlier EXL2 conversion") from None
    if measurement.get("version") != MEASUREMENT_VERSION:
        raise BadRequestError(f"measurement {path} is of another version of the EXL2 ladder; measure again")
    if len(measurement.get("layers", ())) != layers:
        raise BadRequestError(f"measurement {path} covers {len(measurement.get('layers', ()))} layers; this "
                              f"model has {layers}: it was made for another model")
    return measurement


def swap_exl2_modules(model: nn.Module, folder: Path) -> int:
    """Replace each Linear whose ``<name>.q_weight`` the folder's safetensors hold with an
    :class:`~enigma_exl2.kernels.EXL2Linear` of those shapes; returns how many."""
    from safetensors import safe_open

    from enigma_exl2.kernels import EXL2Linear

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.q_weight" not in shapes:
            continue
        qrows, columns = shapes[f"{name}.q_weight"]
        if columns < module.out_features or columns % 32:
            raise BadRequestError(f"{folder}: {name}.q_weight has {columns} columns for {module.out_features} "
                                  "outputs; the file is not an EXL2 model of this config.json")
        replacement = EXL2Linear(module.in_features, module.out_features, qrows=qrows,
                                 groups=shapes[f"{name}.q_scale_max"][0], bias=f"{name}.bias" in shapes,
                                 device="meta")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
        swapped += 1
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.q_weight" in shapes:
        model.config = attrs.evolve(config, tie_word_embeddings=False)  # the head has its own quantized copy
    if swapped == 0:
        raise BadRequestError(f"{folder} says it is EXL2 but holds no q_weight tensors; fetch the model again")
    return swapped

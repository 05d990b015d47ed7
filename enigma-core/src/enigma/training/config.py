"""What a training run is asked to do: one attrs class, from flags or a TOML file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
import cattrs

from enigma.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DTYPES = ("fp32", "bf16")


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"training option {attribute.name} = {value!r} must be greater than 0")


def _fraction(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"training option {attribute.name} = {value!r} must be in [0, 1)")


@attrs.define(kw_only=True)
class TrainConfig:
    """Every option of ``enigma train``; the same names work in ``--config train.toml``."""

    data: list[str]
    """Training files, folders or globs (.txt/.md/.rst, .jsonl, .json)."""
    model: str
    """A model folder to fine-tune, or a config.json (or a folder without weights) to train from scratch."""
    out: str
    """Where the final model (Hugging Face format) and checkpoints go."""
    tokenizer: str | None = None
    """Folder with tokenizer.json; default: the model's folder."""
    trainer: str = "sft"
    format: str = "auto"
    seq_len: int = attrs.field(default=512, validator=_positive)
    batch_size: int = attrs.field(default=8, validator=_positive)
    grad_accum: int = attrs.field(default=1, validator=_positive)
    epochs: float = attrs.field(default=1.0, validator=_positive)
    max_steps: int | None = attrs.field(default=None, validator=_positive)
    """Optimizer steps in all; overrides ``epochs``. Required when streaming."""
    lr: float = attrs.field(default=3e-4, validator=_positive)
    min_lr_ratio: float = attrs.field(default=0.1, validator=_fraction)
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    dtype: str = "fp32"
    gradient_checkpointing: str = "none"
    """``none``, ``all``, or layer indices and ranges: ``0,2,4-7``."""
    packing: bool = True
    streaming: bool = False
    shuffle_buffer: int = attrs.field(default=1024, validator=_positive)
    val_fraction: float = attrs.field(default=0.05, validator=_fraction)
    eval_interval: int = attrs.field(default=200, validator=_positive)
    eval_batches: int = attrs.field(default=20, validator=_positive)
    save_interval: int = attrs.field(default=200, validator=_positive)
    keep_checkpoints: int = attrs.field(default=1, validator=_positive)
    log_interval: int = attrs.field(default=10, validator=_positive)
    seed: int = 0
    resume: bool = False
    threads: int | None = attrs.field(default=None, validator=_positive)
    nproc: int = attrs.field(default=1, validator=_positive)
    """Processes (ranks) to start on this machine; above 1 the run is data-parallel (enigma-plugin-zero)."""
    zero: int = 0
    """ZeRO stage of a multi-process run: 0 (replicated, plain data parallelism), 1 (optimizer state
    sharded) or 2 (optimizer state and gradients sharded)."""
    save_dtype: str = "auto"
    """dtype of the saved weights: ``auto`` (the model's), fp32, bf16 or fp16."""
    options: Any = attrs.field(factory=dict)
    """The trainer's own options (``--lora-rank 8`` on the command line, ``[train.options]`` in TOML):
    a dict as read; :func:`enigma.training.train` hands the trainer an instance of the options class
    it registered (``register(name, factory, options=MyOptions)``)."""

    def __attrs_post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"training option dtype = {self.dtype!r} is not supported; choose {', '.join(DTYPES)}")
        if self.save_dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"training option save_dtype = {self.save_dtype!r}; choose auto, fp32, bf16, fp16")
        if self.zero not in (0, 1, 2):
            raise ConfigError(f"training option zero = {self.zero!r}: ZeRO stages are 0, 1 and 2")
        if self.streaming and self.max_steps is None:
            raise ConfigError("streaming data has no known length: set max_steps (--max-steps) as well")
        if not self.data:
            raise ConfigError("training option data is empty: name at least one file, folder or glob")

    @property
    def distributed(self) -> bool:
        """Whether the run spans processes: ``nproc`` or ``zero`` asked for it, or it runs as a rank of a
        job torchrun started."""
        import os

        return self.nproc > 1 or self.zero > 0 or int(os.environ.get("WORLD_SIZE", "1")) > 1

    def checkpointed_layers(self, num_layers: int) -> frozenset[int]:
        """The layer indices ``gradient_checkpointing`` names."""
        spec = self.gradient_checkpointing.strip().lower()
        if spec in ("", "none", "false", "off"):
            return frozenset()
        if spec in ("all", "true", "on"):
            return frozenset(range(num_layers))
        layers: set[int] = set()
        try:
            for part in spec.split(","):
                first, _, last = part.strip().partition("-")
                layers.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ConfigError(f"gradient_checkpointing = {self.gradient_checkpointing!r}: expected none, all, "
                              "or layer indices and ranges like 0,2,4-7") from None
        if bad := sorted(index for index in layers if not 0 <= index < num_layers):
            raise ConfigError(f"gradient_checkpointing names layers {bad}, but the model has layers "
                              f"0-{num_layers - 1}")
        return frozenset(layers)

    def to_dict(self) -> dict[str, Any]:
        return cattrs.unstructure(self)


def load_train_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file (its table ``[train]`` or the top
    level), with ``overrides`` (flags given on the command line) winning."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"training config {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"training config {path} is not valid TOML: {exc}") from exc
        values = dict(document.get("train", document))
        known = {field.name for field in attrs.fields(TrainConfig)}
        if unknown := sorted(set(values) - known):
            raise ConfigError(f"training config {path}: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        if isinstance(values.get("data"), str):
            values["data"] = [values["data"]]
    values.update({key: value for key, value in overrides.items() if value is not None})
    missing = [name for name in ("data", "model", "out") if not values.get(name)]
    if missing:
        raise ConfigError(f"training needs {', '.join(missing)}: pass --{' --'.join(missing)} or set "
                          "them in the --config file")
    try:
        return cattrs.structure(values, TrainConfig)
    except cattrs.BaseValidationError as exc:
        messages = "; ".join(str(e) for e in cattrs.transform_error(exc))
        raise ConfigError(f"training config: {messages}") from None

"""Training checkpoints: written atomically, found again to resume.

A checkpoint is a folder ``<out>/checkpoints/step-<N>/`` holding the model's
trained weights (``model.safetensors``: the parameters that require gradients
— all of them in full fine-tuning, an adapter's alone in LoRA; the frozen
rest is the base model's, loaded again on resume) and the optimizer, scheduler and RNG state
(``state.pt``, read back with ``torch.load(weights_only=True)``, which loads
tensors and plain containers only). It is written under a temporary name and
renamed into place, then ``<out>/checkpoints/latest`` is updated: a run killed
at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from enigma.errors import ConfigError
from enigma.fsutil import atomic_write_text, default_dir_mode

LATEST = "latest"


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, state: dict[str, Any], *, keep: int = 1) -> Path:
    """Write the checkpoint of ``step``; keep only the newest ``keep`` ones."""
    from safetensors.torch import save_file

    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    staging.chmod(default_dir_mode())
    try:
        save_file({name: p.detach().contiguous() for name, p in trained_parameters(model).items()},
                  str(staging / "model.safetensors"))
        torch.save(state, staging / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (require gradients), by name; a tied parameter once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoints_dir(out) / LATEST
    if not pointer.exists():
        return None
    folder = checkpoints_dir(out) / pointer.read_text().strip()
    return folder if (folder / "state.pt").exists() else None


def load_checkpoint(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the weights into ``model``; return the rest of the state."""
    from safetensors.torch import load_file

    try:
        saved = load_file(str(folder / "model.safetensors"))
        expected = trained_parameters(model)
        if set(saved) != set(expected):
            missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise RuntimeError(f"it trained other parameters than this run does (missing {missing[:3]}, "
                               f"unexpected {extra[:3]})")
        with torch.no_grad():
            for name, tensor in saved.items():
                expected[name].copy_(tensor)
        return torch.load(folder / "state.pt", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"checkpoint {folder} cannot be read ({exc}); delete it to resume from "
                          "the previous one, or start over without --resume") from exc

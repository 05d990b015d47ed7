"""enigma-plugin-dpo: Direct Preference Optimization, with TRL's losses, data forms and metric names.

``enigma train --method dpo --data prefs.jsonl --model ./sft --beta 0.1``; in
Python, the seed's ``DPOTrainer(model, tokenizer).train(preferences, epochs=3)``
is :func:`train_dpo` (``train_dpo("./sft", preferences, out="./aligned",
epochs=3)``) and :func:`dpo_loss` is the objective on its own.
"""

from enigma.lazy import lazy_exports
from enigma_dpo.options import LOSS_TYPES

_LAZY = {"PreferencePair": "enigma_dpo.data", "read_preferences": "enigma_dpo.data",
         "tokenize_pair": "enigma_dpo.data", "dpo_loss": "enigma_dpo.loss"}
"""Names imported on first use: the package is imported whenever plugins load (``enigma --help`` too), and
these modules bring torch."""

__getattr__ = lazy_exports(__name__, _LAZY)


def train_dpo(model: str, preferences: str | list, *, out: str, epochs: float = 1.0, **options: object) -> object:
    """Align ``model`` (a folder) on ``preferences`` (files, or a list of records) and write the result to
    ``out``; keyword options are ``enigma train``'s (``lr``, ``batch_size``...) and the DPO trainer's
    (``beta``, ``loss``, ``lora``...)."""
    import json
    import tempfile
    from pathlib import Path

    import attrs

    from enigma.training import train
    from enigma.training.config import TrainConfig
    from enigma_dpo.options import DPOOptions

    own = {f.name for f in attrs.fields(DPOOptions)}
    method_options = {k: v for k, v in options.items() if k in own}
    train_options = {k: v for k, v in options.items() if k not in own}
    with tempfile.TemporaryDirectory(prefix="enigma-dpo-") as scratch:
        data = preferences
        if not isinstance(preferences, str):
            path = Path(scratch) / "preferences.jsonl"
            path.write_text("".join(json.dumps(record) + "\n" for record in preferences), encoding="utf-8")
            data = str(path)
        config = TrainConfig(data=[data], model=model, out=out, trainer="dpo", epochs=epochs,
                             options=method_options, **train_options)
        return train(config)


__all__ = ["LOSS_TYPES", "PreferencePair", "dpo_loss", "read_preferences", "tokenize_pair", "train_dpo"]

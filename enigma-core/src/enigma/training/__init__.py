"""Training: the data pipeline's consumer, the reference ``sft`` trainer and its parts.

``train(config)`` runs the trainer that ``config.trainer`` names (``sft`` by
default; plugins add ``lora``, ``dpo``...) through the kernel's registry.
"""

from __future__ import annotations

from pathlib import Path

from enigma.training.config import TrainConfig, load_train_config
from enigma.training.progress import ProgressCallback, TrainProgress

__all__ = ["TrainConfig", "TrainProgress", "load_train_config", "train"]


def train(config: TrainConfig, *, progress: ProgressCallback | None = None) -> Path:
    """Run the trainer ``config.trainer`` names; return the final model folder.

    ``config.options`` (method-specific options from ``--<option>`` flags or the
    TOML file's ``[train.options]``) are checked against the options class the
    trainer registered and handed to it as an instance of that class. A run on several processes
    (``config.distributed``) goes to the ``zero`` trainer, which starts the ranks and runs the method
    in each."""
    import attrs

    from enigma.plugins import get_host

    host = get_host()
    implementation = host.select("trainer", config.trainer)
    options = trainer_options(implementation, config.options)
    if config.distributed:
        implementation = sharded_trainer(host)
    trainer = implementation.create()
    return Path(trainer.train(attrs.evolve(config, options=options), progress=progress))


def sharded_trainer(host: object) -> object:
    """The trainer that runs a method across processes (``enigma-plugin-zero``'s ``zero``)."""
    from enigma.errors import ConfigError, NotFoundError

    try:
        return host.select("trainer", "zero")
    except NotFoundError:
        raise ConfigError("training on several processes (--nproc, --zero, or under torchrun) needs "
                          "enigma-plugin-zero: pip install enigma-plugin-zero") from None


def trainer_options(implementation: object, raw: object) -> object:
    """``raw`` options structured as the trainer's registered options class (a ConfigError naming the
    trainer and its options otherwise); an empty dict for a trainer without options."""
    import attrs

    from enigma.config import Source, check_field, resolved
    from enigma.errors import ConfigError

    options_class = getattr(implementation, "options", None)
    raw = dict(raw or {}) if not attrs.has(type(raw)) else attrs.asdict(raw)
    name = getattr(implementation, "name", "?")
    if options_class is None:
        if raw:
            raise ConfigError(f"trainer {name!r} takes no options; got {', '.join(sorted(raw))}")
        return {}
    fields = attrs.fields_dict(resolved(options_class))
    prefix = name.replace("-", "_") + "_"  # --lora-rank means the lora trainer's option rank
    raw = {key.removeprefix(prefix) if key not in fields and key.removeprefix(prefix) in fields else key: value
           for key, value in raw.items()}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"trainer {name!r} has no option {', '.join(unknown)}; its options are: "
                          f"{', '.join(fields)}")
    values = {key: check_field(f"{name}.{key}", fields[key], value, Source("command line"))
              for key, value in raw.items()}
    return options_class(**values)

"""Opening a model by name the way every command does: store, package or folder, with its settings.

``enigma run``, ``enigma serve`` and anything else that opens models by name
go through :func:`open_model`: the model's folder, its store manifest (a
Modelfile's SYSTEM, TEMPLATE and PARAMETERs), an :class:`enigma.LLM` built
with the configured engine (:func:`engine_options`), and the sampling
defaults (generation_config.json, then the manifest's). A store model that
fails to load because its files are damaged says so and how to fetch it again.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class OpenedModel:
    """A model opened by name, with what its store entry and folder say about using it."""

    name: str
    llm: Any
    """The :class:`enigma.LLM`."""
    manifest: Any
    """Its :class:`enigma.store.Manifest`, or None for folders and packaged models."""
    defaults: dict[str, Any]
    """Sampling defaults: generation_config.json, then the Modelfile's PARAMETERs."""
    system: str | None
    template: str | None
    adapter: str | None = None
    """The adapter requests run with by default: its Modelfile's ADAPTER (copied into the model's folder)."""


MODELFILE_ADAPTER = "modelfile-adapter"
"""The name a Modelfile's ADAPTER is served under inside its model."""
ENGINE_KEYS = ("dtype", "backend", "scheduler", "cache", "device")


def engine_options(config: Any, **overrides: Any) -> dict[str, Any]:
    """``LLM`` keyword arguments from the ``engine.*`` settings, ``overrides`` (flags) winning when not None."""
    options = {key: config.get(f"engine.{key}") for key in ENGINE_KEYS}
    options.update({key: value for key, value in overrides.items() if value is not None})
    if options["device"] == "auto":
        options["device"] = None
    return options


def open_model(name: str, **llm_options: Any) -> OpenedModel:
    """Open ``name`` (a store name, a packaged model or a folder) as an :class:`enigma.LLM`."""
    from enigma import LLM
    from enigma.llm import resolve_model_path
    from enigma.store import Store

    folder = resolve_model_path(name)
    store = Store()
    manifest = store.manifest_for(name, folder)
    adapter = None
    if manifest is not None and manifest.adapter:
        adapter = MODELFILE_ADAPTER
        llm_options = {**llm_options, "adapters": {**llm_options.get("adapters", {}),
                                                   adapter: str(folder / manifest.adapter)},
                       "default_adapter": adapter}
    if manifest is not None and manifest.speculative and "speculative_config" not in llm_options:
        llm_options = {**llm_options, "speculative_config": dict(manifest.speculative)}
    try:
        llm = LLM(folder, served_model_name=name, **llm_options)
    except Exception as exc:
        problems = store.verify(manifest.model_name) if manifest is not None else []
        if problems:
            from enigma.pull import repull_hint
            from enigma.store import StoreError

            raise StoreError(f"model {manifest.name}:{manifest.tag} is corrupt ({'; '.join(problems)}); "
                             f"fetch it again: `{repull_hint(manifest)}`") from exc
        raise
    defaults = {} if llm.loaded.is_embedding_model else dict(llm.sampling_defaults())
    if manifest is not None:
        defaults.update(manifest.defaults)
    return OpenedModel(name=name, llm=llm, manifest=manifest, defaults=defaults,
                       system=manifest.system if manifest else None,
                       template=manifest.template if manifest else None, adapter=adapter)

"""Ollama-style Modelfiles: a model, plus a system prompt, template and default parameters.

    FROM enigma-tiny                 # a store model, a model folder, or a GGUF file (ggml plugin)
    SYSTEM You answer in one line.
    PARAMETER temperature 0.7
    PARAMETER stop "<|im_end|>"
    TEMPLATE \"\"\"{% for m in messages %}...{% endfor %}\"\"\"
    ADAPTER ./my-lora                # needs the lora plugin
    LICENSE \"\"\"...\"\"\"

Instructions are case-insensitive; ``#`` starts a comment line; values may be
wrapped in triple quotes to span lines. TEMPLATE is a Jinja chat template (the
Hugging Face format), not Ollama's Go template.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import BadRequestError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_DIR = "adapter"
"""Where a Modelfile's ADAPTER is copied inside the model's store folder (the manifest's ``adapter``)."""
INSTRUCTIONS = ("FROM", "SYSTEM", "TEMPLATE", "PARAMETER", "ADAPTER", "LICENSE")
PARAMETERS: dict[str, tuple[str, type]] = {
    # Modelfile name: (SamplingParams field, type)
    "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "min_p": ("min_p", float), "seed": ("seed", int), "num_predict": ("max_tokens", int),
    "max_tokens": ("max_tokens", int), "repeat_penalty": ("repetition_penalty", float),
    "repetition_penalty": ("repetition_penalty", float), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "stop": ("stop", str),
}
ENGINE_PARAMETERS: dict[str, tuple[str, type]] = {
    # Modelfile name: (SpeculativeConfig field, type): how the model is served, not how requests sample
    "draft": ("model", str), "num_speculative_tokens": ("num_speculative_tokens", int),
}


@attrs.define
class Modelfile:
    """A parsed Modelfile."""

    source: str
    from_: str | None = None
    system: str | None = None
    template: str | None = None
    license: str | None = None
    adapter: str | None = None
    parameters: dict[str, Any] = attrs.field(factory=dict)
    """SamplingParams field -> value (``stop`` is a list)."""
    speculative: dict[str, Any] = attrs.field(factory=dict)
    """SpeculativeConfig fields (``PARAMETER draft``, ``PARAMETER num_speculative_tokens``)."""


def parse_modelfile(text: str, *, source: str = "Modelfile") -> Modelfile:
    """Parse a Modelfile; errors name the line."""
    result = Modelfile(source=source)
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index].strip()
        index += 1
        if not line or line.startswith("#"):
            continue
        instruction, _, value = line.partition(" ")
        keyword = instruction.upper()
        if keyword not in INSTRUCTIONS:
            raise BadRequestError(f"{source}:{number}: unknown instruction {instruction!r}; "
                                  f"use one of {', '.join(INSTRUCTIONS)}")
        value = value.strip()
        if value.startswith('"""'):
            body = value[3:]
            while '"""' not in body:
                if index >= len(lines):
                    raise BadRequestError(f"{source}:{number}: the triple-quoted {keyword} value is never closed")
                body += "\n" + lines[index]
                index += 1
            value = body[: body.index('"""')]
        if not value and keyword != "SYSTEM":
            raise BadRequestError(f"{source}:{number}: {keyword} needs a value")
        if keyword == "FROM":
            result.from_ = value
        elif keyword == "SYSTEM":
            result.system = value
        elif keyword == "TEMPLATE":
            result.template = value
        elif keyword == "LICENSE":
            result.license = value
        elif keyword == "ADAPTER":
            result.adapter = value
        else:
            _add_parameter(result, value, f"{source}:{number}")
    if result.from_ is None:
        raise BadRequestError(f"{source}: no FROM instruction; a Modelfile starts with FROM <model>")
    if result.speculative:
        from enigma.speculative import SpeculativeConfig

        if "model" not in result.speculative:
            raise BadRequestError(f"{source}: PARAMETER num_speculative_tokens needs PARAMETER draft (a draft "
                                  "model, [ngram] or [self])")
        try:
            SpeculativeConfig.build(speculative_config=result.speculative)
        except BadRequestError as exc:
            raise BadRequestError(f"{source}: {exc}") from None
    return result


def _add_parameter(result: Modelfile, value: str, where: str) -> None:
    try:
        parts = shlex.split(value)
    except ValueError as exc:
        raise BadRequestError(f"{where}: cannot read PARAMETER {value!r} ({exc})") from None
    if len(parts) != 2:
        raise BadRequestError(f"{where}: PARAMETER takes a name and one value, as in PARAMETER temperature 0.7")
    name, raw = parts[0].lower(), parts[1]
    if name in ENGINE_PARAMETERS:
        field, kind = ENGINE_PARAMETERS[name]
        try:
            result.speculative[field] = kind(raw)
        except ValueError:
            raise BadRequestError(f"{where}: parameter {name} needs a {kind.__name__}, got {raw!r}") from None
        return
    if name not in PARAMETERS:
        known = ", ".join(sorted([*PARAMETERS, *ENGINE_PARAMETERS]))
        raise BadRequestError(f"{where}: unknown parameter {parts[0]!r}; known: {known}")
    field, kind = PARAMETERS[name]
    try:
        converted = kind(raw)
    except ValueError:
        raise BadRequestError(f"{where}: parameter {name} needs a {kind.__name__}, got {raw!r}") from None
    if field == "stop":
        result.parameters.setdefault("stop", []).append(converted)
    else:
        result.parameters[field] = converted
    from enigma.sampling import SamplingParams

    try:
        SamplingParams(**result.parameters)
    except BadRequestError as exc:
        raise BadRequestError(f"{where}: {exc}") from None


def read_modelfile(path: str | Path) -> Modelfile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadRequestError(f"Modelfile {path} does not exist") from None
    return parse_modelfile(text, source=str(path))


def create_from_modelfile(name: str, path: str | Path, *, store: Any = None) -> Any:
    """Build the store model ``name`` that a Modelfile describes; return its manifest."""
    from enigma.errors import NotFoundError
    from enigma.llm import resolve_model_path
    from enigma.plugins import get_host
    from enigma.store import ModelName, Store

    spec = read_modelfile(path)
    store = store or Store()
    target = ModelName.parse(name)
    registry = get_host().registry
    base = spec.from_
    assert base is not None
    local = (Path(path).parent / base).expanduser()
    if local.is_file() or base.lower().endswith(".gguf"):
        if not local.is_file():
            raise NotFoundError(f"{spec.source}: FROM {base}: there is no file {local}")
        import tempfile

        from enigma.model_files import import_model_file

        with tempfile.TemporaryDirectory(prefix="enigma-import-") as scratch:
            import_model_file(local, scratch)
            return _create(spec, Path(path), target, Path(scratch), store, registry, base=str(local.resolve()))
    folder = resolve_model_path(local if local.is_dir() else base)
    return _create(spec, Path(path), target, folder, store, registry, base=base)


def _create(spec: Modelfile, path: Path, target: Any, folder: Path, store: Any, registry: Any, *,
            base: str) -> Any:
    from enigma.errors import NotAvailableError, NotFoundError
    from enigma.pull import needed

    if spec.adapter and not any(impl.name == "lora" for impl in registry.implementations()):
        raise NotAvailableError(f"{spec.source}: ADAPTER needs the lora plugin (pip install enigma-plugin-lora)")
    inherited: dict[str, Any] = {}
    original = store.manifest_for(base, folder)
    if original is not None:
        inherited = {"system": original.system, "template": original.template,
                     "defaults": dict(original.defaults), "license": original.license,
                     "speculative": dict(original.speculative)}
    if spec.template is not None:
        _check_template(spec.template, spec.source)
    defaults = {**inherited.get("defaults", {}), **spec.parameters}
    speculative = {**inherited.get("speculative", {}), **spec.speculative}
    draft = speculative.get("model")
    if draft is not None and (Path(path).parent / draft).expanduser().is_dir():  # a folder beside the Modelfile
        speculative["model"] = str((Path(path).parent / draft).expanduser().resolve())
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and needed(str(p.relative_to(folder)), local=True))
    extra = {}
    if spec.adapter:
        adapter_folder = (Path(path).parent / spec.adapter).expanduser()
        missing = [n for n in ADAPTER_FILES if not (adapter_folder / n).is_file()]
        if missing:
            raise NotFoundError(f"{spec.source}: ADAPTER {spec.adapter} is not a LoRA adapter folder in PEFT's "
                                f"format (it lacks {', '.join(missing)})")
        extra = {f"{ADAPTER_DIR}/{n}": adapter_folder / n for n in ADAPTER_FILES}
    return store.add_folder(
        target, folder, files, source=f"modelfile:{base}", extra_files=extra,
        system=spec.system if spec.system is not None else inherited.get("system"),
        template=spec.template if spec.template is not None else inherited.get("template"),
        defaults=defaults, adapter=ADAPTER_DIR if spec.adapter else None, speculative=speculative,
        **({"license": spec.license or inherited.get("license")} if (spec.license or inherited.get("license"))
           else {}))


def _check_template(template: str, source: str) -> None:
    from enigma.chat_template import render_chat

    try:
        render_chat(template, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except Exception as exc:
        raise BadRequestError(f"{source}: TEMPLATE is not a usable Jinja chat template ({exc})") from None

"""What to speculate with: :class:`SpeculativeConfig` and how it is written.

Three draft sources, each selectable:

- ``draft``: a smaller model with the target's tokenizer (``LLM(model,
  speculative_model=DRAFT, num_speculative_tokens=k)``, ``enigma serve MODEL
  --draft DRAFT``, a Modelfile's ``PARAMETER draft DRAFT``);
- ``ngram``: prompt lookup — the tokens that followed the last occurrence of
  the context's final n-gram (``speculative_model="[ngram]"``, vLLM's spelling);
- ``self``: the target's own first layers, its final norm and head (no second
  model, no training; ``speculative_model="[self]"``).
"""

from __future__ import annotations

from typing import Any

import attrs

from enigma.errors import BadRequestError

METHODS = ("draft", "ngram", "self")
MARKERS = {"[ngram]": "ngram", "[self]": "self"}
"""``speculative_model`` values that name a method instead of a model (vLLM wrote ``[ngram]``)."""


def _positive(name: str, value: Any, low: int = 1, high: int = 32) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequestError(f"{name} = {value!r} is invalid: expected an integer in [{low}, {high}]")


@attrs.frozen(kw_only=True)
class SpeculativeConfig:
    """How the engine drafts tokens that the target model then verifies, k at a time."""

    method: str = "draft"
    """``draft`` (a second model), ``ngram`` (prompt lookup) or ``self`` (the target's first layers)."""
    model: str | None = None
    """The draft model (a folder, a store name or a packaged model) for ``method="draft"``."""
    num_speculative_tokens: int = 4
    """The most draft tokens verified per request and step (k); adaptive below it unless ``adaptive=False``."""
    prompt_lookup_max: int = 4
    """``ngram``: the longest n-gram matched (tried first)."""
    prompt_lookup_min: int = 1
    """``ngram``: the shortest n-gram matched."""
    draft_layers: int | None = None
    """``self``: how many of the target's first layers draft (default: a third of them, at least one)."""
    adaptive: bool = True
    """Choose k each step from the measured acceptance and step costs (0 when speculation does not pay)."""
    disable_by_batch_size: int | None = None
    """Stop speculating while at least this many requests run (vLLM's ``speculative_disable_by_batch_size``)."""

    def __attrs_post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadRequestError(f"speculative method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if self.method == "draft" and not self.model:
            raise BadRequestError("speculative method 'draft' needs a draft model: speculative_model=NAME_OR_FOLDER "
                                  "(or '[ngram]' for prompt lookup, '[self]' for the target's first layers)")
        _positive("num_speculative_tokens", self.num_speculative_tokens)
        _positive("prompt_lookup_max", self.prompt_lookup_max)
        _positive("prompt_lookup_min", self.prompt_lookup_min)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise BadRequestError(f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed prompt_lookup_max "
                                  f"({self.prompt_lookup_max})")
        if self.draft_layers is not None:
            _positive("draft_layers", self.draft_layers, high=1024)
        if self.disable_by_batch_size is not None:
            _positive("disable_by_batch_size", self.disable_by_batch_size, high=1 << 20)

    @classmethod
    def build(cls, speculative_model: str | None = None, num_speculative_tokens: int | None = None,
              speculative_config: SpeculativeConfig | dict[str, Any] | None = None) -> SpeculativeConfig | None:
        """The config ``LLM(...)`` and ``enigma serve`` take: ``speculative_model`` (a model, ``[ngram]`` or
        ``[self]``) with ``num_speculative_tokens``, or a ``speculative_config`` (an instance or a dict of
        its fields, vLLM's newer spelling); None when none is given."""
        if isinstance(speculative_config, SpeculativeConfig):
            return speculative_config
        fields = dict(speculative_config or {})
        if speculative_model is not None:
            marker = MARKERS.get(str(speculative_model).strip().lower())
            fields.setdefault("method", marker or "draft")
            if marker is None:
                fields.setdefault("model", str(speculative_model))
        if num_speculative_tokens is not None:
            fields["num_speculative_tokens"] = num_speculative_tokens
        if not fields:
            return None
        if "model" in fields and "method" not in fields:
            marker = MARKERS.get(str(fields["model"]).strip().lower())
            fields["method"] = marker or "draft"
            if marker is not None:
                fields.pop("model")
        try:
            return cls(**fields)
        except TypeError as exc:
            known = ", ".join(a.name for a in attrs.fields(cls))
            raise BadRequestError(f"speculative_config: {exc}; its fields are {known}") from None

"""enigma-tiny: enigma's embedded default model, contributed through the kernel's model hook.

Any package can ship a model the same way: put a Hugging Face folder in the
package and register its path under a name.
"""

from __future__ import annotations

from pathlib import Path

from enigma import hookimpl

NAME = "enigma-tiny"
DRAFT_NAME = "enigma-tiny-draft"


def model_path() -> Path:
    """The folder holding enigma-tiny's config, weights and tokenizer."""
    return Path(__file__).parent / "model"


def draft_path() -> Path:
    """The folder of enigma-tiny-draft: enigma-tiny's speculative-decoding draft (distilled from it)."""
    return Path(__file__).parent / "draft"


@hookimpl
def enigma_register_models(register):
    register(NAME, model_path, summary="5.4M-parameter Llama trained on the Python docs (offline default)")
    register(DRAFT_NAME, draft_path, summary="1.2M-parameter draft distilled from enigma-tiny, for "
                                             "`--draft enigma-tiny-draft` (speculative decoding)")

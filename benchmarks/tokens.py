"""The served model's tokenizer: counts tokens and builds prompts of exact lengths."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.errors import BenchConfigError

MAX_FIX_ROUNDS = 8


def load_tokenizer(name: str) -> Any:
    """A Hugging Face tokenizer from a directory, hub id or built-in ('pdserve:tiny')."""
    from transformers import AutoTokenizer

    from serving.model import resolve_model

    try:
        return AutoTokenizer.from_pretrained(resolve_model(name))
    except Exception as err:  # noqa: BLE001 - transformers raises many types here
        raise BenchConfigError(
            f"cannot load a tokenizer from {name!r} ({type(err).__name__}); pass "
            "--tokenizer with the served model's directory or hub id") from err


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def allowed_token_ids(tokenizer: Any) -> np.ndarray:
    """Vocabulary ids that are not special tokens (random prompts draw from these)."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special])


def random_ids(rng: np.random.Generator, allowed: np.ndarray, n: int) -> list[int]:
    return allowed[rng.integers(0, len(allowed), size=n)].tolist()


def text_of_length(tokenizer: Any, ids: list[int], rng: np.random.Generator,
                   allowed: np.ndarray) -> tuple[str, int]:
    """Decode `ids` to text that re-encodes to len(ids) tokens where possible.

    Decoding then encoding may merge or split tokens; trim or pad with fresh random
    ids and retry a few rounds. Returns the text and its actual token count.
    """
    target = len(ids)
    text = tokenizer.decode(ids)
    for _ in range(MAX_FIX_ROUNDS):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == target:
            return text, target
        if len(encoded) > target:
            encoded = encoded[:target]
        else:
            encoded = encoded + random_ids(rng, allowed, target - len(encoded))
        text = tokenizer.decode(encoded)
    return text, count_tokens(tokenizer, text)

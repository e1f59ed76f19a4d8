"""Built-in models: a Llama-architecture model with seeded random weights and a BPE
tokenizer trained offline, so that tests and demos need no download.

The text such a model writes is gibberish (its weights are random); what matters is
that it runs through the real vLLM engine, exactly like a trained model of the same
architecture, and that greedy decoding is deterministic.

`resolve_model("pdserve:tiny")` returns a local directory, building it on first use.
Any other name (a local directory or a hub id) is returned unchanged.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "pdserve:"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|end|>",
                  "<|system|>", "<|user|>", "<|assistant|>"]


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of a built-in model. `vocab_size` is the tokenizer's target size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    corpus_words: int


SPECS: dict[str, ModelSpec] = {
    # ~3M params: fast enough that a CPU test suite starts several engines.
    "tiny": ModelSpec(256, 768, 4, 4, 2, 4096, 4096, 200_000),
    # ~100M params: big enough that prefill time dominates the benchmarks.
    "bench": ModelSpec(768, 2048, 12, 12, 4, 16384, 4096, 600_000),
}


def model_cache_dir() -> Path:
    root = os.environ.get("PDSERVE_MODEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve" / "models"


def resolve_model(name: str) -> str:
    """Map a model name to what vLLM loads; builds built-in models on first use."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    size = name[len(BUILTIN_PREFIX):]
    if size not in SPECS:
        raise ValueError(f"unknown built-in model {name!r}; known: "
                         + ", ".join(BUILTIN_PREFIX + s for s in SPECS))
    target = model_cache_dir() / size
    ensure_model(target, size)
    return str(target)


def ensure_model(target: Path, size: str, seed: int = 0) -> Path:
    """Build the model at `target` unless a complete build is already there.

    Safe when several processes (replicas) ask at once: a file lock serialises them
    and the build lands by an atomic rename, so nobody sees a half-written model.
    """
    target = Path(target)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                build_model(tmp, size, seed)
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus(num_words: int, seed: int) -> list[str]:
    """Pseudo-English lines from seeded syllables: enough structure for BPE merges."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s",
              "t", "v", "w", "st", "tr", "pl", "ch", "sh", "th", "br", "gr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "m"]
    lexicon = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                              for _ in range(rng.randint(1, 3))) for _ in range(6000)})
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]  # Zipf-like
    lines, words = [], rng.choices(lexicon, weights, k=num_words)
    for start in range(0, num_words, 12):
        sentence = " ".join(words[start:start + 12])
        lines.append(sentence[:1].upper() + sentence[1:] + rng.choice([".", ".", "?", "!", ","]))
    lines += [str(n) for n in range(1000)]
    return lines


def _build_tokenizer(target: Path, spec: ModelSpec, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(spec.corpus_words, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        pad_token="<|pad|>", model_max_length=spec.max_position_embeddings)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(target)
    return fast


def build_model(target: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a complete HF model directory (config, safetensors, tokenizer) to `target`.

    Deterministic: the same size and seed give the same weights and tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SPECS[size]
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(target, spec, seed)
    eos_id = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[eos_id, end_id],
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        torch_dtype="float32", initializer_range=0.05)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    (target / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [eos_id, end_id],
         "pad_token_id": tokenizer.pad_token_id}, indent=2) + "\n")
    (target / "README.md").write_text(
        f"pdserve built-in `{size}` model: Llama architecture, random weights "
        f"(seed {seed}), {sum(p.numel() for p in model.parameters()):,} parameters.\n"
        "Its output is gibberish by construction; it exists to exercise the engine.\n")
    return target

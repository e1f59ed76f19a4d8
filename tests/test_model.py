"""The built-in model builder: offline, deterministic, loadable by transformers."""

import hashlib

import pytest

from serving.cli import main as cli_main
from serving.model import SPECS, resolve_model


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def test_make_model_is_deterministic(tmp_path):
    assert cli_main(["make-model", str(tmp_path / "a"), "--size", "tiny"]) == 0
    assert cli_main(["make-model", str(tmp_path / "b"), "--size", "tiny"]) == 0
    first, second = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(first)
    assert first == second


def test_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model("pdserve:tiny")
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Hello, my name is")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, my name is"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n") and "<|user|>\nhi<|end|>" in text
    config = AutoConfig.from_pretrained(path)
    assert config.vocab_size == len(tok)
    assert config.num_hidden_layers == SPECS["tiny"].num_hidden_layers


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(ValueError, match="pdserve:tiny"):
        resolve_model("pdserve:huge")


def test_other_names_pass_through():
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"

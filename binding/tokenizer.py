"""The CLIP tokenizer, available offline.

No installed package ships CLIP's vocab.json/merges.txt and the hub is not always reachable, so a copy
converted from OpenAI's own BPE file lives in ``assets/clip-tokenizer``. It is used whenever a model
folder brings no tokenizer of its own, so prompt analysis never needs the network.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip-tokenizer"
MAX_LENGTH = 77  # CLIP's context: SOT + 75 pieces + EOT
# SDXL's second tokenizer pads with "!" (id 0) instead of EOT: its text encoder saw that padding in training.
SDXL_PAD_TOKEN = "!"
N_MERGES = 48894  # lines 1..48894 of OpenAI's file (after its header) are the merges CLIP uses


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table, in CLIP's vocabulary order."""
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
    return {b: chr(c) for b, c in zip(printable, codes)}


def convert_openai_bpe(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """Write vocab.json and merges.txt in the Hugging Face format from ``bpe_simple_vocab_16e6.txt.gz``."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return out


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None, pad_token: str | None = None):
    """A fast CLIP tokenizer (it gives character offsets) from ``path`` or the shipped copy; ``pad_token``
    replaces the padding token (EOT by default)."""
    from transformers import CLIPTokenizerFast

    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizerFast.from_pretrained(str(path or ASSET_DIR), model_max_length=MAX_LENGTH, **extra)


_BYTE_OF = {ch: b for b, ch in _bytes_to_unicode().items()}
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def readable_token(token: str) -> str:
    """A CLIP piece as a person reads it: byte-level characters decoded ("cafÃ©</w>" -> "café</w>")."""
    if token in _SPECIAL:
        return token
    body, end = (token[:-4], "</w>") if token.endswith("</w>") else (token, "")
    if any(ch not in _BYTE_OF for ch in body):
        return token
    return bytes(_BYTE_OF[ch] for ch in body).decode("utf-8", errors="replace") + end

"""Fingerprints: of the tokenizer, which teacher and student compare before the first batch, and of
a model's weights, which names the teacher's revision (in ``Info`` and in a signal cache's manifest).

Teacher and student must map text to the same ids: the teacher publishes this fingerprint in
``Info.tokenizer_hash`` and the client refuses a teacher whose fingerprint differs from its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of everything that maps text to ids, for a fast (Rust-backed) HF tokenizer.

    Hashed: the model (vocab sorted by id, merges as pairs, options), normaliser, pre-tokeniser,
    added tokens, and the bos/eos/pad/unk tokens with their ids. Runtime settings (padding,
    truncation, post-processing) are left out, so a saved and reloaded tokenizer has the same
    fingerprint, and one trained on other text or to another size does not. ``tokenizer`` needs
    ``backend_tokenizer`` (``PreTrainedTokenizerFast``) and ``convert_tokens_to_ids``.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = dict(spec["model"])
    model["vocab"] = sorted(model.get("vocab", {}).items(), key=lambda item: item[1])
    model["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    special = {
        name: (token, tokenizer.convert_tokens_to_ids(token))
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (token := getattr(tokenizer, name, None)) is not None
    }
    canonical = {
        "model": model,
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "added_tokens": sorted((t["id"], t["content"], t["special"]) for t in spec.get("added_tokens", [])),
        "special_tokens": special,
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def weights_digest(directory: Path) -> str:
    """sha256 over the model's weight files in ``directory`` (names and contents, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()

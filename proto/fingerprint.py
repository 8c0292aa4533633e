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


class TeacherMismatchError(ValueError):
    """The teacher's vocabulary or tokenizer is not the student's."""


def check_same_tokenizer(teacher: str, teacher_vocab: int, teacher_hash: str, student_vocab: int | None,
                         student_hash: str) -> None:
    """The one compatibility check between a teacher (a server's ``Info``, a local model, a signal
    cache's manifest) and the student: the same vocabulary width, and the same tokenizer fingerprint
    when both sides have one (an empty hash is unknown and skips that part). ``teacher`` names it in
    the message. Raises :class:`TeacherMismatchError`."""
    if student_vocab is not None and teacher_vocab != student_vocab:
        raise TeacherMismatchError(
            f"teacher {teacher} scores a vocabulary of {teacher_vocab} tokens, the student's has {student_vocab}: "
            "teacher and student must share a tokenizer")
    if teacher_hash and student_hash and teacher_hash != student_hash:
        raise TeacherMismatchError(
            f"teacher {teacher} uses another tokenizer (fingerprint {teacher_hash[:12]}..., the student's is "
            f"{student_hash[:12]}...): teacher and student must share a tokenizer")


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

"""Prompt/response pairs built from play text, since no instruction dataset ships in a package.

A play is a sequence of speeches: a paragraph whose first line is the speaker's name in capitals
ending with a period (``DUKE.``), followed by the speech. Each pair of consecutive speeches by
different speakers becomes one record::

    {"prompt": "DUKE: Hapless Aegeon, ...\\nGAOLER:", "response": " I will, my lord."}

so the student learns to answer a cue in the voice of the next speaker, and only the answer is
distilled (the prompt's targets are masked in :class:`~atkd.student.data.examples.InstructionData`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

_SPEAKER = re.compile(r"^([A-Z][A-Z' ]{1,30})\.$")


def speeches(text: str) -> list[tuple[str, str]]:
    """``(speaker, speech)`` of every paragraph that opens with a speaker line; lines joined by spaces."""
    found = []
    for paragraph in text.split("\n\n"):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if len(lines) >= 2 and (match := _SPEAKER.match(lines[0])):
            found.append((match[1].title(), " ".join(line for line in lines[1:] if line)))
        elif paragraph.strip():
            found.append(("", ""))  # stage directions, scene titles: a break in the dialogue
    return found


def dialogue_pairs(text: str, max_chars: int = 240) -> list[dict[str, str]]:
    """Records for each cue and reply by two different speakers, both at most ``max_chars`` long."""
    records = []
    said = speeches(text)
    for (cue_by, cue), (reply_by, reply) in zip(said, said[1:], strict=False):
        if cue_by and reply_by and cue_by != reply_by and len(cue) <= max_chars and len(reply) <= max_chars:
            records.append({"prompt": f"{cue_by}: {cue}\n{reply_by}:", "response": f" {reply}"})
    return records


def write_jsonl(records: Iterable[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def instruction_task(directory: Path, max_chars: int = 80, eval_every: int = 10) -> dict[str, Path]:
    """The default instruction task of the demo and the tests: the dialogue of the shipped excerpt as prompts
    with their real replies (:func:`dialogue_pairs`), every ``eval_every``-th pair held out. Every data source
    runs on it: the dataset's responses are real, and the prompts are there for teacher and student to answer.
    Returns ``{"train": path, "eval": path}`` of the two JSONL files written to ``directory``."""
    from .corpus import EXCERPT_PATH

    records = dialogue_pairs(EXCERPT_PATH.read_text(encoding="utf-8"), max_chars=max_chars)
    directory = Path(directory)
    return {"train": write_jsonl([r for i, r in enumerate(records) if i % eval_every], directory / "train.jsonl"),
            "eval": write_jsonl(records[::eval_every], directory / "eval.jsonl")}

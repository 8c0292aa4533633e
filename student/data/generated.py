"""Teacher responses generated once for a prompt set (SeqKD offline), written by ``atkd-student generate``.

A directory holds

- ``generations.jsonl``: one record per prompt, in the prompt set's order:
  ``{"index", "prompt", "response", "response_ids", "stopped"}``, where ``response_ids`` are the teacher's new
  tokens (the stop token included when ``stopped``) and ``response`` their text; so the file is also an
  instruction dataset (prompt / response) in its own right;
- ``manifest.json``: what it was made from (:class:`GenerationManifest`: the teacher, the tokenizer, a
  fingerprint of the prompts, the sampling options and seed) and whether it is ``complete``.

Writing is resumable: prompts go out in blocks of ``block_size``; each block's records are appended and
flushed together, and a restarted run keeps the whole blocks on disk (a torn last line is cut), checks that
its manifest matches, and continues with the next block. Prompt i is sampled with seed ``seed + i`` whatever
the block, so an interrupted and resumed run writes the same file as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .examples import InstructionData, pair_window

RECORDS = "generations.jsonl"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class GenerationMismatchError(ValueError):
    """Generations on disk were made for other prompts, another tokenizer or other options."""


@dataclass(frozen=True)
class GenerationManifest:
    teacher_model_id: str
    teacher_revision: str
    tokenizer_hash: str
    vocab_size: int
    prompts_fingerprint: str
    num_prompts: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    greedy: bool
    seed: int
    block_size: int
    complete: bool = False
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        path = Path(directory) / MANIFEST
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        partial.replace(path)

    @classmethod
    def read(cls, directory: Path) -> GenerationManifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no generations at {directory} ({MANIFEST} missing: run `atkd-student generate`)")
        return cls(**json.loads(path.read_text()))


def prompt_ids(examples: InstructionData) -> list[list[int]]:
    """Each example's prompt tokens (as its window holds them)."""
    return [examples.input_ids[row, : min(int(n), examples.seq_len)].tolist()
            for row, n in enumerate(examples.prompt_lengths)]


def prompts_fingerprint(prompts: Sequence[Sequence[int]]) -> str:
    """sha256 of the prompt token ids, in order."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps(list(prompt)).encode() + b"\n")
    return digest.hexdigest()


def write_generations(
    out_dir: Path,
    manifest: GenerationManifest,
    prompts: Sequence[Sequence[int]],
    texts: Sequence[str],
    generate: Callable[[Sequence[Sequence[int]], int], list],
    decode: Callable[[list[int]], str],
    progress: Callable[[int], None] | None = None,
) -> GenerationManifest:
    """Generate the responses of ``prompts`` (``texts``: their strings) into ``out_dir``, resuming a run cut short.

    ``generate(block_prompts, seed)`` returns one object with ``token_ids`` and ``stopped`` per prompt, seeded
    ``seed + i`` for its prompt i; ``decode`` turns ids into text. Raises :class:`GenerationMismatchError`
    when ``out_dir`` holds generations made with another manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / RECORDS
    done = 0
    if (out_dir / MANIFEST).is_file():
        found = GenerationManifest.read(out_dir)
        if dataclasses.replace(found, complete=False) != manifest:
            raise GenerationMismatchError(f"{out_dir} holds generations made with other settings "
                                          f"({_first_difference(found, manifest)}): use another directory")
        done = _keep_whole_blocks(records_path, manifest.block_size)
    else:
        records_path.write_text("")
    manifest.write(out_dir)
    if progress:
        progress(done)
    with records_path.open("a", encoding="utf-8") as out:
        for start in range(done, len(prompts), manifest.block_size):
            block = prompts[start:start + manifest.block_size]
            lines = []
            for offset, generation in enumerate(generate(block, (manifest.seed + start) % 2**64)):
                index = start + offset
                ids = list(generation.token_ids)
                text_ids = ids[:-1] if generation.stopped else ids
                lines.append(json.dumps({"index": index, "prompt": texts[index], "response": decode(text_ids),
                                         "response_ids": ids, "stopped": generation.stopped}) + "\n")
            out.write("".join(lines))
            out.flush()
            if progress:
                progress(len(block))
    manifest = dataclasses.replace(manifest, complete=True)
    manifest.write(out_dir)
    return manifest


def _keep_whole_blocks(path: Path, block_size: int) -> int:
    """Cut ``path`` back to its whole blocks of records (a run killed mid-write leaves a torn line or part of a
    block); returns the number of records kept."""
    if not path.is_file():
        path.write_text("")
        return 0
    lines = path.read_text(encoding="utf-8").split("\n")
    whole = lines[:-1]  # the last element is "" after a final newline, else a torn line
    keep = len(whole) // block_size * block_size
    path.write_text("".join(line + "\n" for line in whole[:keep]), encoding="utf-8")
    return keep


def _first_difference(found: GenerationManifest, wanted: GenerationManifest) -> str:
    for field in dataclasses.fields(GenerationManifest):
        if field.name != "complete" and getattr(found, field.name) != getattr(wanted, field.name):
            return f"{field.name}={getattr(found, field.name)!r}, this run: {getattr(wanted, field.name)!r}"
    return "no difference"


def generated_examples(examples: InstructionData, directory: Path, *, vocab_size: int,
                       tokenizer_hash: str) -> InstructionData:
    """``examples`` with every response replaced by the teacher's from ``directory`` (prompts, order, seq_len
    unchanged). Refuses an incomplete directory, or one made for other prompts or another tokenizer."""
    manifest = GenerationManifest.read(directory)
    if not manifest.complete:
        raise GenerationMismatchError(f"{directory}: the generation is incomplete: run `atkd-student generate` "
                                      "again to finish it")
    prompts = prompt_ids(examples)
    expected = dict(prompts_fingerprint=prompts_fingerprint(prompts), vocab_size=vocab_size,
                    tokenizer_hash=tokenizer_hash)
    for name, value in expected.items():
        if getattr(manifest, name) != value:
            raise GenerationMismatchError(f"generations in {directory} were made with {name}="
                                          f"{getattr(manifest, name)!r}, this run needs {value!r}")
    records = [json.loads(line) for line in (Path(directory) / RECORDS).read_text().splitlines() if line]
    generated = copy_examples(examples)
    for row, record in enumerate(records):
        generated.input_ids[row], generated.targets[row] = pair_window(
            prompts[row], record["response_ids"], examples.seq_len, examples.pad_id)
        generated.responses[row] = record["response"]
    return generated


def copy_examples(examples: InstructionData) -> InstructionData:
    """A copy whose tensors and response list may be changed without touching ``examples``."""
    copy = object.__new__(type(examples))
    copy.__dict__.update(examples.__dict__)
    copy.input_ids, copy.targets = examples.input_ids.clone(), examples.targets.clone()
    copy.responses = list(examples.responses)
    return copy

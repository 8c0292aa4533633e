"""The grid: its scales (full, quick, smoke), the methods compared, and each run's training config.

A run is (task, teacher size, method, seed, ablation). Every run of a grid trains the same student
initialisation for the same steps, batch, learning rate and schedule; only the loss, the teacher and
(for GKD) where the sequences come from differ. The same seed gives the same data order, so two
methods at one (task, teacher, seed) are a paired comparison.

Methods (``METHODS``): ``sft`` (cross entropy on the data, no teacher), ``fkl`` / ``rkl`` (token-level
forward / reverse KL to the teacher), ``gkd`` (GKD: on-policy mix, half of each batch the student's own
samples, with the generalised JSD at beta 0.5; instruction task only), and ``X_atkd`` for each: ATKD
with X as its base divergence (lam 0.2, median split, as the paper). Every teacher method reads the top-64
log-probs, the exact target log-prob and tail mass; the forward-KL ones also tail samples (``SAMPLED_TAIL``,
where the reason is measured). The ablations vary ATKD's hard-token fraction (top-k split) and lam for
``fkl_atkd`` with the middle teacher on the instruction task.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atkd.student.optim import OptimConfig
from atkd.student.trainer.config import DataConfig, LossConfig, SourceConfig, TeacherSourceConfig, TrainConfig

TASKS = ("lm", "instruction")
METHODS = ("sft", "fkl", "fkl_atkd", "rkl", "rkl_atkd", "gkd", "gkd_atkd")
ON_POLICY = frozenset({"gkd", "gkd_atkd"})  # need prompts: the instruction task only
BASE_LOSS = {"fkl": ("forward_kl", "forward"), "rkl": ("reverse_kl", "reverse"), "gkd": ("jsd", "jsd")}
ATKD_DEFAULTS = {"lam": 0.2, "hard_fraction": 0.5}
SAMPLED_TAIL = frozenset({"fkl"})
"""How the losses see the teacher's tail (the tokens outside its top-k). Forward KL is an expectation under
the teacher, so the teacher's tail samples are the right proposal: the ``fkl`` methods get
``scale.tail_samples`` of them per position (the product's default estimate, no control variate). Reverse KL
and the JSD weigh the tail by the student: with samples drawn from the teacher the importance weight
r = q / p is unbounded where the student puts mass the teacher does not. Measured on this grid (lm, teacher
t1, seed 0, 200 steps):

- RKL, 16 samples: the students exploited the estimate (integrand r log r, minimal at -1/e): loss -> 0.0004,
  test perplexity 5.7e6; RKL + ATKD 6.7e5.
- RKL, 16 samples with the control variate (integrand r log r - r + 1 >= 0): no longer negative, but spikes
  (loss 88) and test perplexity 456, worse than the initialisation's 179.
- RKL, the tail as one exact bucket (no samples: a lower bound of the tail's divergence): 130.
- FKL, 16 samples: test perplexity 81.0 without the control variate, 93.0 with it (so it is off here).

So ``rkl`` and ``gkd`` methods get the tail as one bucket."""
RUN_INDEPENDENT = frozenset({"name", "teachers", "teacher_lr", "tasks", "methods", "seeds", "ablations",
                             "ablation_teacher", "teacher_pretrain_steps", "teacher_sft_steps"})
"""Scale fields no single run's result depends on (a teacher's recipe enters through its own key)."""
ABLATIONS = ({"hard_fraction": 0.3}, {"hard_fraction": 0.7}, {"lam": 0.5}, {"lam": 0.9})


@dataclass(frozen=True)
class Scale:
    """Everything that sets a grid's size and cost. Teachers are ``{name: dims}`` (small to large) of one
    family; the student is smaller than every teacher and shares their tokenizer."""

    name: str
    teachers: dict[str, dict[str, int]]
    student: dict[str, int]
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    ablations: tuple[dict[str, float], ...] = ABLATIONS
    ablation_teacher: str = "t4"
    family: str = "llama"
    vocab_size: int = 2048
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 2e-3  # the students' and the student initialisation's, and a teacher's unless in teacher_lr
    teacher_lr: dict[str, float] = field(default_factory=dict)
    teacher_pretrain_steps: int = 1600
    teacher_sft_steps: int = 300
    student_pretrain_steps: int = 200
    steps: int = 200
    top_k: int = 64
    tail_samples: int = 16
    test_examples: int = 512  # instruction: pairs; lm: windows of seq_len tokens
    generations: int = 256  # instruction prompts answered greedily for ROUGE-L
    max_new_tokens: int = 40
    max_pairs: dict[str, int] = field(default_factory=lambda: {"train": 20000, "validation": 512, "test": 512})
    lm_source: str = "shakespeare"

    def build_key(self) -> str:
        """Hash of what the data, tokenizer and student depend on (their cache directory's name)."""
        keys = ("student", "family", "vocab_size", "seq_len", "batch_size", "lr", "student_pretrain_steps", "max_pairs",
                "lm_source")
        return _digest({key: getattr(self, key) for key in keys})

    def teacher_recipe(self, size: str) -> dict[str, Any]:
        """How the teacher ``size`` is built: its dims, steps and learning rate (``teacher_lr``, else ``lr``)."""
        return {"dims": self.teachers[size], "pretrain_steps": self.teacher_pretrain_steps,
                "sft_steps": self.teacher_sft_steps, "lr": self.teacher_lr.get(size, self.lr)}

    def teacher_key(self, size: str) -> str:
        """Hash of the build and the teacher's recipe: a teacher's directory name, so that changing one
        teacher's recipe rebuilds that teacher only."""
        return _digest({"build": self.build_key(), "teacher": self.teacher_recipe(size)})


SIZES = {"t1": dict(hidden=128, layers=2, heads=4), "t4": dict(hidden=192, layers=6, heads=6),
         "t16": dict(hidden=320, layers=8, heads=5)}  # 1.05M, 4.3M and 14.4M parameters at a 2,048 vocabulary
STUDENT = dict(hidden=64, layers=4, heads=4)  # 0.52M

GRIDS = {
    # The 14M teacher at the students' 2e-3 trained worse than the 4M one (test perplexity 62.9 vs 57.0 on the
    # plays after 1,600 steps): larger models of a family take a lower rate, as Pythia's and GPT-3's tables do.
    "full": Scale("full", SIZES, STUDENT, teacher_lr={"t16": 1e-3}),
    "quick": Scale("quick", SIZES, STUDENT, tasks=("instruction",), methods=("sft", "fkl", "fkl_atkd"), seeds=(0,),
                   ablations=(), teacher_pretrain_steps=150, teacher_sft_steps=60, student_pretrain_steps=60,
                   steps=60, test_examples=256, generations=64,
                   max_pairs={"train": 4000, "validation": 256, "test": 256}),
    "smoke": Scale("smoke", {"t1": dict(hidden=32, layers=1, heads=2), "t4": dict(hidden=64, layers=1, heads=2)},
                   dict(hidden=16, layers=1, heads=2), methods=("sft", "fkl", "fkl_atkd", "gkd_atkd"), seeds=(0,),
                   ablations=({"lam": 0.9},), vocab_size=512, seq_len=48, batch_size=4, teacher_pretrain_steps=3,
                   teacher_sft_steps=2, student_pretrain_steps=2, steps=3, top_k=16, tail_samples=4,
                   test_examples=16, generations=4, max_new_tokens=8, lm_source="excerpt",
                   max_pairs={"train": 400, "validation": 16, "test": 16}),
}


@dataclass(frozen=True)
class Run:
    task: str
    teacher: str | None  # None: sft
    method: str
    seed: int
    ablation: tuple[tuple[str, float], ...] = ()

    @property
    def run_id(self) -> str:
        parts = [self.task, self.teacher or "none", self.method, *(f"{k}{v:g}" for k, v in self.ablation),
                 f"s{self.seed}"]
        return "-".join(parts)

    def loss(self) -> LossConfig:
        if self.method == "sft":
            return LossConfig(name="sft")
        base = self.method.removesuffix("_atkd")
        name, divergence = BASE_LOSS[base]
        if not self.method.endswith("_atkd"):
            return LossConfig(name=name)
        options = {**ATKD_DEFAULTS, **dict(self.ablation)}
        split = "median" if options["hard_fraction"] == ATKD_DEFAULTS["hard_fraction"] else "topk"
        return LossConfig(name="atkd", options={"base": divergence, "lam": options["lam"], "split": split,
                                                "hard_fraction": options["hard_fraction"]})

    def config(self, scale: Scale, *, student: Path, data: dict[str, Path], output_dir: Path,
               teacher_address: str | None, threads: int = 1) -> TrainConfig:
        """The run's ``atkd-student train`` config: the student initialisation, the task's train and validation
        files, the loss, and the teacher server at ``teacher_address`` (none for sft)."""
        source = SourceConfig(name="mix", lmbda=0.5, temperature=1.0, max_new_tokens=scale.max_new_tokens) \
            if self.method in ON_POLICY else SourceConfig()
        teacher = None if self.teacher is None else TeacherSourceConfig(
            mode="remote", addresses=[teacher_address], top_k=scale.top_k,
            tail_samples=scale.tail_samples if self.method.removesuffix("_atkd") in SAMPLED_TAIL else 0,
            prefetch=2, timeout_s=120, retry_budget_s=300)
        return TrainConfig(
            student=student, output_dir=output_dir, run_name=self.run_id,
            data=DataConfig(kind="text" if self.task == "lm" else "instruction", train=[data["train"]],
                            eval=[data["validation"]], seq_len=scale.seq_len, eval_batches=8, source=source),
            teacher=teacher, loss=self.loss(), optim=OptimConfig(lr=scale.lr), batch_size=scale.batch_size,
            max_steps=scale.steps, seed=self.seed, save_every=0, keep_checkpoints=1, threads=threads,
            progress=False,
        )  # fmt: skip

    def config_hash(self, scale: Scale) -> str:
        """What a result depends on: the run's training config (paths aside), the build, its teacher's recipe
        and the evaluation's settings. A change to any reruns it (the loss's options included); a change to
        another teacher or to the grid's extent does not."""
        here = Path(".")
        config = self.config(scale, student=here, data={"train": here, "validation": here}, output_dir=here,
                             teacher_address="-").model_dump(mode="json")
        settings = {key: value for key, value in asdict(scale).items() if key not in RUN_INDEPENDENT}
        teacher = None if self.teacher is None else scale.teacher_key(self.teacher)
        return _digest({"run": asdict(self), "config": config, "build": scale.build_key(), "teacher": teacher,
                        "settings": settings})


def planned_runs(scale: Scale) -> list[Run]:
    """Every run of ``scale``: per task and seed, SFT once and each teacher method per teacher size, and the
    ablations (instruction task, ``scale.ablation_teacher``, ``fkl_atkd``). Sorted by seed, then task, then
    teacher: runs of one teacher are adjacent (one server for them), and a grid run in order has every
    configuration of seed 0 before any of seed 1."""
    runs = []
    for task in scale.tasks:
        for seed in scale.seeds:
            for method in scale.methods:
                if method in ON_POLICY and task != "instruction":
                    continue
                for teacher in [None] if method == "sft" else scale.teachers:
                    runs.append(Run(task, teacher, method, seed))
    if "instruction" in scale.tasks and scale.ablation_teacher in scale.teachers:
        for seed in scale.seeds:
            for ablation in scale.ablations:
                runs.append(Run("instruction", scale.ablation_teacher, "fkl_atkd", seed, tuple(ablation.items())))
    order = {name: i for i, name in enumerate(scale.teachers)}
    return sorted(runs, key=lambda r: (r.seed, TASKS.index(r.task), -1 if r.teacher is None else order[r.teacher]))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]

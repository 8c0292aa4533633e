"""KD losses for causal LMs: ATKD and the baselines, on dense teacher logits or compressed signals.

Conventions (all losses): ``student_logits[b, t]`` (``[B, T, V]``) predicts ``targets[b, t]``
(``[B, T]``); targets == -100 are ignored; ``teacher`` is a :data:`TeacherInput` (dense logits
``[B, T, V]``, a :class:`TeacherSignal`, or None for SFT). Every loss returns a :class:`LossResult`:
``.loss`` is a mean over valid tokens (ATKD: a weighted mix of group means), ``.stats`` its
statistics as tensors on device (ATKD's split; none for the baselines).
"""

from functools import partial

from atkd.proto.signal import TeacherSignal, compress

from .atkd import SPLIT_RULES, atkd_loss, split_hard, teacher_uncertainty
from .baselines import (
    cross_entropy,
    dkd,
    forward_kl,
    full_divergence_loss,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from .batch import TeacherInput
from .divergences import (
    DIVERGENCES,
    JSD,
    TVD,
    Divergence,
    ForwardKL,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    get_divergence,
)
from .fused_head import HeadLogits, fused_head_loss
from .result import LossFn, LossResult

#: Every loss by the name a training config uses; each is called as fn(student_logits, teacher, targets, **opts).
LOSSES: dict[str, LossFn] = {
    "atkd": atkd_loss,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "dkd": dkd,
    "sft": cross_entropy,
}

#: The losses that read no teacher signal: a run with one of them builds no teacher, whatever its config says.
NO_TEACHER = frozenset({"sft"})


#: The divergence each loss but ATKD (its ``base`` option) and SFT applies to the teacher's tail.
_TAIL_DIVERGENCE = {"forward_kl": "forward", "dkd": "forward", "reverse_kl": "reverse", "jsd": "jsd",
                    "skew_forward_kl": "skew_forward", "skew_reverse_kl": "skew_reverse", "tvd": "tvd"}


def tail_divergence(name: str, options: dict) -> Divergence | None:
    """The divergence through which loss ``name`` with ``options`` reads the teacher's tail (None: no teacher)."""
    if name == "atkd":
        return get_divergence(options.get("base", "forward"))
    return get_divergence(_TAIL_DIVERGENCE[name]) if name in _TAIL_DIVERGENCE else None


def tail_read_by_forward_kl(name: str, options: dict) -> bool:
    """Whether loss ``name`` with ``options`` reads tail samples only through a forward-KL term (ATKD with its
    forward base, forward KL, DKD; no control variate): then samples without their own log-probs
    (``tail_ids_only``) give it the same expectation and the same gradient as full samples."""
    divergence = tail_divergence(name, options)
    return divergence is not None and divergence.linear_in_teacher_logprob and not options.get("tail_control_variate")


def get_loss(name: str, **options) -> LossFn:
    """The loss called ``name`` with its keyword options bound (e.g. ``get_loss("atkd", lam=0.2)``)."""
    try:
        return partial(LOSSES[name], **options)
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


__all__ = [
    "DIVERGENCES", "JSD", "LOSSES", "NO_TEACHER", "SPLIT_RULES", "TVD", "Divergence", "ForwardKL", "LossFn",
    "LossResult", "ReverseKL", "SkewForwardKL", "SkewReverseKL", "TeacherInput", "TeacherSignal", "atkd_loss",
    "compress", "cross_entropy", "dkd", "forward_kl", "full_divergence_loss", "get_loss", "jsd", "reverse_kl",
    "skew_forward_kl", "skew_reverse_kl", "split_hard", "teacher_uncertainty", "tvd", "HeadLogits", "fused_head_loss",
    "tail_divergence", "tail_read_by_forward_kl",
]

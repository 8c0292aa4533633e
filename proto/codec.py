"""A :class:`~atkd.proto.signal.TeacherSignal` on the wire: tensors as dtype + shape + little-endian bytes, two codecs.

Every tensor travels as a ``Tensor`` message (never pickle, never repeated floats). The signal of N
scored positions (flattened, shapes ``[N]``, ``[N, k]``, ``[N, m]``) is encoded by one of two codecs;
ids take I = 2 bytes (uint16) when the vocabulary has at most 65536 entries, else 4 (int32).

``fp16`` (the default), per position ``I*k + 2k + 16`` bytes (272 at k = 64, I = 2):
    topk_ids, topk_logprobs in float16 (error <= 2^-11 |log p|), and target_logprob, uncertainty,
    tail_logprob, entropy in float32, as compress() computed them.
``q8`` (compact), per position ``I*k + k + 7`` bytes (199 at k = 64, I = 2):
    topk_ids; the two largest top-k log-probs in float16 and the other k - 2 as uint8 codes c of
    their gap below the second on a square-root grid, gap = (c / Q8_SCALE)^2: the step grows with
    the gap (half-step error sqrt(gap) / 64 nats: 0.016 at 1 nat, 0.06 at 16), so the tokens with
    most of the mass are the most precise; gaps beyond Q8_MAX_GAP = 16 nats are clamped there.
    Anchoring on the second entry keeps the shape of the non-target distribution of a confident
    position, whose top-1 is its target many nats above the rest. target_logprob and uncertainty
    travel as one float16 log-odds x = log p_g - log(1 - p_g), decoded as log p_g = -softplus(-x)
    and 1 - p_g = exp(-softplus(x)) (relative error 2^-11 |x|); tail_logprob in float16; entropy
    (a diagnostic no loss uses) as uint8 in steps of 1/16 nat up to 16 nats.
Optional tail samples add ``(I + 2) * m`` bytes (float16 log-probs) in both codecs, and with the tail
estimators of :mod:`atkd.proto.signal`: 2 bytes per sample for explicit weights (Gumbel-top-m, RS-KD),
or one log-threshold per position instead (priority sampling: 4 bytes in fp16, 2 in q8); a ragged
layout (adaptive budget, RS-KD's distinct tokens) adds a uint8 count per position and sends only the
samples used. :func:`message_payload_bytes` counts the tensor bytes of an encoded message.

The arithmetic is numpy's: the server encodes on its event loop while the engine's forward runs, and
torch would start an OpenMP team for it that competes with the forward's.

Decoding trusts nothing: a message whose tensors disagree in dtype, shape, size or number of positions,
whose ids are negative (or not below ``vocab_size`` when given), or whose values are NaN, +inf, or -inf
anywhere but the tail log-prob (log of an empty tail) raises :class:`MalformedSignal` naming the problem.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto.signal import TeacherSignal, priority_weights

#: Codec names as a client or config spells them, and their wire value.
CODECS = {"fp16": pb.CODEC_FP16, "q8": pb.CODEC_Q8}
DEFAULT_CODEC = "fp16"

#: q8 top-k codes: gap below the second top-k log-prob = (code / Q8_SCALE)^2 nats, up to Q8_MAX_GAP.
Q8_MAX_GAP = 16.0
Q8_SCALE = 255 / Q8_MAX_GAP**0.5
#: q8 entropy: uint8 in steps of Q8_ENTROPY_STEP nats.
Q8_ENTROPY_STEP = 1.0 / 16

#: Little-endian numpy dtype of every wire dtype.
_NUMPY = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_UINT16: np.dtype("<u2"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_AS_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64}
#: The largest finite float16: log-probs below -FP16_MAX are sent as -FP16_MAX (a probability of 0 either way).
FP16_MAX = float(np.finfo(np.float16).max)


class MalformedSignal(ValueError):
    """A ``Signal`` message that does not describe a valid signal."""


def codec_value(name: str) -> int:
    """Wire value of a codec name (``"fp16"`` or ``"q8"``)."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None


def codec_name(value: int) -> str:
    """Codec name of a wire value; CODEC_UNSPECIFIED is the default codec."""
    if value == pb.CODEC_UNSPECIFIED:
        return DEFAULT_CODEC
    for name, known in CODECS.items():
        if known == value:
            return name
    raise ValueError(f"unknown codec value {value}; known: {sorted(CODECS.values())}")


def id_dtype(vocab_size: int) -> int:
    """Wire dtype of token ids: uint16 when every id fits (V <= 65536), else int32."""
    return pb.DTYPE_UINT16 if vocab_size <= 1 << 16 else pb.DTYPE_INT32


def encode_tensor(values: torch.Tensor | np.ndarray, dtype: int) -> pb.Tensor:
    """A tensor or array (any device, any dtype) as wire ``dtype``: values are converted, not reinterpreted."""
    array = _numpy(values).astype(_NUMPY[dtype], copy=False)
    return pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes())


def decode_tensor(message: pb.Tensor, as_dtype: torch.dtype) -> torch.Tensor:
    """The tensor of a ``Tensor`` message, converted to ``as_dtype`` (a fresh, writable CPU tensor)."""
    return torch.from_numpy(_read(message, _AS_NUMPY[as_dtype]))


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _read(message: pb.Tensor, as_dtype: type = np.float32) -> np.ndarray:
    """The array of a ``Tensor`` message as a fresh ``as_dtype`` array; checks dtype, shape and size."""
    if message.dtype not in _NUMPY:
        raise ValueError(f"unknown tensor dtype {message.dtype}")
    dtype = _NUMPY[message.dtype]
    shape = tuple(message.shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"tensor shape {shape} has a negative size")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(message.data) != expected:
        raise ValueError(f"tensor of shape {shape} and dtype {dtype} needs {expected} bytes, got {len(message.data)}")
    return np.frombuffer(message.data, dtype=dtype).reshape(shape).astype(as_dtype)


def message_payload_bytes(message) -> int:
    """Bytes of tensor data in an encoded message (every ``Tensor`` in it, recursively)."""
    if isinstance(message, pb.Tensor):
        return len(message.data)
    return sum(message_payload_bytes(value) for field, value in message.ListFields()
               if field.message_type is not None)


def payload_bytes(codec: str, k: int, vocab_size: int, tail_samples: int = 0, tail_ids_only: bool = False) -> int:
    """Bytes of tensor data per scored position (message framing adds a constant per response); ``tail_ids_only``:
    the samples' ids and one tail mean (:func:`~atkd.proto.signal.compress`)."""
    ids = np.dtype(_NUMPY[id_dtype(vocab_size)]).itemsize
    per_codec = {"fp16": ids * k + 2 * k + 16, "q8": ids * k + 2 * min(k, 2) + max(k - 2, 0) + 5}
    if tail_ids_only:
        return per_codec[codec] + ids * tail_samples + (4 if codec == "fp16" else 2) * bool(tail_samples)
    return per_codec[codec] + (ids + 2) * tail_samples


def encode_signal(signal: TeacherSignal, codec: str, vocab_size: int) -> pb.Signal:
    """Encode a signal over N positions (``[N]`` shapes; flatten first) with ``codec``."""
    if signal.target_logprob.dim() != 1:
        raise ValueError(f"encode a flattened signal: positions {tuple(signal.positions_shape)} are not [N]")
    ids = id_dtype(vocab_size)
    message = pb.Signal(num_positions=signal.target_logprob.shape[0])
    if codec == "fp16":
        message.fp16.CopyFrom(pb.Fp16Signal(
            target_logprob=encode_tensor(signal.target_logprob, pb.DTYPE_FLOAT32),
            topk_ids=encode_tensor(signal.topk_ids, ids),
            topk_logprobs=encode_tensor(_float16_range(signal.topk_logprobs), pb.DTYPE_FLOAT16),
            tail_logprob=encode_tensor(signal.tail_logprob, pb.DTYPE_FLOAT32),
            uncertainty=encode_tensor(signal.uncertainty, pb.DTYPE_FLOAT32),
            entropy=encode_tensor(signal.entropy, pb.DTYPE_FLOAT32),
        ))  # fmt: skip
    elif codec == "q8":
        logprobs = _float16_range(signal.topk_logprobs).astype(np.float32)
        head = logprobs[:, :2].astype(np.float16)
        gaps = np.clip(head[:, -1:].astype(np.float32) - logprobs[:, 2:], 0, Q8_MAX_GAP)
        codes = np.rint(np.sqrt(gaps) * Q8_SCALE)
        with np.errstate(divide="ignore", over="ignore"):  # UnC = 0 gives x = +inf, as it should
            log_odds = _numpy(signal.target_logprob).astype(np.float64) - np.log(_numpy(signal.uncertainty))
            log_odds = log_odds.astype(np.float16)
        entropy = np.clip(np.rint(_numpy(signal.entropy) / Q8_ENTROPY_STEP), 0, 255)
        message.q8.CopyFrom(pb.Q8Signal(
            topk_ids=encode_tensor(signal.topk_ids, ids),
            topk_head_logprobs=encode_tensor(head, pb.DTYPE_FLOAT16),
            topk_rest_codes=encode_tensor(codes, pb.DTYPE_UINT8),
            target_log_odds=encode_tensor(log_odds, pb.DTYPE_FLOAT16),
            tail_logprob=encode_tensor(signal.tail_logprob, pb.DTYPE_FLOAT16),
            entropy=encode_tensor(entropy, pb.DTYPE_UINT8),
        ))  # fmt: skip
    else:
        raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    if signal.tail_sample_ids is not None:
        message.tail_samples.CopyFrom(_encode_tail(signal, codec, ids))
    return message


def _encode_tail(signal: TeacherSignal, codec: str, ids: int) -> pb.TailSamples:
    """The tail samples of a flattened signal, ragged when it carries counts (see TailSamples in the proto)."""
    columns = {"ids": signal.tail_sample_ids, "logprobs": signal.tail_sample_logprobs,
               "weights": signal.tail_sample_weights}
    message = pb.TailSamples()
    if signal.tail_sample_counts is not None:
        counts = _numpy(signal.tail_sample_counts)
        if counts.size and (counts.min() < 0 or counts.max() > signal.num_tail_samples):
            raise ValueError(f"tail_sample_counts must lie in [0, m = {signal.num_tail_samples}]")
        used = np.arange(signal.num_tail_samples) < counts[:, None]
        columns = {name: None if value is None else _numpy(value)[used] for name, value in columns.items()}
        wide = counts.size and counts.max() > 255
        message.counts.CopyFrom(encode_tensor(counts, pb.DTYPE_UINT16 if wide else pb.DTYPE_UINT8))
    message.ids.CopyFrom(encode_tensor(columns["ids"], ids))
    if signal.tail_mean_logprob is not None:  # ids only: one exact tail mean per position instead
        dtype = pb.DTYPE_FLOAT32 if codec == "fp16" else pb.DTYPE_FLOAT16
        message.mean_logprob.CopyFrom(encode_tensor(_float16_range(signal.tail_mean_logprob)
                                                    if codec == "q8" else signal.tail_mean_logprob, dtype))
    else:
        message.logprobs.CopyFrom(encode_tensor(_float16_range(columns["logprobs"]), pb.DTYPE_FLOAT16))
    if signal.tail_log_threshold is not None:  # priority sampling: the weights follow from tau
        dtype = pb.DTYPE_FLOAT32 if codec == "fp16" else pb.DTYPE_FLOAT16
        message.log_threshold.CopyFrom(encode_tensor(signal.tail_log_threshold, dtype))
    elif columns["weights"] is not None:
        message.weights.CopyFrom(encode_tensor(columns["weights"], pb.DTYPE_FLOAT16))
    return message


def _decode_tail(message: pb.TailSamples, num_positions: int, tail_logprob: torch.Tensor) -> dict:
    """TeacherSignal fields of a TailSamples message: padded ``[N, max count]`` when it is ragged."""
    ids = _read(message.ids, np.int64)
    fields, mean = {}, None
    if message.HasField("mean_logprob"):  # ids only: every sample of a position carries the tail mean
        if message.HasField("logprobs") or message.HasField("log_threshold"):
            raise ValueError("tail samples with mean_logprob carry no logprobs and no log_threshold")
        mean = _read(message.mean_logprob).astype(np.float32)
        if mean.shape != (num_positions,):
            raise ValueError(f"tail samples: mean_logprob {mean.shape} must be [{num_positions}]")
        fields["tail_mean_logprob"] = torch.from_numpy(mean)
    logprobs = _read(message.logprobs) if mean is None else np.zeros(ids.shape, np.float32)
    explicit = _read(message.weights) if message.HasField("weights") else None
    if message.HasField("counts"):
        counts = _read(message.counts, np.int64)
        if counts.shape != (num_positions,) or counts.sum() != ids.shape[0] or ids.shape != logprobs.shape:
            raise ValueError(f"ragged tail samples: counts {counts.shape} must be [{num_positions}] and sum to the "
                             f"{ids.shape[0]} samples sent")
        used = np.arange(int(counts.max(initial=0))) < counts[:, None]
        ids, logprobs, explicit = (_unflatten(column, used) for column in (ids, logprobs, explicit))
        fields["tail_sample_counts"] = torch.from_numpy(counts)
    if mean is not None:
        if ids.ndim != 2 or ids.shape[0] != num_positions:
            raise ValueError(f"tail samples: ids {ids.shape} must be [{num_positions}, m]")
        logprobs = np.ascontiguousarray(np.broadcast_to(mean[:, None], ids.shape))
    weights = None
    fields["tail_sample_ids"] = torch.from_numpy(ids)
    fields["tail_sample_logprobs"] = torch.from_numpy(logprobs)
    if message.HasField("log_threshold"):
        threshold = torch.from_numpy(_read(message.log_threshold))
        weights = priority_weights(fields["tail_sample_logprobs"], tail_logprob, threshold).numpy()
        if "tail_sample_counts" in fields:
            weights = np.where(used, weights, 0.0)  # padding weighs 0
        fields["tail_log_threshold"] = threshold
    elif explicit is not None:
        weights = explicit
    if weights is not None:
        fields["tail_sample_weights"] = torch.from_numpy(np.asarray(weights, dtype=np.float32))
    return fields


def _unflatten(column: np.ndarray | None, used: np.ndarray) -> np.ndarray | None:
    """Ragged values ``[sum counts]`` into ``[N, max count]`` (zeros past each row's count)."""
    if column is None:
        return None
    out = np.zeros(used.shape, dtype=column.dtype)
    out[used] = column
    return out

def _float16_range(values: torch.Tensor) -> np.ndarray:
    """Log-probs clipped to float16's finite range (NaN stays NaN), so that float16 never turns them into -inf."""
    return np.clip(_numpy(values), -FP16_MAX, FP16_MAX)


def decode_signal(message: pb.Signal, vocab_size: int | None = None) -> TeacherSignal:
    """The flattened :class:`TeacherSignal` ``[N]`` of a ``Signal`` message (float32, int64 ids); raises
    :class:`MalformedSignal` if the message is not a valid signal (ids must be below ``vocab_size`` if given)."""
    try:
        with np.errstate(all="ignore"):
            signal = _decode_signal(message)
        _check_values(signal, vocab_size)
    except MalformedSignal:
        raise
    except (ValueError, IndexError, TypeError, OverflowError) as error:
        raise MalformedSignal(f"malformed Signal message: {error}") from None
    return signal


def _check_values(signal: TeacherSignal, vocab_size: int | None) -> None:
    for name in ("topk_ids", "tail_sample_ids"):
        ids = getattr(signal, name)
        if ids is None or ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            raise MalformedSignal(f"malformed Signal message: {name} holds ids in [{low}, {high}], outside "
                                  f"the vocabulary [0, {vocab_size})")
    for name in ("target_logprob", "topk_logprobs", "tail_logprob", "uncertainty", "entropy", "tail_sample_logprobs",
                 "tail_sample_weights"):
        values = getattr(signal, name)
        if values is None:
            continue
        array = values.numpy()
        bad = np.isnan(array) | (array == np.inf)
        if name != "tail_logprob":
            bad |= array == -np.inf
        if bad.any():
            raise MalformedSignal(f"malformed Signal message: {name} holds non-finite values")


def _decode_signal(message: pb.Signal) -> TeacherSignal:
    f32, i64 = torch.float32, torch.int64
    payload = message.WhichOneof("payload")
    if payload == "fp16":
        body = message.fp16
        fields = dict(
            target_logprob=decode_tensor(body.target_logprob, f32),
            topk_ids=decode_tensor(body.topk_ids, i64),
            topk_logprobs=decode_tensor(body.topk_logprobs, f32),
            tail_logprob=decode_tensor(body.tail_logprob, f32),
            uncertainty=decode_tensor(body.uncertainty, f32),
            entropy=decode_tensor(body.entropy, f32),
        )
    elif payload == "q8":
        body = message.q8
        head = _read(body.topk_head_logprobs)
        rest = head[:, -1:] - np.square(_read(body.topk_rest_codes) / Q8_SCALE)
        log_odds = _read(body.target_log_odds)
        fields = dict(
            target_logprob=torch.from_numpy(-np.logaddexp(0, -log_odds)),  # -softplus(-x)
            topk_ids=decode_tensor(body.topk_ids, i64),
            topk_logprobs=torch.from_numpy(np.concatenate([head, rest], axis=1)),
            tail_logprob=decode_tensor(body.tail_logprob, f32),
            uncertainty=torch.from_numpy(np.exp(-np.logaddexp(0, log_odds))),  # exp(-softplus(x))
            entropy=torch.from_numpy(_read(body.entropy) * np.float32(Q8_ENTROPY_STEP)),
        )
    else:
        raise MalformedSignal("malformed Signal message: no payload (neither fp16 nor q8)")
    if message.HasField("tail_samples"):
        fields.update(_decode_tail(message.tail_samples, message.num_positions, fields["tail_logprob"]))
    signal = TeacherSignal(**fields)
    if signal.target_logprob.shape != (message.num_positions,):
        raise MalformedSignal(f"malformed Signal message: it announces {message.num_positions} positions but "
                              f"carries {tuple(signal.positions_shape)}")
    return signal

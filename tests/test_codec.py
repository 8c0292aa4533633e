"""proto/codec.py: tensors on the wire, the fp16 and q8 codecs, their sizes and their fidelity."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from atkd.proto import teacher_pb2 as pb
from atkd.proto.codec import (
    Q8_ENTROPY_STEP,
    Q8_MAX_GAP,
    Q8_SCALE,
    codec_name,
    codec_value,
    decode_signal,
    decode_tensor,
    encode_signal,
    encode_tensor,
    payload_bytes,
)
from atkd.proto.signal import TeacherSignal, compress
from atkd.student.losses import atkd_loss

FP16_REL = 2.0**-11  # float16 rounding, relative


def teacher_signal(scale: float, n: int = 256, vocab: int = 1000, k: int = 64, seed: int = 0, **options):
    """compress() of random teacher logits of a given sharpness, with targets drawn from the teacher
    (as real next tokens are: a teacher rarely gives its data a probability below 1e-7)."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, vocab, generator=g)
    targets = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
    return logits, targets, compress(logits, targets, k, **options)


def roundtrip(signal, codec, vocab=1000):
    return decode_signal(pb.Signal.FromString(encode_signal(signal, codec, vocab).SerializeToString()))


def test_tensors_travel_as_little_endian_bytes_with_dtype_and_shape():
    message = encode_tensor(torch.tensor([[1.0, -2.5]]), pb.DTYPE_FLOAT32)
    assert (message.dtype, list(message.shape), message.data) == (pb.DTYPE_FLOAT32, [1, 2], struct.pack("<2f", 1, -2.5))
    assert encode_tensor(torch.tensor([1, 258]), pb.DTYPE_UINT16).data == b"\x01\x00\x02\x01"
    assert encode_tensor(torch.tensor([0.5]), pb.DTYPE_FLOAT16).data == struct.pack("<e", 0.5)
    for dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_UINT8, pb.DTYPE_UINT16, pb.DTYPE_INT32, pb.DTYPE_INT64):
        values = torch.arange(12).reshape(3, 4)
        decoded = decode_tensor(pb.Tensor.FromString(encode_tensor(values, dtype).SerializeToString()), torch.int64)
        assert torch.equal(decoded, values)


def test_decoding_refuses_inconsistent_tensors():
    with pytest.raises(ValueError, match="needs 8 bytes, got 7"):
        decode_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 7), torch.float32)
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        decode_tensor(pb.Tensor(dtype=99, shape=[1], data=b"\0"), torch.float32)
    with pytest.raises(ValueError, match="no payload"):
        decode_signal(pb.Signal(num_positions=0))


def test_codec_names_and_values():
    assert codec_name(pb.CODEC_UNSPECIFIED) == "fp16"
    assert [codec_name(codec_value(name)) for name in ("fp16", "q8")] == ["fp16", "q8"]
    with pytest.raises(ValueError, match="unknown codec"):
        codec_value("int4")
    with pytest.raises(ValueError, match="unknown codec value 7"):
        codec_name(7)


def test_fp16_codec_keeps_scalars_exact_and_logprobs_to_fp16():
    _, _, signal = teacher_signal(scale=3.0)
    decoded = roundtrip(signal, "fp16")
    assert torch.equal(decoded.topk_ids, signal.topk_ids)
    for name in ("target_logprob", "tail_logprob", "uncertainty", "entropy"):
        assert torch.equal(getattr(decoded, name), getattr(signal, name)), name
    error = (decoded.topk_logprobs - signal.topk_logprobs).abs()
    assert (error <= FP16_REL * signal.topk_logprobs.abs() + 1e-7).all()


def test_q8_codec_precision_per_field():
    _, _, signal = teacher_signal(scale=4.0)
    decoded = roundtrip(signal, "q8")
    assert torch.equal(decoded.topk_ids, signal.topk_ids)
    head, rest = signal.topk_logprobs[:, :2], signal.topk_logprobs[:, 2:]
    assert ((decoded.topk_logprobs[:, :2] - head).abs() <= FP16_REL * head.abs() + 1e-7).all()
    anchor_error = FP16_REL * head[:, 1:].abs()
    gap = (head[:, 1:] - rest).clamp(max=Q8_MAX_GAP)
    bound = (gap.sqrt() + 0.01) / Q8_SCALE + anchor_error
    inside = head[:, 1:] - rest <= Q8_MAX_GAP
    assert inside.float().mean() > 0.9  # the test covers mostly unclamped gaps
    assert ((decoded.topk_logprobs[:, 2:] - rest).abs() <= bound)[inside].all()
    assert ((decoded.topk_logprobs[:, 2:] - (head[:, 1:] - Q8_MAX_GAP)).abs() <= bound)[~inside].all()
    log_odds = (signal.target_logprob - signal.uncertainty.log()).abs()
    assert ((decoded.target_logprob - signal.target_logprob).abs() <= 1.1 * FP16_REL * log_odds + 1e-6).all()
    assert ((decoded.uncertainty / signal.uncertainty).log().abs() <= 1.1 * FP16_REL * log_odds + 1e-6).all()
    assert ((decoded.tail_logprob - signal.tail_logprob).abs() <= FP16_REL * signal.tail_logprob.abs()).all()
    assert ((decoded.entropy - signal.entropy).abs() <= Q8_ENTROPY_STEP / 2 + 1e-6).all()


def test_q8_keeps_the_non_target_shape_of_confident_positions():
    """Top-1 = target 25 nats above the rest: the others are coded below the second, not the first."""
    logits, targets, _ = teacher_signal(scale=1.0, n=64)
    logits[torch.arange(64), targets] += 25.0
    signal = compress(logits, targets, 64)
    assert (signal.uncertainty < 1e-6).all()
    decoded = roundtrip(signal, "q8")
    non_target = decoded.topk_logprobs[:, 1:] - signal.topk_logprobs[:, 1:]
    assert non_target.abs().max() < 0.05


@pytest.mark.parametrize("codec", ["fp16", "q8"])
def test_tail_samples_and_empty_signals_roundtrip(codec):
    _, _, signal = teacher_signal(scale=2.0, n=32, tail_samples=5, generator=torch.Generator().manual_seed(1))
    decoded = roundtrip(signal, codec)
    assert torch.equal(decoded.tail_sample_ids, signal.tail_sample_ids)
    error = (decoded.tail_sample_logprobs - signal.tail_sample_logprobs).abs()
    assert (error <= FP16_REL * signal.tail_sample_logprobs.abs()).all()
    empty = signal.map_tensors(lambda t: t[:0])
    assert roundtrip(empty, codec).topk_ids.shape == (0, 64)


@pytest.mark.parametrize("codec, budget", [("fp16", 280), ("q8", 200)])
def test_bytes_per_token_at_k64_within_budget(codec, budget):
    """Measured on the serialised message, everything included, at V = 65536 (uint16 ids)."""
    n, vocab = 2048, 1 << 16
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(n, 64, generator=g).mul(10).sort(1).values  # sizes do not depend on the values
    signal = TeacherSignal(target_logprob=logprobs[:, 5], topk_ids=torch.randint(0, vocab, (n, 64), generator=g),
                           topk_logprobs=logprobs, tail_logprob=-torch.rand(n, generator=g),
                           uncertainty=torch.rand(n, generator=g), entropy=torch.rand(n, generator=g) * 5)
    size = encode_signal(signal, codec, vocab).ByteSize() / n
    assert payload_bytes(codec, 64, vocab) <= size <= budget
    assert size - payload_bytes(codec, 64, vocab) < 0.1  # framing is per message, not per token
    assert payload_bytes(codec, 64, vocab + 1) == payload_bytes(codec, 64, vocab) + 2 * 64  # int32 ids above 65536


@pytest.mark.parametrize("codec, max_loss_error, min_cosine", [("fp16", 1e-4, 0.99999), ("q8", 1e-2, 0.995)])
@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0])
def test_atkd_loss_and_gradient_from_decoded_signal(codec, max_loss_error, min_cosine, scale):
    """What the student sees: the ATKD loss and its gradient from the decoded vs the exact signal."""
    logits, targets, signal = teacher_signal(scale=scale, n=512)
    student = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)) * 2

    def loss_and_grad(teacher):
        x = student.clone().requires_grad_()
        loss = atkd_loss(x, teacher, targets).loss
        loss.backward()
        return loss.item(), x.grad.flatten().double()

    exact_loss, exact_grad = loss_and_grad(signal)
    loss, grad = loss_and_grad(roundtrip(signal, codec))
    assert abs(loss - exact_loss) <= max_loss_error * abs(exact_loss)
    assert torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0) >= min_cosine
    assert math.isfinite(loss)

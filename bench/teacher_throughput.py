"""Teacher service: the engine in-process vs through the gRPC server, fairness, latency, bytes and fidelity per codec.

    python -m bench.teacher_throughput [--rounds 5 --batches 8 --threads 2]

One run, one model (a randomly initialised Llama, V = 8192; random weights cost the same to run as
trained ones), one batch shape (8 x 256 tokens, top-64, fp16 codec), the same torch thread count in
the engine in-process and in the server process:
  * tokens/s of ``TeacherEngine.score`` called in-process, and through a server subprocess over
    loopback with one streaming client (3 batches in flight) and with 4 (3 in flight each); every
    server run comes right after an in-process run of the same length and the ratio is the median of
    these pairs' ratios over ``--rounds`` rounds, so that load from other processes on the machine
    hits both sides of a ratio alike;
  * server time outside the forward pass: wall time minus the engine's compute time (from the
    server's /metrics), per batch and as a share;
  * fairness of 4 equal clients: Jain's index of the tokens each got until the first one finished;
  * a light client (1 batch in flight) against a heavy one (8 in flight): the light client's median
    latency relative to its latency alone;
  * bytes per scored token of each codec and k, measured on the serialised responses, and the
    codecs' fidelity: ATKD loss and gradient from the decoded vs the exact signal, on synthetic
    teacher logits of three sharpness levels with targets drawn from the teacher.
In-process, the engine runs on one worker thread, as in the server (whose event loop stays free for
the network): on the shared 2-core VM where this was measured, the same forward called from the main
thread was up to 4x slower whenever other processes loaded the CPU, which would flatter the server.
Both processes use ``--threads`` torch threads; the client side (this process) decodes with numpy
and mostly waits, but on 2 cores its work still competes with the server's forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, LlamaConfig

from atkd.proto import teacher_pb2_grpc as pb_grpc
from atkd.proto.codec import codec_value, decode_signal, encode_signal
from atkd.proto.signal import compress
from atkd.services.teacher.engine import TeacherEngine
from atkd.services.teacher.request import Limits, parse_request
from atkd.student.client import ScoreBatch, TeacherClient
from atkd.student.demo.teacher_process import teacher_process
from atkd.student.losses import atkd_loss

VOCAB, BATCH, SEQ, TOP_K = 8192, 8, 256, 64
BATCH_TOKENS = BATCH * SEQ


def build_model(directory: Path, hidden: int, layers: int, context: int = SEQ) -> int:
    """Save a random Llama (V = 8192, ``context`` positions) to ``directory``; returns its parameter count."""
    heads = hidden // 64
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=context)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def batches(count: int, seed: int) -> list[ScoreBatch]:
    g = torch.Generator().manual_seed(seed)
    return [ScoreBatch.of(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)) for _ in range(count)]


class Server:
    """``atkd-teacher serve`` in a subprocess (the launcher the demo and the tests use: ports from its
    readiness file)."""

    def __init__(self, model_dir: Path, threads: int):
        args = ["--threads", str(threads), "--max-batch-tokens", str(BATCH_TOKENS), "--max-wait-ms", "5",
                "--top-k-max", "256", "--max-queue-tokens", str(16 * BATCH_TOKENS)]
        self._context = teacher_process(model_dir, extra_args=args)
        teacher = self._context.__enter__()
        self.address, self.http_port = teacher.address, teacher.http_port

    def metric(self, name: str) -> float:
        """The value of an unlabelled sample of the server's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics") as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return sample.value
        raise RuntimeError(f"{name} missing from /metrics")

    def compute_seconds(self) -> float:
        """Total engine time (forward + compression) so far."""
        return self.metric("atkd_teacher_forward_seconds_sum")

    def close(self) -> None:
        self._context.__exit__(None, None, None)


def in_process(engine: TeacherEngine, work: list[ScoreBatch]) -> dict:
    """The engine on one worker thread, as the server runs it (see the module docstring)."""
    limits = Limits(VOCAB, SEQ, BATCH_TOKENS, 256, 0)
    jobs = [parse_request(batch.to_request("0", top_k=TOP_K), limits)[0] for batch in work]

    def run() -> float:
        engine.score(jobs[:1])  # warm-up
        start = time.perf_counter()
        for job in jobs:
            engine.score([job])
        return time.perf_counter() - start

    with ThreadPoolExecutor(1) as worker:
        wall = worker.submit(run).result()
    return {"tok/s": len(jobs) * BATCH_TOKENS / wall, "wall": wall, "compute": wall, "batches": len(jobs)}


def through_server(server: Server, work: list[list[ScoreBatch]], in_flight: int) -> dict:
    """Each list of batches is one client's stream; returns throughput, per-client finish times, fairness."""
    done_at: list[list[float]] = [[] for _ in work]
    barrier = threading.Barrier(len(work) + 1)

    def stream(index: int) -> None:
        with TeacherClient(server.address, client_id=f"client{index}") as client:
            list(client.score_stream(work[index][:1], top_k=TOP_K))  # warm-up, connection set up
            barrier.wait()
            for _ in client.score_stream(work[index], in_flight=in_flight, top_k=TOP_K):
                done_at[index].append(time.perf_counter())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    barrier.wait()
    compute_before, start = server.compute_seconds(), time.perf_counter()
    for thread in threads:
        thread.join()
    wall = max(times[-1] for times in done_at) - start
    compute = server.compute_seconds() - compute_before
    first_finish = min(times[-1] for times in done_at)
    shares = [BATCH_TOKENS * sum(t <= first_finish for t in times) for times in done_at]
    jain = sum(shares) ** 2 / (len(shares) * sum(s * s for s in shares))
    batches_done = sum(len(times) for times in done_at)
    return {"tok/s": batches_done * BATCH_TOKENS / wall, "wall": wall, "compute": compute, "batches": batches_done,
            "jain": jain}


def light_latency(server: Server, work: list[ScoreBatch], heavy: bool) -> float:
    """Median latency of a client with 1 batch in flight, alone or next to one with 8 in flight."""
    stop = threading.Event()

    def endless():
        index = 0
        while not stop.is_set():
            yield work[index % len(work)]
            index += 1

    def heavy_stream() -> None:
        with TeacherClient(server.address, client_id="heavy") as client:
            for _ in client.score_stream(endless(), in_flight=8, top_k=TOP_K):
                pass

    background = threading.Thread(target=heavy_stream)
    latencies = []
    with TeacherClient(server.address, client_id="light") as client:
        client.score(work[0].input_ids, top_k=TOP_K)  # warm-up
        if heavy:
            background.start()
            while server.metric("atkd_teacher_queue_requests") < 6:  # the heavy client's backlog is queued
                time.sleep(0.01)
        for batch in work:
            start = time.perf_counter()
            client.score(batch.input_ids, top_k=TOP_K)
            latencies.append(time.perf_counter() - start)
    stop.set()
    if heavy:
        background.join()
    return statistics.median(latencies)


def bytes_per_token(server: Server) -> list[tuple[str, int, float]]:
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1)])
    stub = pb_grpc.TeacherStub(channel)
    batch = batches(1, seed=99)[0]
    rows = []
    for codec in ("fp16", "q8"):
        for k in (16, 64, 256):
            response = stub.Score(batch.to_request("b", top_k=k, codec=codec_value(codec)))
            rows.append((codec, k, response.ByteSize() / response.signal.num_positions))
    return rows


def fidelity(rows: int = 256) -> list[tuple[str, int, float, float, float]]:
    """(codec, k, scale, ATKD loss relative error, gradient cosine) of the decoded vs the exact signal."""
    out = []
    for scale in (1.0, 3.0, 8.0):
        g = torch.Generator().manual_seed(int(scale))
        logits = scale * torch.randn(rows, VOCAB, generator=g)
        targets = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
        student = 2 * torch.randn(rows, VOCAB, generator=g)
        for k in (16, 64, 256):
            exact = compress(logits, targets, k)
            reference = _loss_and_grad(student, exact, targets)
            for codec in ("fp16", "q8"):
                loss, grad = _loss_and_grad(student, decode_signal(encode_signal(exact, codec, VOCAB)), targets)
                cosine = torch.nn.functional.cosine_similarity(grad, reference[1], dim=0).item()
                out.append((codec, k, scale, abs(loss - reference[0]) / abs(reference[0]), cosine))
    return out


def _loss_and_grad(student, signal, targets):
    x = student.clone().requires_grad_()
    loss = atkd_loss(x, signal, targets).loss
    loss.backward()
    return loss.item(), x.grad.flatten().double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the throughput variants")
    parser.add_argument("--batches", type=int, default=8, help="batches per client per throughput measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the engine (in-process and server)")
    parser.add_argument("--hidden", type=int, default=320)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="teacher-bench-"))
    params = build_model(workdir, args.hidden, args.layers)
    engine = TeacherEngine.load(workdir, device="cpu", dtype="float32")
    torch.set_num_threads(args.threads)  # the client side decodes with numpy and does not use torch's threads
    server = Server(workdir, args.threads)
    print(f"Llama {params / 1e6:.1f}M params, V={VOCAB}, batches of {BATCH}x{SEQ} tokens, top-{TOP_K} fp16, "
          f"{args.threads} engine threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    try:
        variants = {"1 client": 1, "4 clients": 4}
        baselines: list[dict] = []
        results: dict[str, list[tuple[dict, dict]]] = {name: [] for name in variants}  # (in-process, server) pairs
        for round_ in range(args.rounds):
            for name, clients in variants.items():
                base = in_process(engine, batches(args.batches, seed=round_))
                work = [batches(args.batches, seed=10 * round_ + c) for c in range(clients)]
                results[name].append((base, through_server(server, work, in_flight=3)))
                baselines.append(base)
        print(f"\nThroughput ({args.rounds} rounds; each server run right after an in-process run; ratio = median of "
              "the pairs' ratios)")
        print(f"{'variant':<12} {'tok/s':>8} {'ratio':>6} {'per-pair ratios':>30} {'compute/batch ms':>17} "
              f"{'outside forward/batch ms':>25} {'outside share':>14} {'Jain':>6}")
        rows = {"in-process": [(base, base) for base in baselines], **results}
        for name, pairs in rows.items():
            runs = [run for _, run in pairs]
            ratios = [run["tok/s"] / base["tok/s"] for base, run in pairs]
            outside = statistics.median((run["wall"] - run["compute"]) / run["batches"] * 1e3 for run in runs)
            share = statistics.median(1 - run["compute"] / run["wall"] for run in runs)
            compute = statistics.median(run["compute"] / run["batches"] * 1e3 for run in runs)
            jain = f"{statistics.median(run['jain'] for run in runs):.3f}" if "jain" in runs[0] else "-"
            listed = " ".join(f"{r:.2f}" for r in ratios) if name != "in-process" else "-"
            print(f"{name:<12} {statistics.median(r['tok/s'] for r in runs):>8.0f} {statistics.median(ratios):>6.3f} "
                  f"{listed:>30} {compute:>17.0f} {outside:>25.1f} {share:>14.1%} {jain:>6}")

        work = batches(args.batches, seed=7)
        solo, shared = light_latency(server, work, heavy=False), light_latency(server, work, heavy=True)
        print(f"\nLight client (1 in flight) vs heavy (8 in flight): median latency {solo * 1e3:.0f} ms alone, "
              f"{shared * 1e3:.0f} ms with the heavy client: {shared / solo:.2f}x")

        print("\nBytes per scored token (serialised response / positions; V=8192, 2-byte ids)")
        for codec, k, size in bytes_per_token(server):
            print(f"  {codec:<5} k={k:<4} {size:7.1f}")
    finally:
        server.close()

    print("\nCodec fidelity: ATKD loss relative error / gradient cosine, decoded vs exact signal "
          "(synthetic teacher logits x scale, V=8192)")
    for codec, k, scale, error, cosine in fidelity():
        print(f"  {codec:<5} k={k:<4} scale={scale:<4} loss error {error:.1e}  gradient cosine {cosine:.6f}")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

r"""Context parallelism: one sequence sharded over P processes against one process, for training steps or for
inference (a long prompt's prefill, then decoding).

python -m benchmarks.context_parallel [--task train|prefill] [--ranks 1,2] [--preset tiny] [--mixers swa,mamba2]
    [--lengths 4k,16k] [--batch-size 1] [--steps 3] [--doc-length 0] [--segment 4096] [--decode-steps 16]
    [--device cpu] [--out FILE.md]

For each (mixer, length, P): P processes (gloo on CPUs: spawned here, each with cores / P threads; NCCL on
GPUs: one process per GPU, P <= the GPU count) run the preset's model on one random sequence of that length.
--task train: forward+backward (packed documents of about --doc-length tokens each, when given), each rank on
its slice under `ramba.parallel.context_parallel`, and the gradients summed. Reported: the median step time
after one untimed step, tokens/s, the ratio to one process, the peak memory of a process (GPU: allocated; CPU:
resident set), and the bytes a rank moved per token of the sequence (`ramba.parallel.traffic`: halos, gathered
memory and their gradients; its median over ranks).
--task prefill: the prompt through `ramba.parallel.prefill_sharded` in rounds of one --segment piece a rank (one
process: the cache's segment-wise prefill, no offload), then --decode-steps greedy tokens through the sharded
cache. Reported: the prefill time (after a warm-up on a short prompt) and tokens/s, the ratio to one process, the
median decode ms/token (last 3/4 of the steps), the peak memory of a process, and the bytes a rank moved per
prompt token in the prefill. Models in bf16 on GPUs, float32 on CPUs, random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import command_line, parse_length
from ramba import HSAHybrid, HSAHybridConfig
from ramba.generation import greedy_steps
from ramba.parallel import context_parallel, loss_and_gradients, prefill_sharded, reset_traffic, traffic


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(rank: int, size: int, args: argparse.Namespace, mixer: str, length: int, init: str,
            results: dict) -> None:
    """One process of one (mixer, length, P) cell; rank 0 writes the cell into `results`."""
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(minutes=30))
    try:
        torch.manual_seed(0)
        config = HSAHybridConfig.preset(args.preset, local_mixer=mixer)
        model = HSAHybrid(config).to(device)
        ids = torch.randint(0, config.vocab_size, (args.batch_size, length), generator=torch.Generator().manual_seed(1))
        cell = (train if args.task == "train" else prefill)(model, ids, rank, size, args, device)
        everyone = [torch.empty_like(cell) for _ in range(size)]
        dist.all_gather(everyone, cell.to(device))
        if rank == 0:
            slowest = [max(float(m[i]) for m in everyone) for i in (0, 2, 3)]
            results[(mixer, length, size)] = (slowest[0], statistics.median(float(m[1]) for m in everyone)
                                              / (args.batch_size * length), slowest[1], slowest[2])
    finally:
        dist.destroy_process_group()


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train(model: HSAHybrid, ids: torch.Tensor, rank: int, size: int, args: argparse.Namespace,
          device: torch.device) -> torch.Tensor:
    """The median training step s, bytes moved, peak GiB, 0 (no decoding) of this rank."""
    length = ids.shape[1]
    piece = ids[:, rank * length // size:(rank + 1) * length // size].to(device)
    docs = {}
    if args.doc_length:
        starts = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 1 / args.doc_length
        docs["doc_ids"] = starts.long().cumsum(dim=1)[:, rank * length // size:(rank + 1) * length // size].to(device)
    times = []
    for step in range(args.steps + 1):
        reset_traffic()
        start = sync(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss_and_gradients(model, piece, piece, **docs)
        model.zero_grad(set_to_none=True)
        if step:
            times.append(sync(device) - start)
    return torch.tensor([statistics.median(times), float(sum(traffic().values())), peak_gib(device), 0.0],
                        dtype=torch.float64)


@torch.no_grad()
def prefill(model: HSAHybrid, ids: torch.Tensor, rank: int, size: int, args: argparse.Namespace,
            device: torch.device) -> torch.Tensor:
    """The prefill s, bytes moved in it, peak GiB and median decode s/token of this rank."""
    model.eval()
    if device.type == "cuda":
        model.to(torch.bfloat16)
    segment = min(args.segment, ids.shape[1] // size)

    def run(prompt: torch.Tensor, steps: int) -> tuple[float, list[float]]:
        cache = model.new_cache(prompt.shape[0])
        start = sync(device)
        if size == 1:  # one process: the cache's own segment-wise prefill
            for begin in range(0, prompt.shape[1], segment):
                end = min(begin + segment, prompt.shape[1])
                logits = model(prompt[:, begin:end].to(device), cache=cache,
                               logits_to_keep=int(end == prompt.shape[1])).logits[:, -1:]
            logits = logits[:, 0]
        else:
            logits = prefill_sharded(model, prompt, cache, segment)
        prefill_s = sync(device) - start
        times = []
        with context_parallel() if size > 1 else contextlib.nullcontext():
            tokens = greedy_steps(model, cache, logits.argmax(-1, keepdim=True))
            for _ in range(steps):
                start = sync(device)
                next(tokens)
                times.append(sync(device) - start)
        return prefill_s, times

    run(ids[:, :size * segment], 2)  # warm-up: kernels, CUDA context, NCCL
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_traffic()
    prefill_s, times = run(ids, args.decode_steps)
    moved = float(sum(traffic().values()))  # the decoding's share is tiny: about 4 KB a token (the cache module)
    decode_s = statistics.median(times[len(times) // 4:]) if times else 0.0
    return torch.tensor([prefill_s, moved, peak_gib(device), decode_s], dtype=torch.float64)


def table(args: argparse.Namespace, results: dict) -> str:
    if args.task == "train":
        rows = ["| model | tokens | ranks | step ms | tokens/s | vs 1 rank | peak GiB per rank | bytes moved per token "
                "per rank |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    else:
        rows = ["| model | tokens | ranks | prefill s | tokens/s | vs 1 rank | decode ms/token | peak GiB per rank | "
                "bytes moved per prompt token per rank |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (mixer, length, size), (seconds, per_token, gib, decode_s) in sorted(results.items()):
        base = results.get((mixer, length, 1))
        speedup = f"{base[0] / seconds:.2f}" if base else "-"
        first = f"{seconds * 1e3:.0f}" if args.task == "train" else f"{seconds:.2f}"
        decode = [] if args.task == "train" else [f"{decode_s * 1e3:.1f}"]
        rows.append(" | ".join([f"| {args.preset} {mixer}", f"{length:,}", str(size), first,
                                f"{args.batch_size * length / seconds:,.0f}", speedup, *decode, f"{gib:.2f}",
                                f"{per_token:,.0f} |"]))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["train", "prefill"], default="train")
    p.add_argument("--ranks", default="1,2", help="process counts, one row each")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--mixers", default="swa,mamba2")
    p.add_argument("--lengths", default="4k,16k", help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="train: timed steps (after one untimed)")
    p.add_argument("--doc-length", type=int, default=0, help="train: mean length of packed documents (0: one a row)")
    p.add_argument("--segment", type=int, default=4096, help="prefill: tokens a rank runs at once")
    p.add_argument("--decode-steps", type=int, default=16, help="prefill: greedy tokens decoded after the prompt")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", help="also write the table, with the command, to this markdown file")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.device == "cuda" and max(ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {args.ranks}: needs {max(ranks)} GPUs, this machine has "
                         f"{torch.cuda.device_count()}")
    results = mp.Manager().dict()
    for mixer in args.mixers.split(","):
        for length in (parse_length(n) for n in args.lengths.split(",")):
            for size in ranks:
                with tempfile.TemporaryDirectory() as tmp:
                    mp.spawn(measure, args=(size, args, mixer, length, os.path.join(tmp, "init"), results),
                             nprocs=size, join=True)
                seconds = results[(mixer, length, size)][0]
                print(f"{args.preset} {mixer} {length:,} tokens on {size}: {seconds:.3f} s", flush=True)
    text = table(args, dict(results))
    print(text)
    if args.out:
        what = (f"{args.steps} timed steps, documents of about {args.doc_length or 'the whole row'} tokens"
                if args.task == "train" else f"segments of {args.segment} tokens, {args.decode_steps} decoded tokens")
        with open(args.out, "w") as f:
            f.write(f"# Context parallelism: {args.task}\n\n`{command_line('context_parallel', argv)}`\n\n{args.device}, "
                    f"torch {torch.__version__}, batch {args.batch_size}, {what}\n\n{text}\n")


if __name__ == "__main__":
    main()

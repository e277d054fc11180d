r"""Context parallelism: one sequence sharded over P processes against one process, for training steps.

python -m benchmarks.context_parallel [--ranks 1,2] [--preset tiny] [--mixers swa,mamba2] [--lengths 4k,16k]
    [--batch-size 1] [--steps 3] [--doc-length 0] [--device cpu] [--out FILE.md]

For each (mixer, length, P): P processes (gloo on CPUs: spawned here, each with cores / P threads; NCCL on
GPUs: one process per GPU, P <= the GPU count) run forward+backward of the preset's model on one random
sequence of that length (packed documents of about --doc-length tokens each, when given), each on its slice
under `ramba.parallel.context_parallel`, and sum the gradients.
Reported: the median step time after one untimed step, tokens/s, the ratio to one process, the peak memory
of a process (GPU: allocated; CPU: resident set), and the bytes a rank moved per token of the sequence
(`ramba.parallel.traffic`: halos, gathered memory and their gradients; its median over ranks).
"""

from __future__ import annotations

import argparse
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
from ramba.parallel import loss_and_gradients, reset_traffic, traffic


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
                            timeout=datetime.timedelta(minutes=10))
    try:
        torch.manual_seed(0)
        config = HSAHybridConfig.preset(args.preset, local_mixer=mixer)
        model = HSAHybrid(config).to(device)
        ids = torch.randint(0, config.vocab_size, (args.batch_size, length),
                            generator=torch.Generator().manual_seed(1)).to(device)
        piece = ids[:, rank * length // size:(rank + 1) * length // size]
        docs = {}
        if args.doc_length:
            starts = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 1 / args.doc_length
            doc_ids = starts.long().cumsum(dim=1).to(device)
            docs["doc_ids"] = doc_ids[:, rank * length // size:(rank + 1) * length // size]
        times = []
        for step in range(args.steps + 1):
            reset_traffic()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                loss_and_gradients(model, piece, piece, **docs)
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - start)
        moved = torch.tensor([float(sum(traffic().values())), peak_gib(device), statistics.median(times)],
                             dtype=torch.float64, device=device)
        everyone = [torch.empty_like(moved) for _ in range(size)]
        dist.all_gather(everyone, moved)
        if rank == 0:
            step_s = max(float(m[2]) for m in everyone)
            results[(mixer, length, size)] = (step_s, statistics.median(float(m[0]) for m in everyone)
                                              / (args.batch_size * length), max(float(m[1]) for m in everyone))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="process counts, one row each")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--mixers", default="swa,mamba2")
    p.add_argument("--lengths", default="4k,16k", help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    p.add_argument("--doc-length", type=int, default=0, help="mean length of packed documents (0: one a row)")
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
                step_s, per_token, gib = results[(mixer, length, size)]
                print(f"{args.preset} {mixer} {length:,} tokens on {size}: {step_s * 1e3:.0f} ms", flush=True)
    rows = ["| model | tokens | ranks | step ms | tokens/s | vs 1 rank | peak GiB per rank | bytes moved per token "
            "per rank |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (mixer, length, size), (step_s, per_token, gib) in sorted(results.items()):
        base = results.get((mixer, length, 1))
        speedup = f"{base[0] / step_s:.2f}" if base else "-"
        rows.append(f"| {args.preset} {mixer} | {length:,} | {size} | {step_s * 1e3:.0f} | "
                    f"{args.batch_size * length / step_s:,.0f} | {speedup} | {gib:.2f} | {per_token:,.0f} |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Context parallelism\n\n`{command_line('context_parallel', argv)}`\n\n{args.device}, torch "
                    f"{torch.__version__}, batch {args.batch_size}, {args.steps} timed steps, documents of about "
                    f"{args.doc_length or 'the whole row'} tokens\n\n{table}\n")


if __name__ == "__main__":
    main()

"""Long-context inference: prefill throughput, decode latency and peak memory, beside a dense model.

python -m benchmarks.long_context --presets tiny,small --mixers swa,mamba2 --lengths 64k,1m,16m,64m \
    [--mamba-backends auto] [--segment 4096] [--decode-steps 16] [--out benchmarks/results/long_context.md] [--profile]
    [--static-decode] [--batch 1]

Random weights in bf16 on one CUDA GPU; the memory K/V are offloaded to pinned CPU memory when they would
take more than --offload-above GiB of GPU memory. The cache reserves the whole memory up front
(`new_cache(..., max_tokens=)`), so the peak never holds an old and a doubled buffer together. The dense
baseline is a transformer of the same width and depth with full causal attention (SDPA) and a KV cache, run
at the lengths where it fits. With --static-decode, after the model-call decoding the same cache continues
through `ramba.decoding.StaticDecoder` (CUDA graphs; an offloaded one read in place), timed the same way once both
of its step variants are captured. --batch B runs B sequences of each length side by side (decode tokens/s =
B / decode time).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from benchmarks.common import parse_length
from benchmarks.profiling import top_ops
from ramba import HSAHybrid, HSAHybridConfig
from ramba.dense import DenseTransformer
from ramba.decoding import StaticDecoder
from ramba.generation import greedy_steps


@dataclass
class Result:
    model: str
    length: int
    prefill_s: float | None
    decode_ms: float | None
    gpu_gib: float | None
    cpu_gib: float
    note: str = ""
    static_ms: float | None = None

    def row(self) -> str:
        tps = f"{self.length / self.prefill_s:,.0f}" if self.prefill_s else "-"
        return (f"| {self.model} | {self.length:,} | {self.prefill_s and f'{self.prefill_s:.1f}' or '-'} | {tps} | "
                f"{self.decode_ms and f'{self.decode_ms:.2f}' or '-'} | "
                f"{self.static_ms and f'{self.static_ms:.2f}' or '-'} | "
                f"{self.gpu_gib is not None and f'{self.gpu_gib:.1f}' or '-'} | {self.cpu_gib:.1f} | {self.note} |")


def cpu_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synchronize_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def warm_up(model: HSAHybrid, segment: int) -> None:
    """Two segments and one decoded token through a throwaway cache, so that the timed run does not pay for
    CUDA context, library and kernel set-up."""
    cache = model.new_cache(1)
    ids = torch.randint(0, model.config.vocab_size, (1, segment), device="cuda")
    model(ids, cache=cache, logits_to_keep=0)
    token = model(ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    model(token, cache=cache)
    torch.cuda.synchronize()


def median_ms(step, calls: int) -> float | None:
    """Median time of the last 3/4 of `calls` calls of step(), in ms (each call synchronised)."""
    times = []
    for _ in range(calls):
        t0 = synchronize_time()
        step()
        times.append(synchronize_time() - t0)
    return statistics.median(times[len(times) // 4:]) * 1e3 if times else None


def static_decode_ms(model: HSAHybrid, cache, token: torch.Tensor, decode_steps: int) -> float:
    """Continue `cache` through a StaticDecoder: enough steps first that both step variants are captured (3
    chunk periods), then the median of decode_steps timed steps."""
    warm = 3 * model.config.chunk_size + 3
    decoder = StaticDecoder(model, cache, warm + decode_steps)
    state = {"token": token[:, 0]}

    def step() -> None:
        state["token"] = decoder.step(state["token"]).argmax(-1)

    for _ in range(warm):
        step()
    return median_ms(step, decode_steps)


@torch.no_grad()
def run_hybrid(config: HSAHybridConfig, length: int, segment: int, decode_steps: int, offload_above: float,
               name: str, profile: bool = False, static: bool = False, batch: int = 1) -> Result:
    model = HSAHybrid(config).cuda().to(torch.bfloat16).eval()
    warm_up(model, segment)
    kv_gib = 2 * batch * length * config.num_kv_heads * config.head_dim * 2 / 2**30
    offload = kv_gib > offload_above
    torch.cuda.reset_peak_memory_stats()
    extra = decode_steps + (3 * config.chunk_size + 3 + decode_steps if static else 0)
    cache = model.new_cache(batch, offload=offload, max_tokens=length + extra)  # no doubling midway
    gen = torch.Generator(device="cuda").manual_seed(0)
    start = synchronize_time()
    for pos in tqdm(range(0, length, segment), desc=f"{name} {length:,}", unit="seg", leave=False):
        ids = torch.randint(0, config.vocab_size, (batch, min(segment, length - pos)), device="cuda", generator=gen)
        out = model(ids, cache=cache, logits_to_keep=1 if pos + segment >= length else 0)
    prefill = synchronize_time() - start
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    steps = greedy_steps(model, cache, token)
    tokens = [token]
    decode = median_ms(lambda: tokens.append(next(steps)), decode_steps)
    token = tokens[-1]
    if profile:
        ids = torch.randint(0, config.vocab_size, (batch, segment), device="cuda", generator=gen)
        print(f"profile of {name} at {length:,} tokens, one segment of {segment}:\n"
              + top_ops(lambda: model(ids, cache=cache, logits_to_keep=1), calls=1), flush=True)
        print(f"profile of {name} at {length:,} tokens, one decoded token:\n"
              + top_ops(lambda: model(token, cache=cache), calls=1), flush=True)
    static_ms = static_decode_ms(model, cache, token, decode_steps) if static else None
    note = "offload" if offload else ""
    return Result(name, length, prefill, decode, torch.cuda.max_memory_allocated() / 2**30, cpu_peak_gib(), note,
                  static_ms)


@torch.no_grad()
def run_dense(config: HSAHybridConfig, length: int, segment: int, decode_steps: int, name: str,
              budget_s: float) -> Result:
    model = DenseTransformer(config).cuda().to(torch.bfloat16).eval()
    torch.cuda.reset_peak_memory_stats()
    cache = model.new_cache(1)
    start = synchronize_time()
    try:
        for pos in range(0, length, segment):
            ids = torch.randint(0, config.vocab_size, (1, min(segment, length - pos)), device="cuda")
            out = model(ids, cache=cache, logits_to_keep=1).logits
            if pos + segment < length and synchronize_time() - start > budget_s:
                done = pos + segment
                estimate = (synchronize_time() - start) * (length / done) ** 2
                return Result(name, length, None, None, torch.cuda.max_memory_allocated() / 2**30, cpu_peak_gib(),
                              f"stopped after {done:,} tokens; quadratic estimate {estimate / 60:.0f} min")
        prefill = synchronize_time() - start
        steps = greedy_steps(model, cache, out[:, -1].argmax(-1, keepdim=True))
        times = []
        for _ in range(decode_steps):
            t0 = synchronize_time()
            next(steps)
            times.append(synchronize_time() - t0)
    except torch.cuda.OutOfMemoryError:
        return Result(name, length, None, None, None, cpu_peak_gib(), "does not fit in GPU memory")
    finally:
        cache.clear()
    decode = statistics.median(times[len(times) // 4:]) * 1e3 if times else None
    return Result(name, length, prefill, decode, torch.cuda.max_memory_allocated() / 2**30, cpu_peak_gib())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--mixers", default="swa,mamba2")
    p.add_argument("--lengths", default="64k,1m,16m,64m")
    p.add_argument("--mamba-backends", default="auto",
                   help="Mamba2 op backends to run the mamba2 mixer on, one row each (auto, cuda, compile, torch)")
    p.add_argument("--segment", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--offload-above", type=float, default=8.0, help="GiB of memory K/V above which to offload")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dense-budget", type=float, default=120.0, help="seconds before a dense prefill is cut short")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--profile", action="store_true",
                   help="print the top GPU ops of one more segment and one more token after each hybrid run")
    p.add_argument("--static-decode", action="store_true",
                   help="also time decoding through ramba.decoding.StaticDecoder (CUDA graphs) on the same cache")
    p.add_argument("--batch", type=int, default=1, help="sequences of each length run side by side (hybrids only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.long_context measures GPU inference and needs a CUDA GPU")
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    results: list[Result] = []

    def record(result: Result) -> None:
        results.append(result)
        print(result.row(), flush=True)

    for preset in args.presets.split(","):
        runs = [(mixer, backend) for mixer in args.mixers.split(",")
                for backend in (args.mamba_backends.split(",") if mixer == "mamba2" else ["auto"])]
        for mixer, backend in runs:
            config = HSAHybridConfig.preset(preset, local_mixer=mixer, mamba_backend=backend)
            name = f"{preset} {mixer}" + (f" ({backend})" if backend != "auto" else "") + \
                (f", B={args.batch}" if args.batch > 1 else "")
            for length in lengths:
                try:
                    record(run_hybrid(config, length, args.segment, args.decode_steps, args.offload_above,
                                      name, args.profile, args.static_decode, args.batch))
                except (torch.cuda.OutOfMemoryError, MemoryError) as err:
                    record(Result(name, length, None, None, None, cpu_peak_gib(), f"failed: {str(err)[:80]}"))
                torch.cuda.empty_cache()
        if args.dense:
            config = HSAHybridConfig.preset(preset)
            for length in lengths:
                record(run_dense(config, length, args.segment, args.decode_steps, f"{preset} dense",
                                 args.dense_budget))
                torch.cuda.empty_cache()
    header = ["| model | tokens | prefill s | prefill tok/s | decode ms/token | static decode ms/token | peak GPU GiB | "
              "peak CPU GiB | note |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    table = "\n".join(header + [r.row() for r in results])
    print(table)
    if args.out:
        props = torch.cuda.get_device_properties(0)
        with open(args.out, "w") as f:
            f.write(f"# Long-context inference\n\n`python -m benchmarks.long_context {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
                    f"{props.name}, torch {torch.__version__}, bf16, segment {args.segment}\n\n{table}\n")


if __name__ == "__main__":
    main()

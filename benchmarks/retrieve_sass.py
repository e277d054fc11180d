"""The fused retrieval kernel compiled for Hopper without a GPU: its basic blocks and instruction counts.

python -m benchmarks.retrieve_sass [--dr 64] [--block-m 64] [--stages 3] [--insert keys] [--share CHUNKS]

Compiles `ops/retrieve/fused.py`'s kernel for sm_90 as a launch on contiguous bf16 tensors would (16-byte
aligned pointers and strides, unit last strides, K = 8, one chunk range), with Triton's bundled `ptxas` and
`nvdisasm`, and prints whether the landmark loads are pipelined (asynchronous copies in the TTGIR), then one
line per basic block of the SASS: its label, instruction count and what it holds (tensor-core MMAs,
asynchronous copies, barriers, its branch). The scan over whole tiles is the first loop with an MMA; the
block that follows its MMA up to the first branch is the per-tile test, the blocks after it the insertion.
--share C also counts, on the CPU, the share of tiles that enter the insertion when random queries (16, 32, 64
and 128 rows a tile) scan C random landmarks: a tile enters it when any of its rows has a score at or above
that row's running K-th best.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ramba.ops.retrieve import fused

POINTERS = {"q_ptr": "*bf16", "lmk_ptr": "*bf16", "pos_ptr": "*i64", "out_ptr": "*i64", "score_ptr": "*fp32"}
FLOATS = ("sqrt_dr", "gumbel")
UNIT_STRIDES = {"sq_d": 1, "sk_d": 1, "sp_l": 1}  # Triton specializes arguments equal to 1 into constants
ALIGNED = [*POINTERS, "sq_b", "sq_l", "sq_h", "sk_b", "sk_c", "sk_h", "sp_b"]  # and marks these 16-divisible
MARKS = {"HGMMA": "mma", "LDGSTS": "async copy", "BAR.SYNC": "barrier", "BRA": "branch"}


def compile_kernel(dr: int, block_m: int, stages: int, insert: str) -> triton.compiler.CompiledKernel:
    params = list(inspect.signature(fused._retrieve_kernel.fn).parameters)
    block_d = max(16, triton.next_power_of_2(dr))
    constants = dict(TOPK=8, KP=8, BLOCK_M=block_m, BLOCK_N=fused.LAUNCH["block_n"], BLOCK_D=block_d,
                     DOT_DTYPE=tl.bfloat16, PRECISION="tf32", GUMBEL=False, FINAL=True, IMAGES=insert == "images",
                     EVEN_D=dr == block_d, **UNIT_STRIDES)
    signature = {p: "constexpr" if p in constants else POINTERS.get(p, "fp32" if p in FLOATS else "i32")
                 for p in params}
    source = ASTSource(fn=fused._retrieve_kernel, signature=signature,
                       constexprs={(params.index(k),): v for k, v in constants.items()},
                       attrs={(params.index(k),): [["tt.divisibility", 16]] for k in ALIGNED})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=fused.LAUNCH["num_warps"], num_stages=stages))


def sass(kernel: triton.compiler.CompiledKernel) -> str:
    """The kernel's SASS, assembled and disassembled with the tools in Triton's wheel."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(os.path.join(tools, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(tools, n)))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        subprocess.run([ptxas, "-arch=sm_90a", ptx, "-o", cubin], check=True, capture_output=True)
        return subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], check=True, capture_output=True,
                              text=True).stdout


def blocks(code: str) -> list[tuple[str, int, list[str]]]:
    """(name, instructions, marks) of each basic block, in order: a block starts at a label or after a branch
    (then it is named after the label before it, with a "+" for each branch since)."""
    out: list[tuple[str, int, list[str]]] = [("entry", 0, [])]
    for line in code.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            out.append((label.group(1), 0, []))
            continue
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if op:
            name, count, marks = out[-1]
            marks += [m for key, m in MARKS.items() if op.group(1).startswith(key) and m not in marks]
            out[-1] = (name, count + 1, marks)
            if op.group(1).startswith("BRA"):
                out.append((name + "+", 0, []))
    return [b for b in out if b[1]]


def insertion_share(rows: int, chunks: int, dr: int, topk: int = 8, block_n: int = 64, seed: int = 0) -> float:
    """Share of the tiles of `block_n` chunks that enter the insertion for `rows` random queries (one block)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, dr, generator=gen) @ torch.randn(chunks // block_n * block_n, dr, generator=gen).T
    tiles = scores.view(rows, -1, block_n)
    best = torch.full((rows, topk), float("-inf"))
    entered = 0
    for t in range(tiles.shape[1]):
        if bool((tiles[:, t].max(-1).values >= best[:, -1]).any()):
            entered += 1
            best = torch.cat([best, tiles[:, t]], -1).topk(topk, -1).values
    return entered / tiles.shape[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieve_sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dr", type=int, default=64, help="retrieval head dim")
    p.add_argument("--block-m", type=int, default=fused.LAUNCH["block_m"], help="query rows a tile")
    p.add_argument("--stages", type=int, default=fused.LAUNCH["num_stages"], help="software-pipelining stages")
    p.add_argument("--insert", choices=("keys", "images"), default=fused.LAUNCH["insert"])
    p.add_argument("--share", type=int, metavar="CHUNKS", help="also simulate the share of tiles that enter the "
                                                               "insertion over this many random landmarks")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    kernel = compile_kernel(args.dr, args.block_m, args.stages, args.insert)
    copies = kernel.asm["ttgir"].count("async_copy")
    print(f"dr={args.dr} block_m={args.block_m} stages={args.stages} insert={args.insert}: "
          f"landmark loads {'pipelined' if copies else 'not pipelined'} ({copies} asynchronous copy ops in TTGIR)")
    for label, count, marks in blocks(sass(kernel)):
        print(f"{label:>10} {count:5d}  {', '.join(marks)}")
    if args.share:
        for rows in (16, 32, 64, 128):
            print(f"{rows} rows a tile, {args.share:,} chunks: {insertion_share(rows, args.share, args.dr):.3f} of "
                  f"the tiles enter the insertion")


if __name__ == "__main__":
    main()

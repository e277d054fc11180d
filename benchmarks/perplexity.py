r"""Loss by context position: mean next-token loss of long held-out documents, bucketed by token position.

python -m benchmarks.perplexity --checkpoints A[,B,...] --data FILE.jsonl|FILE.txt [--text-field text] \
    [--max-docs N] [--min-doc-tokens T] [--max-tokens 16m] [--buckets 1k,4k,16k,64k,256k,1m,4m,16m] \
    [--segment 4096] [--device cpu|cuda] [--dtype auto] [--offload] [--out report.md] [--plot loss.png]

Each checkpoint ([NAME=]DIR written by HSAHybrid.save_pretrained, or builtin:tiny-random) reads the same
documents: the longest of the file first (by characters), at most --max-docs of them, each truncated to
--max-tokens tokens; a document with fewer than --min-doc-tokens tokens (with any checkpoint's tokenizer) is
skipped. A .jsonl file holds one document per line (its --text-field); a .txt file is one document.

A document goes through the model's inference cache in --segment-token segments, as a long prompt would. The
loss of a token is the cross-entropy (in nats, computed in float32 or better) of the model's prediction of it
from all the tokens before it; the last logit of a segment predicts the first token of the next. A token at
position p (p tokens before it in its document) counts in the bucket [edge_i, edge_i+1) holding p, where
the edges are 0 and --buckets; tokens at or past the last edge go to an open last bucket. Each bucket's mean
is weighted by tokens over all documents. For byte-level tokenizers, bits per byte = nats / ln 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.answering import benchmark_tokenizer, load_checkpoint_model
from benchmarks.common import BenchmarkError, command_line, format_length, parse_counts, parse_length
from ramba.data.texts import read_texts
from ramba.generation import prefill_segments
from ramba.loading import resolve_dtype
from ramba.tokenizer import Tokenizer

LOSS_ROWS = 1024  # logits turned to float32 and scored this many positions at a time (bounds the memory)


def parse_buckets(text: str) -> list[int]:
    """'1k,4k,16k' -> [1024, 4096, 16384]: the bucket edges after 0, strictly increasing, each at least 1."""
    edges = parse_counts(text, "bucket edge", "token positions such as 1k,4k,16k in --buckets")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise BenchmarkError(f"--buckets {text!r} must be strictly increasing, e.g. 1k,4k,16k,64k")
    return edges


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """[1024, 4096] -> ['0-1K', '1K-4K', '4K+'] (one more than the edges: the last is open)."""
    bounds = [0, *edges]
    return [f"{format_length(a) if a else 0}-{format_length(b)}" for a, b in zip(bounds, bounds[1:])] + \
        [f"{format_length(edges[-1])}+"]


def bucket_of(positions: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """The bucket index (0 .. len(edges)) of each token position."""
    return torch.bucketize(positions, torch.tensor(list(edges), device=positions.device), right=True)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [N] of logits [N, V] against targets [N], in float32 (float64 stays float64)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    parts = [F.cross_entropy(logits[i:i + LOSS_ROWS].to(dtype), targets[i:i + LOSS_ROWS], reduction="none")
             for i in range(0, logits.shape[0], LOSS_ROWS)]
    return torch.cat(parts)


@torch.inference_mode()
def position_losses(model: torch.nn.Module, ids: torch.Tensor, buckets: Sequence[int], segment: int = 4096,
                    offload: bool = False, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token losses and token counts per position bucket of one document.

    ids: the document's token ids, [n] or [1, n]. buckets: increasing edges e_1 < e_2 < ...; bucket 0 is
    [0, e_1), bucket i is [e_i, e_i+1), the last [e_last, inf). The document is fed in `segment`-token pieces
    through `model.new_cache(1, offload=offload)`; the token at position p (1 <= p < n) is scored by the
    logit of position p - 1 and counted in the bucket holding p. Returns (sums float64 [len(buckets) + 1],
    counts int64 [len(buckets) + 1]) on the CPU."""
    ids = ids.reshape(-1).long()
    if segment < 1:
        raise ValueError(f"segment must be at least 1, got {segment}")
    n = ids.numel()
    sums = torch.zeros(len(buckets) + 1, dtype=torch.float64)
    counts = torch.zeros(len(buckets) + 1, dtype=torch.int64)
    if n < 2:
        return sums, counts
    device = next(model.parameters()).device
    cache = model.new_cache(1, offload=offload)
    for a, b in tqdm(prefill_segments(n, segment), desc="segments", unit="seg", leave=False, disable=not progress):
        logits = model(ids[a:b].to(device)[None], cache=cache).logits[0]
        targets = ids[a + 1:b + 1].to(device)  # the last logit predicts the next segment's first token
        losses = token_losses(logits[:targets.numel()], targets).double().cpu()
        where = bucket_of(torch.arange(a + 1, a + 1 + targets.numel()), buckets)
        sums.index_add_(0, where, losses)
        counts.index_add_(0, where, torch.ones_like(where))
        del logits
    clear = getattr(cache, "clear", None)
    if clear is not None:
        clear()
    return sums, counts


# ----------------------------------------------------------------------------------------------- documents
def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of a .jsonl file (one object per line, the text in `text_field`) or a .txt file (one)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"--data {path}: no such file")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix != ".jsonl":
        raise BenchmarkError(f"--data {path}: give a .jsonl file (one JSON object per line) or a .txt file")
    try:
        docs = read_texts(path, text_field)
    except ValueError as err:
        raise BenchmarkError(f"{err}; --text-field names the text field") from None
    if not docs:
        raise BenchmarkError(f"--data {path} holds no documents")
    return docs


def select_documents(docs: Sequence[str], tokenizers: Sequence[Tokenizer], max_docs: int | None,
                     min_tokens: int, max_tokens: int) -> tuple[list[int], dict[str, list[torch.Tensor]]]:
    """The indices of the documents to read (longest by characters first, at most max_docs, each with at least
    min_tokens tokens under every tokenizer) and, per tokenizer name, their ids truncated to max_tokens."""
    chosen: list[int] = []
    ids: dict[str, list[torch.Tensor]] = {tok.name: [] for tok in tokenizers}
    unique = {tok.name: tok for tok in tokenizers}
    longest = 0
    for index in sorted(range(len(docs)), key=lambda i: -len(docs[i])):
        if max_docs is not None and len(chosen) >= max_docs:
            break
        encoded = {name: tok.encode(docs[index]) for name, tok in unique.items()}
        longest = max(longest, *(len(e) for e in encoded.values()))
        if any(len(e) < min_tokens for e in encoded.values()):
            continue
        chosen.append(index)
        for name, e in encoded.items():
            ids[name].append(torch.tensor(e[:max_tokens], dtype=torch.int32))
    if not chosen:
        raise BenchmarkError(f"no document has --min-doc-tokens {min_tokens:,} tokens (the longest has {longest:,}):"
                             " lower --min-doc-tokens or give longer documents")
    return chosen, ids


# ------------------------------------------------------------------------------------------------- models
@dataclass
class Result:
    """The bucketed losses of one checkpoint over all documents."""

    name: str
    tokenizer: str
    sums: torch.Tensor
    counts: torch.Tensor
    seconds: float = 0.0
    documents: list[dict] = field(default_factory=list)

    def means(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.sums.tolist(), self.counts.tolist())]

    def overall(self) -> float | None:
        total = int(self.counts.sum())
        return float(self.sums.sum()) / total if total else None


def checkpoint_name(spec: str) -> tuple[str, str]:
    """'[NAME=]DIR' -> (NAME, DIR); the name defaults to the folder's last part or the built-in name."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = spec if spec.startswith("builtin:") else (Path(spec).name or spec)
    return name, path


def load_checkpoint(spec: str, tokenizer: str | None, device: str, dtype: str) -> tuple[str, torch.nn.Module,
                                                                                       Tokenizer]:
    name, path = checkpoint_name(spec)
    if path == "oracle":
        raise BenchmarkError("--checkpoints oracle: the oracle has no losses; give model folders")
    model, tok = load_checkpoint_model(name, path, f"--checkpoints {spec}", tokenizer, device, dtype)
    return name, model, tok


def checkpoint_tokenizer(spec: str, tokenizer: str | None) -> Tokenizer:
    """The tokenizer a checkpoint will read with; a folder without config.json fails here, before any model runs."""
    _, path = checkpoint_name(spec)
    if path == "oracle" or not (path.startswith("builtin:") or (Path(path) / "config.json").is_file()):
        raise BenchmarkError(f"--checkpoints {spec}: not a folder written by HSAHybrid.save_pretrained (no "
                             "config.json there) nor builtin:tiny-random")
    return benchmark_tokenizer(tokenizer, None if path.startswith("builtin:") else path)


def evaluate(name: str, model: torch.nn.Module, tok: Tokenizer, documents: Sequence[torch.Tensor],
             indices: Sequence[int], buckets: Sequence[int], segment: int, offload: bool) -> Result:
    result = Result(name, tok.name, torch.zeros(len(buckets) + 1, dtype=torch.float64),
                    torch.zeros(len(buckets) + 1, dtype=torch.int64))
    start = time.perf_counter()
    for index, ids in tqdm(list(zip(indices, documents)), desc=name, unit="doc"):
        t0 = time.perf_counter()
        sums, counts = position_losses(model, ids, buckets, segment, offload,
                                       progress=-(-ids.numel() // segment) > 1)
        result.sums += sums
        result.counts += counts
        result.documents.append({"index": index, "tokens": int(ids.numel()), "loss": float(sums.sum()) /
                                 max(int(counts.sum()), 1), "seconds": round(time.perf_counter() - t0, 3)})
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------- report
def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(results: Sequence[Result], buckets: Sequence[int], header: str) -> str:
    """The report: mean loss per checkpoint and bucket, then the tokens counted per bucket."""
    labels = bucket_labels(buckets)
    used = [i for i in range(len(labels)) if any(int(r.counts[i]) for r in results)]
    head = " | ".join(labels[i] for i in used)
    lines = [header, "", "Mean next-token loss (nats per token) by position in the document:", "",
             f"| checkpoint | tokenizer | {head} | all | bits/byte |",
             "| --- | --- |" + " ---: |" * (len(used) + 2)]
    for r in results:
        means, overall = r.means(), r.overall()
        bpb = _cell(overall / math.log(2)) if r.tokenizer == "byte" and overall is not None else "-"
        lines.append(f"| {r.name} | {r.tokenizer} | " + " | ".join(_cell(means[i]) for i in used)
                     + f" | {_cell(overall)} | {bpb} |")
    lines += ["", "Tokens counted per bucket (summed over documents):", "", f"| checkpoint | {head} | all |",
              "| --- |" + " ---: |" * (len(used) + 1)]
    for r in results:
        lines.append(f"| {r.name} | " + " | ".join(f"{int(r.counts[i]):,}" for i in used)
                     + f" | {int(r.counts.sum()):,} |")
    lines += ["", "A token at position p (p tokens before it) counts in the bucket holding p. bits/byte = nats / "
              "ln 2, given for byte-level tokenizers only."]
    return "\n".join(lines)


def plot(results: Sequence[Result], buckets: Sequence[int], path: str | Path) -> None:
    """Loss against position bucket (log x, one line per checkpoint), each point at its bucket's upper edge
    (the open last bucket at twice the last edge)."""
    try:
        import matplotlib
    except ImportError:
        raise BenchmarkError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = bucket_labels(buckets)
    xs = [*buckets, 2 * buckets[-1]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    shown = set()
    for r in results:
        points = [(xs[i], m, labels[i]) for i, m in enumerate(r.means()) if m is not None]
        shown.update((x, label) for x, _, label in points)
        ax.plot([x for x, _, _ in points], [m for _, m, _ in points], marker="o", label=r.name)
    ax.set_xscale("log", base=2)
    ticks = sorted(shown)
    ax.set_xticks([x for x, _ in ticks], [label for _, label in ticks], rotation=30)
    ax.set(xlabel="token position in document", ylabel="mean loss (nats / token)", title="Loss by context position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", required=True, metavar="[NAME=]DIR[,...]",
                   help="comma-separated models: save_pretrained folders or builtin:tiny-random")
    p.add_argument("--data", required=True, help="held-out documents: a .jsonl file or a .txt file (one document)")
    p.add_argument("--text-field", default="text", help="the field of a .jsonl line that holds its text")
    p.add_argument("--tokenizer", help="'byte' or a Hugging Face tokenizer for every checkpoint (default: each "
                                       "checkpoint's own tokenizer files if any, else byte)")
    p.add_argument("--max-docs", type=int, help="read at most this many documents (the longest first)")
    p.add_argument("--min-doc-tokens", default="1k", help="skip documents shorter than this (tokens)")
    p.add_argument("--max-tokens", default="16m", help="truncate each document to this many tokens")
    p.add_argument("--buckets", default="1k,4k,16k,64k,256k,1m,4m,16m", help="increasing position bucket edges")
    p.add_argument("--segment", type=int, default=4096, help="tokens fed to the model per call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--offload", action="store_true", help="keep the memory K/V in pinned CPU memory")
    p.add_argument("--out", help="also write the markdown report to this file (and its numbers to FILE.json)")
    p.add_argument("--plot", help="also draw loss against position to this image (needs matplotlib)")
    args = p.parse_args(argv)

    try:
        table = run(args, command_line("perplexity", argv))
    except BenchmarkError as err:
        raise SystemExit(f"error: {err}") from err
    print(table)
    return table


def run(args: argparse.Namespace, command: str) -> str:
    buckets = parse_buckets(args.buckets)
    try:
        max_tokens, min_tokens = parse_length(args.max_tokens), parse_length(args.min_doc_tokens)
    except ValueError:
        raise BenchmarkError("--max-tokens and --min-doc-tokens take token counts such as 4096, 64k or 16m") from None
    if args.segment < 1 or max_tokens < 2 or (args.max_docs is not None and args.max_docs < 1):
        raise BenchmarkError("--segment and --max-docs must be at least 1, --max-tokens at least 2")
    specs = [s.strip() for s in args.checkpoints.split(",") if s.strip()]
    if not specs:
        raise BenchmarkError("--checkpoints names no model")
    try:
        dtype = resolve_dtype(args.dtype, torch.device(args.device))
    except (ValueError, RuntimeError) as err:
        raise BenchmarkError(str(err)) from err
    docs = read_documents(args.data, args.text_field)
    tokenizers = [checkpoint_tokenizer(spec, args.tokenizer) for spec in specs]
    indices, ids = select_documents(docs, tokenizers, args.max_docs, max(min_tokens, 2), max_tokens)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before the models run, not after)
        except ImportError:
            raise BenchmarkError("--plot needs matplotlib (pip install matplotlib)") from None

    results = []
    for spec in specs:
        name, model, tok = load_checkpoint(spec, args.tokenizer, args.device, args.dtype)
        results.append(evaluate(name, model, tok, ids[tok.name], indices, buckets, args.segment, args.offload))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    device = args.device
    if torch.device(args.device).type == "cuda":
        device += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    tokens = ", ".join(f"{name} {sum(t.numel() for t in v):,}" for name, v in ids.items())
    header = "\n".join([
        "# Loss by context position", "", f"`{command}`", "",
        f"Data: {args.data}, {len(indices)} of {len(docs)} documents (the longest first, at most "
        f"{format_length(max_tokens)} tokens each; tokens in all: {tokens}). Device {device}, dtype "
        f"{str(dtype).removeprefix('torch.')}, segment {args.segment}, offload {args.offload}, torch "
        f"{torch.__version__}. Seconds per checkpoint: "
        + ", ".join(f"{r.name} {r.seconds:.1f}" for r in results) + "."])
    table = markdown(results, buckets, header)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        numbers = {"command": command, "data": args.data, "buckets": bucket_labels(buckets), "edges": buckets,
                   "device": device, "dtype": str(dtype).removeprefix("torch."), "segment": args.segment,
                   "checkpoints": [{"name": r.name, "tokenizer": r.tokenizer, "loss": r.means(),
                                    "tokens": r.counts.tolist(), "sums": r.sums.tolist(), "all": r.overall(),
                                    "seconds": round(r.seconds, 3), "documents": r.documents} for r in results]}
        out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    if args.plot:
        plot(results, buckets, args.plot)
    return table


if __name__ == "__main__":
    main()

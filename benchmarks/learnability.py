"""How quickly a model configuration learns to retrieve: short pass-key training runs from scratch.

python -m benchmarks.learnability [--preset tiny] [--set hsa_residual=standard ...] [--task passkey]
    [--length 1024] [--min-length 256] [--max-depth 1.0] [--steps 700] [--batch-size 32] [--lr 1e-3]
    [--min-lr-ratio 1] [--retrieval-loss 0] [--eval-every 100] [--init DIR] [--device cuda] [--out FILE]
    [--save DIR]

Trains a fresh model (or, with `--init DIR`, the saved model in DIR, its config changed by --set) on the
prompts of one task, pass keys by default, or another with number answers such as niah_multikey_1 (loss
on the answer tokens: a space, the key and the end-of-sequence token, so that a saved model stops after the
key as the benchmarks expect), prompt lengths drawn from [min-length, length], the needle at a depth drawn
from [0, max-depth]. Every eval-every steps it prints the held-out answer loss, the fraction of answer tokens
predicted right (teacher forcing), the fraction of keys entirely right and the retrieval weight on the
needle's chunks at the positions that predict the answer (averaged over HSA blocks and retrieval heads;
ramba.training.retrieval). With `--retrieval-loss W` the training loss adds W times the auxiliary retrieval
loss on those positions. Meant for comparing configurations (residual rule, landmarks, top-k, window) in
minutes; `--save DIR` keeps the model for benchmarks.passkey and the others.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from statistics import fmean

import torch
import yaml

from benchmarks.common import BenchmarkError, command_line
from ramba import HSAHybrid, HSAHybridConfig
from ramba.data.tasks import TASKS, TaskError
from ramba.tokenizer import ByteTokenizer, Tokenizer
from ramba.training.optim import build_optimizer, build_scheduler, train_step
from ramba.training.retrieval import asked_chunks, retrieval_target_loss

ANSWER_ROOM = 9  # a space, at most 7 digits and the end-of-sequence token


@dataclass
class Scores:
    loss: float
    token_accuracy: float
    key_accuracy: float
    needle_weight: float | None  # None: the model has no HSA block


def task_batch(rng: random.Random, tokenizer: Tokenizer, size: int, min_length: int, length: int,
               max_depth: float, task: str = "passkey",
               chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels [size, T = length + ANSWER_ROOM]: prompt of `task`, answer, right padding; labels -100
    off the answer; targets bool [size, T, ceil(T / chunk_size)]: at the positions that predict the answer, the
    chunks holding the asked fact (ramba.training.retrieval.asked_chunks)."""
    ids = torch.full((size, length + ANSWER_ROOM), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    targets = torch.zeros(size, ids.shape[1], -(-ids.shape[1] // chunk_size), dtype=torch.bool)
    for row in range(size):
        n = rng.randint(min_length, length)
        sample = TASKS[task](rng, tokenizer, n, depth=rng.uniform(0.0, max_depth))
        answer = torch.tensor(tokenizer.encode(sample.target) + [tokenizer.eos_id])
        if len(answer) > ANSWER_ROOM:
            raise BenchmarkError(f"--task {task}: an answer of {len(answer)} tokens (end of sequence included) "
                                 f"does not fit the {ANSWER_ROOM} this benchmark scores; take a task with "
                                 "number answers (passkey, niah_single_1, niah_multikey_1, ...)")
        ids[row, :n] = sample.prompt_ids
        ids[row, n:n + len(answer)] = answer
        labels[row, n:n + len(answer)] = answer
        targets[row, n - 1:n - 1 + len(answer), asked_chunks(sample, tokenizer, chunk_size)] = True
    return ids, labels, targets


def answer_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(fraction of labelled tokens predicted right, fraction of rows with every labelled token right);
    logits [B, T, V] predict labels [B, T] shifted by one, as in the model's loss."""
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    labelled = target != -100
    right = (predicted == target) & labelled
    return (right.sum() / labelled.sum()).item(), (right | ~labelled).all(1).float().mean().item()


def has_memory(model: HSAHybrid) -> bool:
    """Whether the model has HSA blocks (a chunk memory to retrieve from)."""
    return model.encoder is not None


def answer_and_retrieval_loss(model: HSAHybrid, batch: dict[str, torch.Tensor], targets: torch.Tensor,
                              retrieval_weight: float) -> torch.Tensor:
    """The answer's loss on batch's input_ids and labels plus retrieval_weight times the auxiliary retrieval
    loss on `targets` (task_batch's)."""
    out = model(batch["input_ids"], labels=batch["labels"], return_retrieval=True)
    return out.loss + retrieval_weight * retrieval_target_loss(out.retrieval, out.retrieval_weights, targets)[0]


@torch.no_grad()
def evaluate(model: HSAHybrid, held_out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             device: torch.device, autocast: bool) -> Scores:
    model.eval()
    losses, tokens, keys, weights = [], [], [], []
    for ids, labels, targets in held_out:
        ids, labels = ids.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=labels, return_retrieval=has_memory(model))
        token_accuracy, key_accuracy = answer_scores(out.logits.float(), labels)
        losses.append(out.loss.item())
        tokens.append(token_accuracy)
        keys.append(key_accuracy)
        if out.retrieval:
            weights.append(retrieval_target_loss(out.retrieval, out.retrieval_weights, targets.to(device))[1].item())
    model.train()
    return Scores(fmean(losses), fmean(tokens), fmean(keys), fmean(weights) if weights else None)


def parse_sets(items: list[str]) -> dict[str, object]:
    """['hsa_residual=standard', 'topk=4'] -> {'hsa_residual': 'standard', 'topk': 4} (values read as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchmarkError(f"--set {item!r}: write field=value, e.g. --set hsa_residual=standard")
        overrides[key] = yaml.safe_load(value)
    return overrides


def build_model(preset: str, overrides: dict[str, object], init: str | None) -> HSAHybrid:
    """A fresh float32 model of `preset` with `overrides`, or the saved model in directory `init` with its
    config's fields replaced by `overrides` (only those that keep every weight's shape)."""
    try:
        if init is None:
            return HSAHybrid(HSAHybridConfig.preset(preset, **overrides))
        return HSAHybrid.from_pretrained(init, dtype=torch.float32, **overrides)
    except (TypeError, ValueError, OSError) as err:
        raise BenchmarkError(f"model config: {err}") from None


def run(args: argparse.Namespace) -> list[str]:
    """Train and evaluate as the arguments say; returns the markdown table rows (also printed as they come)."""
    if not 16 <= args.min_length <= args.length:
        raise BenchmarkError(f"--min-length must lie in [16, --length={args.length}], got {args.min_length}")
    if not 0.0 <= args.max_depth <= 1.0:
        raise BenchmarkError(f"--max-depth must lie in [0, 1], got {args.max_depth}")
    if args.task not in TASKS:
        raise BenchmarkError(f"--task {args.task!r}: choose one of {', '.join(sorted(TASKS))}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = device.type == "cuda" and not args.fp32
    torch.manual_seed(args.seed)
    model = build_model(args.preset, parse_sets(args.set), args.init).to(device)
    tokenizer = ByteTokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise BenchmarkError(f"the byte tokenizer needs vocab_size >= {tokenizer.vocab_size}, the config has "
                             f"{model.config.vocab_size}")
    optimizer = build_optimizer(model, args.lr, weight_decay=0.0)
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise BenchmarkError(f"--min-lr-ratio must lie in [0, 1], got {args.min_lr_ratio}")
    schedule = build_scheduler(optimizer, args.warmup, args.steps, min_ratio=args.min_lr_ratio)
    if args.retrieval_loss < 0 or (args.retrieval_loss and not has_memory(model)):
        raise BenchmarkError(f"--retrieval-loss must be >= 0, and needs a model with HSA blocks, got "
                             f"{args.retrieval_loss} for use_hsa={model.config.use_hsa}")
    batch = dict(tokenizer=tokenizer, size=args.batch_size, min_length=args.min_length, length=args.length,
                 max_depth=args.max_depth, task=args.task, chunk_size=model.config.chunk_size)
    loss_fn = None  # the answer's loss alone (model(...).loss), unless --retrieval-loss
    if args.retrieval_loss:
        def loss_fn(m: HSAHybrid, b: dict[str, torch.Tensor]) -> torch.Tensor:
            return answer_and_retrieval_loss(m, b, b["targets"], args.retrieval_loss)
    try:
        task_batch(random.Random(args.seed), **{**batch, "size": 1, "length": args.min_length})
    except TaskError as err:
        raise BenchmarkError(f"{err}: raise --min-length") from None
    held_out = [task_batch(random.Random(args.seed + 1000 + i), **batch) for i in range(args.eval_batches)]
    rng = random.Random(args.seed)
    rows = ["| step | train loss | held-out loss | answer tokens right | keys right | weight on the needle | seconds |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(rows), flush=True)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, labels, targets = task_batch(rng, **batch)
        step_batch = {"input_ids": ids.to(device), "labels": labels.to(device)}
        if loss_fn is not None:
            step_batch["targets"] = targets.to(device)
        loss = train_step(model, optimizer, step_batch, schedule, clip=1.0,
                          autocast=torch.bfloat16 if autocast else None, loss_fn=loss_fn)
        if step % args.eval_every == 0 or step == args.steps:
            s = evaluate(model, held_out, device, autocast)
            weight = "-" if s.needle_weight is None else f"{s.needle_weight:.3f}"
            rows.append(f"| {step} | {loss.item():.3f} | {s.loss:.3f} | {s.token_accuracy:.3f} | "
                        f"{s.key_accuracy:.3f} | {weight} | {time.perf_counter() - start:.0f} |")
            print(rows[-1], flush=True)
    if args.save:
        model.save_pretrained(args.save)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config field to change, repeatable, e.g. --set hsa_residual=standard --set window=32")
    p.add_argument("--task", default="passkey", help="the task of every prompt (ramba.data.tasks; number answers)")
    p.add_argument("--length", type=int, default=1024, help="longest prompt in tokens")
    p.add_argument("--min-length", type=int, default=256, help="shortest prompt in tokens")
    p.add_argument("--max-depth", type=float, default=1.0, help="deepest needle, a fraction of the haystack")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--min-lr-ratio", type=float, default=1.0,
                   help="cosine decay after the warmup to this fraction of --lr at the last step (1: constant)")
    p.add_argument("--retrieval-loss", type=float, default=0.0, metavar="W",
                   help="add W times the auxiliary retrieval loss (minus the log of the weight on the needle's "
                   "chunks at the answer's positions; ramba.training.retrieval) to the training loss (0: off)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", metavar="DIR", help="start from this saved model (save_pretrained) instead of a fresh "
                   "one; --set then changes its config (fields that keep the weights' shapes); --preset is unused")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--out", help="also write the table, with the command, to this markdown file")
    p.add_argument("--save", help="save the trained model to this directory (for benchmarks.passkey and the others)")
    args = p.parse_args(argv)
    try:
        rows = run(args)
    except BenchmarkError as err:
        raise SystemExit(f"error: {err}") from None
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"`{command_line('learnability', argv)}`\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

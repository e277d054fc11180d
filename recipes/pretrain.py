"""Pre-train an HSAHybrid model: `accelerate launch recipes/pretrain.py [options]`.

With no arguments it trains the `tiny` preset on the built-in synthetic mixture (pass-key and key-value
recall documents over filler text, byte-level tokens) on whatever device accelerate gives it, a CPU being
enough, and writes the model to runs/pretrain/final.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ramba import HSAHybrid, HSAHybridConfig
from ramba.data.synthetic import make_batch, training_mixture
from ramba.tokenizer import ByteTokenizer

logger = logging.getLogger("ramba.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset: tiny, small or ramba-370m")
    p.add_argument("--local-mixer", choices=["swa", "mamba2"], help="override the preset's local mixer")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=16, help="held-out sequences evaluated at the end")
    p.add_argument("--output-dir", default="runs/pretrain", help="the final model goes to OUTPUT_DIR/final")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "eval_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def lr_lambda(warmup: int, total: int):
    """Linear warmup to 1, then cosine decay to 0.1 at `total`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@torch.no_grad()
def evaluate(model: HSAHybrid, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Loss and answer accuracy (all answer tokens right under greedy next-token prediction) of one batch."""
    model.eval()
    out = model(batch["input_ids"], labels=batch["labels"])
    predicted = out.logits[:, :-1].argmax(-1)
    target, mask = batch["input_ids"][:, 1:], batch["answer_mask"][:, 1:]
    correct = ((predicted == target) | ~mask).all(dim=1)
    model.train()
    return float(out.loss), float(correct.float().mean())


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    accelerator = Accelerator()
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1:
        torch.set_num_threads(os.cpu_count() or 1)  # accelerate launch pins one thread per process
    torch.manual_seed(args.seed)
    overrides = {"local_mixer": args.local_mixer} if args.local_mixer else {}
    tokenizer = ByteTokenizer()
    config = HSAHybridConfig.preset(args.preset, **overrides)
    if config.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"preset {args.preset!r} has vocab_size {config.vocab_size} < the byte tokenizer's "
                         f"{tokenizer.vocab_size}")
    model = HSAHybrid(config)
    logger.info("model: %s preset, %s mixer, %.2fM parameters", args.preset, config.local_mixer,
                model.num_parameters() / 1e6)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or getattr(p, "_no_weight_decay", False)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # each process reads its own deterministic stream
    stream = training_mixture(args.seed * 1009 + accelerator.process_index, args.seq_len, tokenizer)
    eval_batch = {k: v.to(accelerator.device)
                  for k, v in make_batch(args.seed + 10**6, args.eval_size, args.seq_len, tokenizer).items()}
    first_loss = None
    bar = tqdm(range(args.steps), desc="pretrain", disable=not accelerator.is_local_main_process)
    for _ in bar:
        ids, labels = (torch.stack(t).to(accelerator.device) for t in zip(*islice(stream, args.batch_size)))
        loss = model(ids, labels=labels).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = loss.item()
        first_loss = last_loss if first_loss is None else first_loss
        bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

    eval_loss, accuracy = evaluate(accelerator.unwrap_model(model), eval_batch)
    logger.info("train loss %.3f -> %.3f; held-out loss %.3f, answer accuracy %.1f%%", first_loss, last_loss,
                eval_loss, 100 * accuracy)
    final = Path(args.output_dir) / "final"
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


if __name__ == "__main__":
    main()

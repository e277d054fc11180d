"""The training loop of the recipes: accelerate, AdamW, warmup + cosine, accumulation, checkpoints, logs."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from ..config import HSAHybridConfig
from ..model import HSAHybrid
from ..parallel.group import Mesh, split_world
from ..tokenizer import load_tokenizer
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, read_state, save_checkpoint
from .config import RunConfig
from .resume import check_resume, check_rng, check_shapes, claim_run_dir
from .data import batches, sequences
from .retrieval import (all_chunk_scores, all_chunks_loss, retrieval_target_loss, span_targets,
                        weight_on_targets)
from .optim import build_optimizer, build_scheduler

logger = logging.getLogger("ramba.train")
EVAL_SEED_OFFSET = 10**6


def build_model(run: RunConfig, vocab: int) -> HSAHybrid:
    if run.model.checkpoint:
        # float32 master weights whatever the checkpoint was saved in (mixed precision is the accelerator's job)
        model = HSAHybrid.from_pretrained(run.model.checkpoint, dtype=torch.float32, **run.model.overrides)
    else:
        model = HSAHybrid(HSAHybridConfig.preset(run.model.preset, **run.model.overrides))
    if model.config.vocab_size < vocab:
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's {vocab}: "
                         f"set model.overrides.vocab_size={vocab}")
    model.gradient_checkpointing = run.train.gradient_checkpointing
    if run.train.trainable == "selection":
        if model.encoder is None:
            raise ValueError("train.trainable=selection trains the chunk selection of HSA blocks, and this model has "
                             "none (use_hsa=false): set train.trainable=all")
        keep = set(model.selection_parameters().values())
        for p in model.parameters():
            p.requires_grad_(p in keep)
    if run.train.compile != "no":
        model.compile_blocks(run.train.compile)
    return model


def retrieval_hits(retrieval: list[torch.Tensor], batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Fraction of answer-predicting positions whose first HSA block selected a chunk holding part of the needle
    (the fact [needle_pos, needle_end) often spans two chunks, and the answer may lie in the second)."""
    indices = retrieval[0]                                             # [B, L, Hr, K]
    predicting = batch["answer_mask"][:, 1:]                           # position t predicts token t + 1
    first = (batch["needle_pos"] // chunk_size)[:, None, None, None]
    last = ((batch["needle_end"] - 1) // chunk_size)[:, None, None, None]
    selected = indices[:, :-1]
    hit = ((selected >= first) & (selected <= last)).flatten(2).any(-1)  # [B, L - 1]
    return hit[predicting].float().mean()


def fact_targets(batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """bool [B, L, C]: the chunks holding the asked facts (batch's fact_spans), at the positions that predict an
    answer token (position t predicts token t + 1)."""
    predicting = torch.nn.functional.pad(batch["answer_mask"][:, 1:], (0, 1))
    return span_targets(batch["fact_spans"], predicting, chunk_size)


def answer_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross entropy of logits [B, L, V] on the answer tokens (batch's answer_mask [B, L]; position t
    predicts token t + 1); 0, still attached to the graph, for a batch without answer tokens."""
    predicting = batch["answer_mask"][:, 1:]
    if not bool(predicting.any()):
        return logits.sum() * 0.0
    flat = logits[:, :-1][predicting].float()
    return torch.nn.functional.cross_entropy(flat, batch["input_ids"][:, 1:][predicting])


def eval_batches(run: RunConfig, tokenizer, seed: int) -> list[dict[str, torch.Tensor]]:
    """Held-out sequences: the first ones of the stream under a separate seed (for a corpus, a differently
    shuffled pass of the same data)."""
    rows = list(itertools.islice(sequences(run.data, tokenizer, seed + EVAL_SEED_OFFSET), run.data.eval_sequences))
    size = run.train.batch_size
    return [{k: torch.stack([r[k] for r in rows[i:i + size]]) for k in rows[0]} for i in range(0, len(rows), size)]


def shard(stream: Iterator[dict[str, torch.Tensor]], mesh: Mesh) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel group's share of one stream: rows rank, rank + size, ... so that N groups with batch
    size B see exactly the sequences that one process with batch size N * B sees (every rank of a
    context-parallel group takes the same rows, then its slice of them)."""
    return itertools.islice(stream, mesh.dp_rank, None, mesh.dp_size)


def slice_batch(batch: dict[str, torch.Tensor], mesh: Mesh) -> dict[str, torch.Tensor]:
    """The model inputs of this rank: under context parallelism its slice of every row's tokens, labels and
    documents."""
    inputs = model_inputs(batch)
    if mesh.cp_size == 1:
        return inputs
    length = inputs["input_ids"].shape[1] // mesh.cp_size
    return {k: v[:, mesh.cp_rank * length:(mesh.cp_rank + 1) * length] for k, v in inputs.items()}


def loss_shares(micro: list[dict[str, torch.Tensor]], accelerator: Accelerator, mesh: Mesh) -> list[float]:
    """Loss weights of one optimizer step's micro-batches on this process: each one's predicted tokens over
    the mean count per micro-batch of the whole global batch (all micro-batches of all processes). With them,
    accumulated and process-averaged gradients equal those of the token-mean loss of the global batch, so
    N processes x B rows x A accumulation steps train exactly like one process with N * B * A rows. Under
    context parallelism a group's C ranks hold the same rows (counted C times in the sum) and each holds part
    of the gradient, which the processes' mean divides by C: the weights are C times larger."""
    counts = torch.tensor([float((b["labels"][:, 1:] != -100).sum()) for b in micro], dtype=torch.float64,
                          device=accelerator.device)
    total = accelerator.reduce(counts.sum(), "sum") if accelerator.num_processes > 1 else counts.sum()
    return (counts * len(micro) * accelerator.num_processes * mesh.cp_size / total.clamp(min=1)).tolist()


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "labels", "doc_ids") if k in batch}


@torch.no_grad()
def evaluate(model: HSAHybrid, held_out: list[dict[str, torch.Tensor]], device: torch.device,
             tasks: Sequence[str] = ()) -> dict[str, float]:
    """Mean loss over the held-out batches; with answers marked (builtin, tasks) the answer accuracy (all answer
    tokens right under greedy next-token prediction), and with rows marked by task (the tasks source; `tasks`
    names them) the answer accuracy of each task as eval_answer_accuracy_<task>; with needles marked (builtin)
    the retrieval hit rate; with the asked facts marked (tasks) and a model with HSA blocks, the mean retrieval
    weight on their chunks at the answer's positions (eval_retrieval_weight_on_facts), and that of each task
    as eval_retrieval_weight_on_facts_<task>."""
    model.eval()
    losses, correct, hits, on_facts = [], [], [], []
    per_task: dict[int, list[float]] = {}
    task_weights: dict[int, list[float]] = {}  # [sum of weights, positions x heads] per task
    facts = getattr(model, "encoder", None) is not None  # a memory to weigh the asked facts' chunks in
    for batch in held_out:
        batch = {k: v.to(device) for k, v in batch.items()}
        weigh = facts and "fact_spans" in batch
        out = model(**model_inputs(batch), return_retrieval="needle_pos" in batch or weigh)
        losses.append(float(out.loss))
        if "answer_mask" in batch:
            predicted = out.logits[:, :-1].argmax(-1)
            mask = batch["answer_mask"][:, 1:]
            right = ((predicted == batch["input_ids"][:, 1:]) | ~mask).all(1).float()
            correct.append(right.mean().item())
            for task, ok in zip(batch.get("task", torch.empty(0)).tolist(), right.tolist()):
                per_task.setdefault(task, []).append(ok)
        if "needle_pos" in batch:
            hits.append(retrieval_hits(out.retrieval, batch, model.config.chunk_size).item())
        if weigh:
            targets = fact_targets(batch, model.config.chunk_size)
            weight = weight_on_targets(out.retrieval, out.retrieval_weights, targets)  # [B, L, N]
            asked = targets.any(-1)
            on_facts.append(weight[asked].mean().item() if bool(asked.any()) else 0.0)
            for task in batch["task"].unique().tolist() if "task" in batch else ():
                of_task = weight[asked & (batch["task"] == task)[:, None]]
                if of_task.numel():
                    total = task_weights.setdefault(task, [0.0, 0])
                    total[0] += of_task.sum().item()
                    total[1] += of_task.numel()
    model.train()
    result = {"eval_loss": sum(losses) / len(losses)}
    if correct:
        result["eval_answer_accuracy"] = sum(correct) / len(correct)
    for task, oks in sorted(per_task.items()):
        result[f"eval_answer_accuracy_{tasks[task] if task < len(tasks) else task}"] = sum(oks) / len(oks)
    if hits:
        result["eval_retrieval_hit"] = sum(hits) / len(hits)
    if on_facts:
        result["eval_retrieval_weight_on_facts"] = sum(on_facts) / len(on_facts)
    for task, (total, count) in sorted(task_weights.items()):
        result[f"eval_retrieval_weight_on_facts_{tasks[task] if task < len(tasks) else task}"] = total / count
    return result


class MetricsLog:
    """metrics.jsonl in the run folder (always) and TensorBoard (optionally); main process only."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, tensorboard: bool):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        self.tensorboard = tensorboard

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step` (the checkpoint a run resumes from), so that no step is logged
        twice: the kept lines are written beside the log and renamed over it."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
        partial = self.path.with_name(".metrics.jsonl.partial")
        with open(partial, "w") as f:
            f.write("".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard:
            self.accelerator.log(values, step=step)


def train(run: RunConfig, resume: bool | str = False, overwrite: bool = False) -> Path:
    """Run (or resume) the training that `run` describes; returns the folder of the final model. A new run
    refuses a train.output_dir that holds another run, unless `overwrite` (which deletes that run's files);
    `resume` (True: the newest checkpoint, or a checkpoint folder) checks that the checkpoint fits `run`."""
    t = run.train
    output_dir = Path(t.output_dir)
    if resume and overwrite:
        raise CheckpointError("--resume continues the run in train.output_dir and --overwrite deletes it: "
                              "give one of them")
    resume_from = find_checkpoint(output_dir, None if resume is True else resume) if resume else None
    state = read_state(resume_from) if resume_from else {}
    # auto: bf16 where accelerate will run on CUDA (not with ACCELERATE_USE_CPU set, even where a GPU is present)
    on_cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    precision = ("bf16" if on_cuda else "no") if t.mixed_precision == "auto" else t.mixed_precision
    # step_scheduler_with_optimizer=False: one schedule step per optimizer step, however many processes
    # cpu= by the same rule as the precision, so that the device and the precision always agree
    accelerator = Accelerator(cpu=not on_cuda, mixed_precision=precision, gradient_accumulation_steps=t.grad_accum,
                              step_scheduler_with_optimizer=False,
                              log_with="tensorboard" if t.tensorboard else None, project_dir=t.output_dir)
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1:
        torch.set_num_threads(os.cpu_count() or 1)  # accelerate launch pins one thread per process
    mesh = split_world(t.context_parallel)
    if resume_from:
        check_resume(state, run, resume_from, mesh.dp_size)
    else:
        claim_run_dir(output_dir, overwrite, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        run.save(output_dir / "config.yaml")
    set_seed(t.seed)
    tokenizer = load_tokenizer(run.data.tokenizer)
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {run.data.tokenizer!r} has no end-of-sequence token to separate documents")
    model = build_model(run, tokenizer.vocab_size)
    if run.data.seq_len % (model.config.chunk_size * mesh.cp_size):
        raise ValueError(f"train.context_parallel={mesh.cp_size} cuts every sequence into {mesh.cp_size} slices of "
                         f"whole chunks: data.seq_len ({run.data.seq_len}) must be a multiple of chunk_size x "
                         f"{mesh.cp_size} = {model.config.chunk_size * mesh.cp_size}")
    optimizer = build_optimizer(model, t.lr, t.weight_decay, tuple(t.betas))
    # the time budget: seconds trained by this run's earlier processes (a resumed run) count towards it
    seconds = state.get("seconds", 0.0) if resume_from else 0.0
    used = [seconds / (t.max_minutes * 60)] if t.max_minutes else None  # share spent, agreed by every process
    scheduler = build_scheduler(optimizer, t.warmup, t.steps, t.min_lr_ratio,
                                (lambda: used[0]) if used else None)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if t.tensorboard:
        accelerator.init_trackers("ramba")
    logger.info("model: %.2fM parameters (%.3fM trained), %s mixer; %d process(es) (context parallel %d), "
                "precision %s", accelerator.unwrap_model(model).num_parameters() / 1e6,
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
                accelerator.unwrap_model(model).config.local_mixer, accelerator.num_processes, mesh.cp_size,
                precision)

    step, consumed = 0, 0  # consumed: sequences of the whole data stream (all processes) trained on
    if resume_from:
        check_shapes(resume_from, accelerator.unwrap_model(model))
        check_rng(resume_from, accelerator.process_index)
        load_checkpoint(accelerator, resume_from)
        step = state["step"]
        # older checkpoints count micro-batches per process
        consumed = state.get("sequences", state.get("position", 0) * t.batch_size * mesh.dp_size)
        logger.info("resumed from %s (step %d)", resume_from, step)
    # skip what earlier runs consumed: the data order stays exactly the same
    stream = batches(shard(itertools.islice(sequences(run.data, tokenizer, t.seed * 1009), consumed, None),
                           mesh), t.batch_size)
    held_out = eval_batches(run, tokenizer, t.seed)
    log = MetricsLog(accelerator, output_dir, t.tensorboard)
    log.rewind(step)
    chunk_size = accelerator.unwrap_model(model).config.chunk_size
    stats = run.data.source == "builtin" and mesh.cp_size == 1  # hits need the whole row's retrievals
    if t.retrieval_loss and accelerator.unwrap_model(model).encoder is None:
        raise ValueError("train.retrieval_loss needs a model with HSA blocks (use_hsa): set train.retrieval_loss=0")
    over_all = bool(t.retrieval_loss) and t.retrieval_loss_over == "all"

    bar = tqdm(total=t.steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    last = start = time.perf_counter()
    out_of_time = bool(used) and used[0] >= 1  # a resumed run whose time budget is spent: no more steps
    if out_of_time:
        logger.info("train.max_minutes (%g) was spent before step %d: writing the final model", t.max_minutes, step)
    while step < t.steps and not out_of_time:
        losses, hits, weights, answers, tokens = [], [], [], [], 0
        micro = [next(stream) for _ in range(t.grad_accum)]
        consumed += t.grad_accum * t.batch_size * mesh.dp_size
        for batch, share in zip(micro, loss_shares(micro, accelerator, mesh)):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model), mesh.context():
                with all_chunk_scores(model) if over_all else contextlib.nullcontext() as scores:
                    out = model(**slice_batch(batch, mesh), return_retrieval=stats or bool(t.retrieval_loss))
                loss = out.loss
                if t.retrieval_loss:
                    targets = fact_targets(batch, chunk_size)
                    aux, on_facts = retrieval_target_loss(out.retrieval, out.retrieval_weights, targets)
                    if over_all:
                        aux = all_chunks_loss(scores, targets)
                    loss = loss + t.retrieval_loss * aux
                    weights.append(on_facts.item())
                if t.answer_loss:
                    answer = answer_cross_entropy(out.logits, batch)
                    loss = loss + t.answer_loss * answer
                    answers.append(answer.item())
                accelerator.backward(loss * share)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), t.clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append((out.loss * share / mesh.cp_size).item())
            tokens += int((batch["labels"] != -100).sum()) // mesh.cp_size  # this rank's share
            if stats:
                hits.append(retrieval_hits(out.retrieval, batch, chunk_size).item())
        step += 1
        now = time.perf_counter()
        local = torch.tensor([sum(losses) / len(losses), tokens, sum(hits) / max(1, len(hits)),
                              sum(weights) / max(1, len(weights)), seconds + now - start,
                              sum(answers) / max(1, len(answers))],
                             dtype=torch.float64, device=accelerator.device)
        mean = accelerator.reduce(local, "mean").tolist()  # the whole global batch, not process 0's share
        if used:
            used[0] = mean[4] / (t.max_minutes * 60)
            out_of_time = used[0] >= 1
            if out_of_time:
                logger.info("train.max_minutes (%g) reached at step %d", t.max_minutes, step)
        done = step == t.steps or out_of_time
        metrics = {"loss": mean[0], "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": mean[1] * accelerator.num_processes / (now - last)}
        last = now
        if hits:
            metrics["retrieval_hit"] = mean[2]
        if weights:
            metrics["retrieval_weight_on_facts"] = mean[3]
        if answers:
            metrics["answer_loss"] = mean[5]
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
        if step % t.log_every == 0 or done:
            log.log(step, metrics)
        if step % t.eval_every == 0 or done:
            result = evaluate(accelerator.unwrap_model(model), held_out, accelerator.device, run.data.tasks)
            log.log(step, result)
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        stopping = t.stop_after is not None and step >= t.stop_after and not done
        if step % t.save_every == 0 or done or stopping:
            save_checkpoint(accelerator, output_dir, step, {"sequences": consumed, "seconds": mean[4],
                                                            "batch_size": t.batch_size,
                                                            "processes": mesh.dp_size,
                                                            "config": run.to_dict()}, t.keep)
        if stopping:
            logger.info("stopping after step %d as asked; continue with --resume", step)
            bar.close()
            return output_dir
    bar.close()
    final = output_dir / "final"
    weights = accelerator.get_state_dict(model)  # gathered from every process under FSDP
    if accelerator.is_main_process:
        plain = HSAHybrid(accelerator.unwrap_model(model).config)
        plain.load_state_dict(weights)
        plain.save_pretrained(final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final

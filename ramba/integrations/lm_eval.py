"""ramba models in lm-evaluation-harness (`pip install lm-eval`): the model type "ramba".

Importing this module registers `RambaLM` as lm-eval's model "ramba" (`import ramba` does not import it). Run
lm-eval's own command line with the registration done, `--model ramba` filled in when not given:

    python -m ramba.integrations.lm_eval --model_args pretrained=benchmarks/models/swa-passkey,dtype=float32 \\
        --tasks ramba_passkey_mc --include_path tests/data/lm_eval --device cpu

Every other lm-eval option works as usual (`--limit`, `--batch_size`, `--output_path`, `ls tasks`, ...).
`pretrained` is a folder written by `HSAHybrid.save_pretrained` or `builtin:tiny-random`; the other model
arguments are `dtype` (auto, float32, bfloat16, ...), `segment_size` (tokens per model call: longer inputs go
through the inference cache segment by segment, so any length fits) and `max_gen_toks` (default length of a
generation). lm-eval's default device is cuda:0: give `--device cpu` on a machine without a GPU. From Python:

    import lm_eval, ramba.integrations.lm_eval
    lm_eval.simple_evaluate(model="ramba", model_args="pretrained=DIR,dtype=float32", tasks=[...], device="cpu")
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("ramba's lm-evaluation-harness integration needs lm-eval: pip install lm-eval") from err

from ramba.generation import prefill_segments
from ramba.loading import load_model
from ramba.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from ramba.model import HSAHybrid

__all__ = ["RambaLM", "main"]

logger = logging.getLogger(__name__)

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")  # what generate_until understands


def _positive_int(name: str, value: Any) -> int:
    """`value` (an int, or a string as lm-eval may pass it) as an int >= 1; ValueError naming `name` otherwise."""
    try:
        number = int(str(value).strip().strip("'\""))
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


class RambaLM(LM):
    """An HSAHybrid behind lm-eval's LM interface: loglikelihood, loglikelihood_rolling and generate_until.

    Every input runs through the model's inference cache in segments of at most `segment_size` tokens, so
    contexts of any length are scored exactly; only the positions that predict scored tokens get logits.
    `batch_size` rows are scored together (left-padded, the padding inside the first segment); generation
    runs one request at a time. Arguments as in the module docstring; lm-eval passes --model_args values as
    strings or numbers, both work. max_batch_size and trust_remote_code (given by lm-eval) are ignored.
    """

    def __init__(self, pretrained: str | Path | None = None, device: str = "cpu", dtype: str = "auto",
                 batch_size: int | str = 1, segment_size: int | str = 4096, max_gen_toks: int | str = 256,
                 max_batch_size: int | str | None = None, trust_remote_code: bool = False, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model argument(s) {', '.join(sorted(unknown))} for model 'ramba'; known: "
                             "pretrained, device, dtype, batch_size, segment_size, max_gen_toks")
        if pretrained is None or not str(pretrained).strip():
            raise ValueError("pretrained is required: a folder written by HSAHybrid.save_pretrained or "
                             "builtin:tiny-random (--model_args pretrained=...)")
        if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
            logger.warning("batch_size=%s: automatic batch sizes are not supported by model 'ramba'; using 1",
                           batch_size)
            batch_size = 1
        self._batch_size = _positive_int("batch_size", batch_size)
        self.segment_size = _positive_int("segment_size", segment_size)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if max_batch_size is not None:
            logger.info("max_batch_size=%s is ignored (no automatic batch size)", max_batch_size)
        device = "cpu" if device is None else str(device)
        try:
            self._device = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device {device!r} is not a torch device: give cpu, cuda or cuda:N") from err
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here; use cpu (--device cpu, which "
                             "lm-eval's command line needs on such a machine: its default is cuda:0)")
        self.pretrained = str(pretrained)
        self.model: HSAHybrid = load_model(self.pretrained, self._device, "auto" if dtype is None else dtype)
        checkpoint = None if self.pretrained.startswith("builtin:") else self.pretrained
        self.tokenizer = load_tokenizer(None, checkpoint=checkpoint)
        if self.eot_token_id is None:
            raise ValueError(f"the tokenizer of {self.pretrained!r} has neither an eos nor a bos token, needed as "
                             "the context of an empty prompt")
        logger.info("ramba model %s: %.1fM parameters, %s on %s, tokenizer %s, segment_size=%d, batch_size=%d",
                    self.pretrained, self.model.num_parameters() / 1e6, self.model.embed.weight.dtype, self._device,
                    self.tokenizer.name, self.segment_size, self._batch_size)

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int | None:
        """The end-of-text id: the context of an empty prompt and the stop token of generation."""
        tok = self.tokenizer
        return tok.eos_id if tok.eos_id is not None else tok.bos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    # ------------------------------------------------------------------ scoring
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, encoded separately (the continuation's are the scored ones);
        trailing whitespace of the context moves to the continuation, as lm-eval's own models do; an empty
        context is the EOT token."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.tokenizer.encode(context) if context else []
        return context_ids or [self.eot_token_id], self.tokenizer.encode(continuation) if continuation else []

    def _batches(self, rows: list[tuple[list[int], int]]) -> list[list[int]]:
        """Indices of `rows` grouped into batches of at most batch_size, longest first, such that every row's left
        padding fits in the first segment (at most segment_size - 1 tokens)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        batches: list[list[int]] = []
        for i in order:
            batch = batches[-1] if batches else None
            if (batch is None or len(batch) == self._batch_size
                    or len(rows[batch[0]][0]) - len(rows[i][0]) >= self.segment_size):
                batches.append([i])
            else:
                batch.append(i)
        return batches

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """rows: (ids, k) with len(ids) > k >= 1: the log-probability of the last k ids given those before, and
        whether each of them is the argmax. The inputs ids[:-1] are left-padded to one length L and fed through
        a fresh cache in segments; logits [B, keep, V] come only for the last max(k) positions."""
        model, device = self.model, self._device
        B = len(rows)
        L = max(len(ids) - 1 for ids, _ in rows)
        pad = 0 if self.tokenizer.pad_id is None else self.tokenizer.pad_id
        inputs = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        targets = torch.zeros(B, L, dtype=torch.long)  # targets[b, t]: the id that position t predicts
        scored = torch.zeros(B, L, dtype=torch.bool)
        for b, (ids, k) in enumerate(rows):
            n = len(ids) - 1
            inputs[b, L - n:] = torch.tensor(ids[:-1])
            mask[b, L - n:] = 1
            targets[b, L - k:] = torch.tensor(ids[-k:])
            scored[b, L - k:] = True
        padded = bool((mask == 0).any())
        first_scored = L - max(k for _, k in rows)
        total = torch.zeros(B, dtype=torch.float64)
        greedy = torch.ones(B, dtype=torch.bool)
        cache = model.new_cache(B)
        for i, (start, end) in enumerate(prefill_segments(L, self.segment_size, mask if padded else None)):
            keep = max(0, end - max(start, first_scored))
            padding = {"attention_mask": mask[:, start:end].to(device)} if padded and i == 0 else {}
            out = model(inputs[:, start:end].to(device), cache=cache, logits_to_keep=keep, **padding)
            if keep == 0:
                continue
            logprobs = F.log_softmax(out.logits.float(), dim=-1).cpu()  # [B, keep, V]
            span = slice(end - keep, end)
            target, where = targets[:, span], scored[:, span]
            picked = logprobs.gather(-1, target[..., None])[..., 0]  # [B, keep]
            total += torch.where(where, picked, torch.zeros_like(picked)).double().sum(1)
            greedy &= ((logprobs.argmax(-1) == target) | ~where).all(1)
        return [(float(total[b]), bool(greedy[b])) for b in range(B)]

    def _score(self, rows: list[tuple[list[int], int]], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """_score_batch over all rows in batches (k == 0 scores (0.0, True) without the model), in input order."""
        results: list[tuple[float, bool] | None] = [(0.0, True) if k == 0 else None for _, k in rows]
        todo = [i for i, (_, k) in enumerate(rows) if k > 0]
        bar = tqdm(total=len(rows), desc=desc, disable=disable_tqdm)
        bar.update(len(rows) - len(todo))
        for batch in self._batches([rows[i] for i in todo]):
            for j, result in zip(batch, self._score_batch([rows[todo[j]] for j in batch])):
                results[todo[j]] = result
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests[i].args = (context, continuation) -> (log P(continuation | context), whether greedy decoding
        gives the continuation), one per request."""
        rows = []
        for request in requests:
            context, continuation = request.args[:2]
            context_ids, continuation_ids = self._split(context, continuation)
            rows.append((context_ids + continuation_ids, len(continuation_ids)))
        results = self._score(rows, "loglikelihood requests", disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """requests[i].args = (text,) -> log P(text), every token scored once, the first given the EOT token."""
        rows = []
        for request in requests:
            ids = self.tokenizer.encode(request.args[0]) if request.args[0] else []
            rows.append(([self.eot_token_id, *ids], len(ids)))
        results = [total for total, _ in self._score(rows, "loglikelihood_rolling requests", disable_tqdm)]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    # ------------------------------------------------------------------ generation
    def _generation_args(self, gen_kwargs: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
        """lm-eval's gen_kwargs -> (the until strings, model.generate's keyword arguments)."""
        kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"unsupported generation argument(s) {', '.join(unknown)} for model 'ramba'; "
                             f"supported: {', '.join(GEN_KWARGS)}")
        until = kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"until must be a string or a list of strings, got {kwargs.get('until')!r}")
        max_new = kwargs.get("max_gen_toks")
        max_new = self._max_gen_toks if max_new is None else _positive_int("max_gen_toks", max_new)
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0 if do_sample else 0.0))
        top_p = float(kwargs.get("top_p", 1.0))
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        sample = do_sample and temperature > 0  # temperature 0 means greedy, as in lm-eval's other models
        return [s for s in until if s], {"max_new_tokens": max_new, "do_sample": sample,
                                          "temperature": temperature if sample else 1.0, "top_p": top_p}

    @torch.no_grad()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """requests[i].args = (context, gen_kwargs) -> the continuation that model.generate gives (stopping at the
        EOT token), cut before the first of gen_kwargs["until"]."""
        results = []
        eot = self.eot_token_id
        for request in tqdm(requests, desc="generate_until requests", disable=disable_tqdm):
            context, gen_kwargs = request.args[:2]
            until, kwargs = self._generation_args(gen_kwargs)
            context_ids = (self.tokenizer.encode(context) if context else []) or [eot]
            prompt = torch.tensor([context_ids], dtype=torch.long)  # [1, L]
            sequences = self.model.generate(prompt, stop_tokens=[eot], segment_size=self.segment_size, **kwargs)
            new = sequences[0, len(context_ids):].tolist()
            if eot in new:
                new = new[:new.index(eot)]
            text = self.tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results


if __name__ != "__main__":  # run as a script, main() imports this module under its own name, which registers
    register_model("ramba")(RambaLM)


def _with_default_model(args: list[str]) -> list[str]:
    """lm-eval command-line arguments with `--model ramba` added to a run that names no model (neither on the
    command line nor in a --config YAML)."""
    if not args or args[0] in ("ls", "validate") or args in (["run"], ["-h"], ["--help"]):
        return args
    if any(a in ("--model", "-M") or a.startswith(("--model=", "-M=")) for a in args):
        return args
    for flag, value in zip(args, args[1:]):
        if flag in ("--config", "-C") and Path(value).is_file():
            import yaml

            config = yaml.safe_load(Path(value).read_text())
            if isinstance(config, dict) and config.get("model"):
                return args
    return [*args, "--model", "ramba"]


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`lm-eval run ...`, or its options without `run`) with model "ramba" registered
    and the default model; argv defaults to sys.argv[1:]."""
    from lm_eval.__main__ import cli_evaluate

    args = _with_default_model(list(sys.argv[1:] if argv is None else argv))
    sys.argv = [sys.argv[0] if sys.argv else "ramba.integrations.lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    from ramba.integrations.lm_eval import main as _main  # the registered module, not this __main__ copy

    _main()

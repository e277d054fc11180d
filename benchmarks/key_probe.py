r"""Which representations of a model tell the keys of a multi-key needle prompt apart: linear probes on
frozen features of niah_multikey_1 prompts (four needles " One hidden number for <adjective>-<noun> is
<value>.", one asked).

python -m benchmarks.key_probe --checkpoint DIR [--prompts 3000] [--min-length 512] [--length 760]
    [--seed 1] [--device cpu] [--out FILE.md]

Features, from the first HSA block: the retrieval input and query at the position that predicts the first
answer digit (the asked key is a few tokens back); for each needle, the summary that its landmark projects
(the CLS output, or the mean of the chunk) and the landmark, of the chunk holding its value's first digit;
for the first needle, the chunk encoder's input and output at the '-' after the adjective. Probes are fitted
on the first 70% of the prompts and scored on the rest:
- "which needle": a bilinear score (rank 64) between the answer's features and each needle's, softmax over
  the four; beside it the same fit on shuffled labels (chance) and the model's own retrieval scores.
- "which adjective": softmax regression from one feature vector to the adjective (one of 35).
Byte tokenizer only (positions are byte offsets). Prompts whose needles share a chunk, or whose last needle
is in the incomplete final chunk, are skipped.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import command_line
from ramba import HSAHybrid
from ramba.data.tasks.filler import ADJECTIVES
from ramba.data.tasks import TASKS
from ramba.layers.hsa import HSA
from ramba.loading import load_model
from ramba.probing import HELD_IN, bilinear_probe, linear_probe
from ramba.tokenizer import ByteTokenizer

NEEDLE = re.compile(r" One hidden number for ([a-z]+)-[a-z]+ is (\d+)\.")


@dataclass
class Features:
    """Frozen features of N prompts; Hr*dr = retrieval heads x retrieval dim, d = d_model."""

    query_in: torch.Tensor  # [N, d] the retrieval input at the position that predicts the first answer digit
    query: torch.Tensor  # [N, Hr*dr]
    summary: torch.Tensor  # [N, 4, d] what each needle chunk's landmark projects
    landmark: torch.Tensor  # [N, 4, Hr*dr]
    token_in: torch.Tensor  # [N, d] the encoder's input at the '-' after the first needle's adjective
    token_out: torch.Tensor | None  # [N, d] the encoded token there (None without encoder layers)
    asked: torch.Tensor  # [N] which needle (0-3, in prompt order) is asked
    adjectives: torch.Tensor  # [N, 4] each needle's adjective (index into ADJECTIVES)


def needles(ids: list[int], offsets: list[int]) -> list[tuple[int, int, str, str]]:
    """(position of the '-' after the adjective, position of the value's first digit, value, adjective) of each
    needle, in prompt order; ids are bytes and offsets the needles' token offsets."""
    out = []
    for start in sorted(offsets):
        match = NEEDLE.match(bytes(ids[start:start + 96]).decode("latin-1"))
        if match is None:
            raise ValueError(f"no multi-key needle at offset {start}")
        out.append((start + match.end(1), start + match.start(2), match.group(2), match.group(1)))
    return out


def collect(model: HSAHybrid, prompts: int, seed: int, min_length: int, length: int) -> Features:
    """Features of up to `prompts` niah_multikey_1 prompts of min_length..length tokens (some are skipped)."""
    tokenizer = ByteTokenizer()
    S = model.config.chunk_size
    hsa = next(m for m in model.modules() if isinstance(m, HSA))
    encoder = model.encoder
    grab: dict[str, torch.Tensor] = {}

    def keep(name: str, which: str):
        def hook(module, inputs, output):
            grab[name] = (inputs[0] if which == "in" else output).detach()
        return hook

    hooks = [hsa.qr_proj.register_forward_hook(keep("query_in", "in")),
             hsa.qr_proj.register_forward_hook(keep("query", "out")),
             encoder.lmk_proj.register_forward_hook(keep("summary", "in")),
             encoder.lmk_proj.register_forward_hook(keep("landmark", "out")),
             encoder.register_forward_hook(keep("token_in", "in"))]
    if encoder.layers:
        hooks.append(encoder.layers[-1].register_forward_hook(keep("token_out", "out")))
    rows: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(Features)}
    rng = random.Random(seed)
    device = next(model.parameters()).device
    try:
        for _ in tqdm(range(prompts), desc="prompts", leave=False):
            sample = TASKS["niah_multikey_1"](rng, tokenizer, rng.randint(min_length, length))
            ids = sample.prompt_ids.tolist()
            found = needles(ids, sample.insert_offsets)
            chunks = [value // S for _, value, _, _ in found]
            if len(set(chunks)) < len(found) or max(chunks) >= len(ids) // S:
                continue
            full = torch.tensor(ids + tokenizer.encode(sample.target), device=device)[None]
            with torch.no_grad():
                model(full)
            dash = found[0][0]
            rows["query_in"].append(grab["query_in"][0, len(ids)])
            rows["query"].append(grab["query"][0, len(ids)])
            rows["summary"].append(grab["summary"][chunks])
            rows["landmark"].append(grab["landmark"][chunks])
            rows["token_in"].append(grab["token_in"][0, dash])
            if encoder.layers:
                rows["token_out"].append(grab["token_out"][dash // S, dash % S])
            rows["asked"].append(torch.tensor(next(i for i, f in enumerate(found) if f[2] in sample.references)))
            rows["adjectives"].append(torch.tensor([ADJECTIVES.index(f[3]) for f in found]))
    finally:
        for hook in hooks:
            hook.remove()
    if not rows["asked"]:
        raise ValueError("no usable prompt: use more --prompts or longer prompts")
    stacked = {k: torch.stack(v).cpu() if v else None for k, v in rows.items()}
    return Features(**{k: v.float() if v is not None and v.is_floating_point() else v for k, v in stacked.items()})


def report(f: Features, seed: int = 0) -> str:
    """The markdown table of every probe."""
    n = len(f.asked)
    if n < 20:
        raise ValueError(f"only {n} usable prompts, too few to fit probes: use more --prompts")
    cut = int(n * HELD_IN)
    shuffled = f.asked[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    own = torch.einsum("nd,ncd->nc", f.query, f.landmark).argmax(1)
    k = len(ADJECTIVES)
    asked_adjective = f.adjectives[torch.arange(n), f.asked]
    needle, adjective = "which needle", "a needle's adjective"
    rows = [
        (needle, "the model's own retrieval scores (query . landmark)", (own[cut:] == f.asked[cut:]).float().mean()),
        (needle, "bilinear: retrieval input . needle chunk summaries",
         bilinear_probe(f.query_in, f.summary, f.asked, seed)),
        (needle, "the same, labels shuffled (chance)", bilinear_probe(f.query_in, f.summary, shuffled, seed)),
        (needle, "bilinear: query . landmarks", bilinear_probe(f.query, f.landmark, f.asked, seed)),
        ("asked adjective", "from the retrieval input at the answer",
         linear_probe(f.query_in, asked_adjective, k, seed)),
        ("asked adjective", "from the query", linear_probe(f.query, asked_adjective, k, seed)),
        (adjective, "from its chunk summary", linear_probe(f.summary[:, 0], f.adjectives[:, 0], k, seed)),
        (adjective, "from its landmark", linear_probe(f.landmark[:, 0], f.adjectives[:, 0], k, seed)),
        (adjective, "from the encoder input at the '-' after it",
         linear_probe(f.token_in, f.adjectives[:, 0], k, seed)),
    ]
    if f.token_out is not None:
        rows.append((adjective, "from the encoded token there", linear_probe(f.token_out, f.adjectives[:, 0], k, seed)))
    lines = [f"{n} prompts, probes fitted on {cut} and scored on {n - cut}; chance: 0.25 for which needle, "
             f"1/{k} = {1 / k:.3f} for an adjective.", "",
             "| question | features | held-out accuracy |", "| --- | --- | ---: |"]
    lines += [f"| {q} | {what} | {float(acc):.3f} |" for q, what, acc in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a directory written by HSAHybrid.save_pretrained, or builtin:tiny-random")
    p.add_argument("--prompts", type=int, default=3000, help="prompts drawn (about half are usable)")
    p.add_argument("--min-length", type=int, default=512)
    p.add_argument("--length", type=int, default=760)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if not 448 <= args.min_length <= args.length:
        p.error("--min-length must be at least 448 (four needles need it) and at most --length")
    try:
        model = load_model(args.checkpoint, args.device, "float32")
    except ValueError as err:
        p.error(f"--checkpoint: {err}")
    if not model.config.use_hsa:
        p.error(f"{args.checkpoint} has no HSA block to probe")
    text = report(collect(model, args.prompts, args.seed, args.min_length, args.length))
    print(text)
    if args.out:
        Path(args.out).write_text(f"`{command_line('key_probe', argv)}`\n\n{text}")
    return text


if __name__ == "__main__":
    main()

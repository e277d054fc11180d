"""The segment-wise sharded prefill (ramba.parallel.prefill) on 2 and 4 gloo processes: every round's logits,
selected chunks and weights equal one process's full forward over the whole prompt (float64), for both mixers
and a mix, with and without offload, Mamba2 resets and retrieval beyond the window; each rank keeps the chunks
of its own pieces; decoding afterwards equals the full forward too; `prefill_sharded` gives the prompt's last
logits; bad input fails with a clear error on every rank. Units: `rounds`, and a rank's top-k over scattered
chunks against a brute-force reference."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ramba import HSAHybrid
from ramba.memory import ChunkMemory
from ramba.parallel import context_parallel
from ramba.parallel.group import ContextParallel
from ramba.parallel.prefill import prefill_round, prefill_sharded, rounds
from ramba.parallel.store import ShardedStore
from test_context_parallel_model import config_for, init_gloo

DECODE = 20


def check_rounds(rank: int, size: int, mixer: str | list[str], seed: int) -> None:
    rnd = random.Random(seed)
    chunk = 16
    segment = chunk * rnd.randint(1, 3)
    window = rnd.randint(2, segment + 1)
    config = config_for(mixer, chunk, rnd.randint(1, 4), window, rnd.choice(["standard", "bypass"]),
                        reset=7 if seed % 2 else 0)
    if seed % 3 == 0 and mixer == "swa":  # retrieval beyond the window needs SWA under every HSA block
        config = dataclasses.replace(config, window=max(window, chunk), retrieve_beyond_window=True)
    offload = seed % 4 == 1
    torch.manual_seed(seed)
    model = HSAHybrid(config).double().eval()
    length = chunk * size * rnd.randint(2, 6)
    prompt = torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    least = max(chunk, config.window - 1, config.d_conv - 1)
    plan = rounds(length, size, segment, least)
    what = f"{mixer} seed {seed} ({size} ranks, {length=}, {plan=}, {config.topk=}, {config.window=}, {offload=})"

    cache = model.new_cache(2, offload=offload)
    pieces, steps, tokens = [], [], []
    with torch.no_grad(), context_parallel() as cp:
        for start, piece in plan:
            begin = start + rank * piece
            x, retrieval = prefill_round(model, prompt[:, begin:begin + piece], cache, start, cp)
            pieces.append((begin, piece, model.lm_head(model.norm(x)), retrieval))
        logits = pieces[-1][2][:, -1]
        for _ in range(DECODE):
            token = logits.argmax(-1, keepdim=True)
            dist.broadcast(token, size - 1)  # the prompt's last logits are the last rank's
            tokens.append(token)
            out = model(token, cache=cache, return_retrieval=True)
            steps.append(out)
            logits = out.logits[:, -1]
    tokens = torch.cat(tokens, dim=1)
    with torch.no_grad():
        want = model(torch.cat([prompt, tokens], dim=1), return_retrieval=True)
    close = dict(rtol=0, atol=1e-9, msg=lambda m: f"{what}: {m}")
    for begin, piece, logits, retrieval in pieces:
        torch.testing.assert_close(logits, want.logits[:, begin:begin + piece], **close)
        for block, (indices, weights) in enumerate(retrieval):
            assert torch.equal(indices, want.retrieval[block][:, begin:begin + piece]), f"{what}: {begin=} {block=}"
            torch.testing.assert_close(weights, want.retrieval_weights[block][:, begin:begin + piece], **close)
    for t, out in enumerate(steps):
        torch.testing.assert_close(out.logits[:, 0], want.logits[:, length + t], **close)
        for block in range(len(out.retrieval)):
            assert torch.equal(out.retrieval[block][:, 0], want.retrieval[block][:, length + t]), f"{what}: step {t}"
    # the chunks of this rank's pieces, then (the last rank) those completed while decoding
    held = [c for start, piece in plan for c in range((start + rank * piece) // chunk, (start + (rank + 1) * piece) // chunk)]
    if rank + 1 == size:
        held += list(range(length // chunk, (length + DECODE) // chunk))
    assert cache.store.ids.tolist() == held and cache.store.total == (length + DECODE) // chunk, what

    # prefill_sharded (an all-SWA upper stack: run at the end only), then decoding from it
    again = model.new_cache(2, offload=offload)
    with torch.no_grad():
        logits = prefill_sharded(model, prompt, again, segment)
        torch.testing.assert_close(logits, want.logits[:, length - 1], **close)
        with context_parallel():
            for t in range(5):
                logits = model(tokens[:, t:t + 1], cache=again).logits[:, 0]
                torch.testing.assert_close(logits, want.logits[:, length + t], **close)


def check_bad_input(rank: int, size: int) -> None:
    model = HSAHybrid(config_for("swa", 16, 2, 8, "standard")).double().eval()
    ids = torch.randint(0, 40, (1, 32 * size), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        prefill_sharded(model, ids, model.new_cache(1), 24)
    with pytest.raises(ValueError, match=f"length a multiple of {16 * size}"):
        prefill_sharded(model, ids[:, :-16], model.new_cache(1), 16)
    with pytest.raises(ValueError, match="the same whole prompt"):
        prefill_sharded(model, ids + (rank == 0), model.new_cache(1), 16)
    used = model.new_cache(1)
    prefill_sharded(model, ids, used, 16)
    with pytest.raises(ValueError, match="fresh cache"):
        prefill_sharded(model, ids, used, 16)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        prefill_sharded(model, ids, model.new_cache(1), 16)


def check_local_topk(rank: int, size: int) -> None:
    """A rank's top-k over scattered chunks (some ties) equals a brute force over the chunks it holds."""
    config = config_for("swa", 16, 3, 24, "standard")
    gen = torch.Generator().manual_seed(31 + rank)
    total, hr, dr = 12, config.num_retrieval_heads, config.retrieval_dim
    ids = sorted(random.Random(rank).sample(range(total), 5))
    landmarks = torch.randint(0, 2, (2, total, hr, dr), generator=gen).double()
    qr = torch.randint(0, 2, (2, 9, hr, dr), generator=gen).double()
    positions = torch.randint(0, 16 * (total + 1), (2, 9), generator=gen)
    store = ShardedStore(config, 2, torch.device("cpu"), torch.float64, False, ContextParallel())
    for c in ids:
        store.own(ChunkMemory(landmarks[:, c:c + 1], torch.randn(2, 16, 1, 16, dtype=torch.float64, generator=gen),
                              torch.randn(2, 16, 1, 16, dtype=torch.float64, generator=gen)), c)
    store.grow(total)
    for window in (None, 24):
        got, scores = store.local_topk(qr, config.topk, 16, positions, window, "torch")
        for b in range(2):
            for t in range(9):
                limit = int(positions[b, t]) - (0 if window is None else window - 16)
                for h in range(hr):
                    seen = [(float(qr[b, t, h] @ landmarks[b, c, h]) / dr ** 0.5, c) for c in ids if (c + 1) * 16 <= limit]
                    best = sorted(seen, reverse=True)[:config.topk]  # highest score, then the more recent chunk
                    want = sorted((c for _, c in best), reverse=True)
                    row = [c for c in got[b, t, h].tolist() if c >= 0]
                    assert row == want, (window, b, t, h, row, want)


def worker(rank: int, size: int, init_file: str, cases: list[tuple[str | list[str], int]]) -> None:
    init_gloo(rank, size, init_file)
    try:
        for mixer, seed in cases:
            check_rounds(rank, size, mixer, seed)
        check_bad_input(rank, size)
        check_local_topk(rank, size)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size,cases", [(2, [("swa", 1), ("mamba2", 2), ("swa", 3), ("mamba2", 5),
                                            (["mamba2", "swa", "mamba2"], 6)]),
                                        (4, [("swa", 12), ("mamba2", 9)])], ids=["2", "4"])
def test_context_parallel_prefill_matches_one_process(size, cases, tmp_path):
    mp.spawn(worker, args=(size, str(tmp_path / "init"), cases), nprocs=size, join=True)


@pytest.mark.parametrize("length,size,segment,least,want", [
    (64, 2, 16, 16, [(0, 16), (32, 16)]),
    (96, 2, 32, 16, [(0, 32), (64, 16)]),
    (96, 2, 32, 17, [(0, 48)]),                 # a remainder shorter than `least` joins the round before
    (128, 4, 64, 16, [(0, 32)]),                # one round: each rank's quarter
    (224, 2, 48, 47, [(0, 48), (96, 64)]),
])
def test_context_parallel_rounds(length, size, segment, least, want):
    assert rounds(length, size, segment, least) == want
    assert sum(size * piece for _, piece in want) == length

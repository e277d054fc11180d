"""A cache sharded across 2 and 4 gloo processes (ramba.parallel.cache): the sharded prefill of a prompt and
greedy decoding past it give the one-process cache's logits, selected chunks and weights at every step
(float64, segment-wise prefill on one process), for both mixers and a mix; each rank holds only its own
chunks; the decoding traffic is what the module says; ties between ranks' proposals go as on one process; bad
input fails with a clear error on every rank."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ramba import HSAHybrid
from ramba.memory import ChunkMemory
from ramba.ops import hsa_retrieve
from ramba.parallel import context_parallel, reset_traffic, traffic
from ramba.parallel.store import ShardedStore
from ramba.generation import generate
from ramba.parallel.group import ContextParallel
from ramba.parallel.generation import generate_sharded
from test_context_parallel_model import config_for, init_gloo

DECODE = 20  # more than a chunk: the last rank stores a chunk completed while decoding, and later tokens read it


def one_process(model: HSAHybrid, prompt: torch.Tensor, tokens: torch.Tensor, offload: bool,
                rnd: random.Random) -> tuple[list, list]:
    """The one-process cache: the prompt in random segments, then `tokens` [B, T] one at a time; the outputs
    of the prompt's segments and of the steps."""
    cache = model.new_cache(prompt.shape[0], offload=offload)
    cuts = sorted({rnd.randrange(1, prompt.shape[1]) for _ in range(rnd.randint(0, 3))})
    bounds = [0, *cuts, prompt.shape[1]]
    prefill = [model(prompt[:, a:b], cache=cache, return_retrieval=True) for a, b in zip(bounds, bounds[1:])]
    steps = [model(tokens[:, t:t + 1], cache=cache, return_retrieval=True) for t in range(tokens.shape[1])]
    return prefill, steps


def check_decoding(rank: int, size: int, mixer: str | list[str], seed: int) -> None:
    rnd = random.Random(seed)
    chunk = 16
    per_rank = chunk * rnd.randint(1, 2)
    config = config_for(mixer, chunk, rnd.randint(1, 4), rnd.randint(2, per_rank + 1),
                        rnd.choice(["standard", "bypass"]), reset=7 if seed % 2 else 0)  # odd seeds: Mamba2 resets
    offload = seed % 3 == 0
    torch.manual_seed(seed)
    model = HSAHybrid(config).double().eval()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (2, per_rank * size), generator=gen)
    lo, hi = rank * per_rank, (rank + 1) * per_rank

    cache = model.new_cache(2, offload=offload)
    got, tokens, moved = [], [], []
    with torch.no_grad(), context_parallel():
        out = model(prompt[:, lo:hi], cache=cache, return_retrieval=True)
        got.append(out)
        for _ in range(DECODE):
            tokens.append(got[-1].logits[:, -1].argmax(-1, keepdim=True))  # greedy
            if len(tokens) == 1:  # the prompt's last logits are the last rank's; then every rank has them
                dist.broadcast(tokens[0], size - 1)
            reset_traffic()
            got.append(model(tokens[-1], cache=cache, return_retrieval=True))
            moved.append(traffic())
    tokens = torch.cat(tokens, dim=1)
    with torch.no_grad():
        want = model(torch.cat([prompt, tokens], dim=1), return_retrieval=True)  # one full forward: same tokens
        prefill, steps = one_process(model, prompt, tokens, offload, rnd)

    what = f"{mixer} seed {seed} ({size} ranks, {per_rank=}, {config.topk=}, {config.window=}, {offload=})"
    close = dict(rtol=0, atol=1e-9, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(got[0].logits, torch.cat([p.logits for p in prefill], dim=1)[:, lo:hi], **close)
    torch.testing.assert_close(got[0].logits, want.logits[:, lo:hi], **close)
    for step, (mine, theirs) in enumerate(zip(got[1:], steps, strict=True)):
        torch.testing.assert_close(mine.logits, theirs.logits, **close)
        for block in range(len(theirs.retrieval)):
            assert torch.equal(mine.retrieval[block], theirs.retrieval[block]), f"{what}: step {step}, block {block}"
            torch.testing.assert_close(mine.retrieval_weights[block], theirs.retrieval_weights[block], **close)
    # each rank holds its own chunks; the last one also those completed while decoding
    own = per_rank // chunk
    new = (per_rank * size + DECODE) // chunk - size * own if rank + 1 == size else 0
    held = list(range(rank * own, (rank + 1) * own)) + list(range(size * own, size * own + new))
    assert cache.store.ids.tolist() == held and cache.store.count.tolist() == [own + new] * 2, what
    assert cache.lengths.tolist() == [per_rank * size + DECODE] * 2
    # per decoded token and HSA layer: (score, index) pairs gathered, the partial outputs all-reduced
    hsa_layers = config.n_upper_layers
    pairs = (size - 1) * 2 * config.num_retrieval_heads * config.topk * 16
    outputs = 2 * (size - 1) * (2 * config.num_heads * config.head_dim * 8) // size
    assert all(m == {"p2p": 0, "all_gather": hsa_layers * pairs, "all_reduce": hsa_layers * outputs, "all_to_all": 0}
               for m in moved), \
        (what, moved[0])


def check_ties(rank: int, size: int) -> None:
    """The global top-k of the ranks' proposals is one process's, also with many equal scores (landmarks and
    queries of zeros and ones): the more recent chunk wins a tie."""
    config = config_for("swa", 16, 3, 8, "standard")
    gen = torch.Generator().manual_seed(11)
    per_rank, hr, dr = 3, config.num_retrieval_heads, config.retrieval_dim
    landmarks = torch.randint(0, 2, (2, per_rank * size, hr, dr), generator=gen).double()
    qr = torch.randint(0, 2, (2, 9, hr, dr), generator=gen).double()
    positions = torch.randint(0, 16 * (per_rank * size + 1), (2, 9), generator=gen)
    store = ShardedStore(config, 2, torch.device("cpu"), torch.float64, False, ContextParallel())
    mine = landmarks[:, rank * per_rank:(rank + 1) * per_rank]
    store.own(ChunkMemory(mine, torch.zeros(2, per_rank * 16, 1, 16, dtype=torch.float64),
                          torch.zeros(2, per_rank * 16, 1, 16, dtype=torch.float64)), rank * per_rank)
    store.grow(per_rank * size)
    for window in (None, 24):
        want = hsa_retrieve(qr, landmarks, config.topk, 16, positions, window)
        got = store.retrieve(qr, config.topk, 16, positions, window, "torch", 0.0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (window, got, want)


def check_bad_input(rank: int, size: int) -> None:
    model = HSAHybrid(config_for("swa", 16, 2, 8, "standard")).double().eval()
    ids = torch.randint(0, 40, (1, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        used = model.new_cache(1)
        model(ids, cache=used)                                   # filled on one process
        with context_parallel():
            for cut in (24, 16 * (1 + rank % 2)):                # not whole chunks; unequal slices
                with pytest.raises(ValueError, match="prompt slices of equal length"):
                    model(ids[:, :cut], cache=model.new_cache(1))
            with pytest.raises(ValueError, match="takes no attention_mask"):
                model(ids, attention_mask=torch.ones_like(ids), cache=model.new_cache(1))
            with pytest.raises(ValueError, match="filled outside context parallelism"):
                model(ids[:, :1], cache=used)
            with pytest.raises(ValueError, match="logits_to_keep is not supported"):
                model(ids, cache=model.new_cache(1), logits_to_keep=1)
            cache = model.new_cache(1)
            model(ids, cache=cache)                              # a good prefill after them
            with pytest.raises(ValueError, match="every rank gives the same next tokens"):
                model(torch.full((1, 1), rank), cache=cache)     # the ranks disagree on the next token
            model(ids[:, :1], cache=cache)                       # and a good step
        with pytest.raises(ValueError, match="sharded across the ranks"):
            model(ids[:, :1], cache=cache)


def check_generate(rank: int, size: int, mixer: str) -> None:
    """generate_sharded gives one process's greedy continuation, also with a stop token and its padding."""
    config = config_for(mixer, 16, 3, 8, "standard")
    torch.manual_seed(21)
    model = HSAHybrid(config).double().eval()
    prompt = torch.randint(0, config.vocab_size, (2, 32 * size), generator=torch.Generator().manual_seed(22))
    mine = prompt[:, rank * 32:(rank + 1) * 32]
    want = generate(model, prompt, 12)[:, prompt.shape[1]:]
    assert torch.equal(generate_sharded(model, mine, 12), want), (mixer, size)
    stop = int(want[0, 3])  # row 0 stops at its 4th token (or earlier, where it came before)
    want = generate(model, prompt, 12, stop_tokens=[stop], pad_token_id=39)[:, prompt.shape[1]:]
    got = generate_sharded(model, mine, 12, stop_tokens=[stop], pad_token_id=39)
    assert torch.equal(got, want) and bool((want == 39).any()), (mixer, size, got, want)
    assert generate_sharded(model, mine, 0).shape == (2, 0)
    got = generate_sharded(model, mine, 12, stop_tokens=[stop], pad_token_id=39, segment_length=16)  # in rounds
    assert torch.equal(got, want), (mixer, size, got, want)


def worker(rank: int, size: int, init_file: str, cases: list[tuple[str | list[str], int]]) -> None:
    init_gloo(rank, size, init_file)
    try:
        for mixer, seed in cases:
            check_decoding(rank, size, mixer, seed)
        check_ties(rank, size)
        check_bad_input(rank, size)
        for mixer in ("swa", "mamba2"):
            check_generate(rank, size, mixer)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size,cases", [(2, [("swa", 1), ("mamba2", 2), ("swa", 3), ("mamba2", 6),
                                            (["mamba2", "swa", "mamba2"], 9)]),
                                        (4, [("swa", 5), ("mamba2", 4)])], ids=["2", "4"])
def test_context_parallel_cache_matches_one_process(size, cases, tmp_path):
    mp.spawn(worker, args=(size, str(tmp_path / "init"), cases), nprocs=size, join=True)

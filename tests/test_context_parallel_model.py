"""The whole model under context parallelism (ramba.parallel): 2 and 4 gloo processes, each holding a slice of
every sequence, give the one-process model's logits, loss and every parameter gradient on the full sequence
(float64), for both mixers and a mix of them, over random lengths, chunk sizes, top-k and windows; bad input
fails with a clear error on every rank."""

from __future__ import annotations

import datetime
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ramba import HSAHybrid, HSAHybridConfig
from ramba.ops import DocIndex
from ramba.parallel import all_reduce_gradients, context_parallel, loss_and_gradients, reset_traffic, traffic
from ramba.parallel.documents import shard_documents
from ramba.parallel.group import ContextParallel

MIXERS = ["swa", "mamba2", ["mamba2", "swa", "mamba2"]]


def config_for(mixer, chunk: int, topk: int, window: int, residual: str, reset: int = 0) -> HSAHybridConfig:
    return HSAHybridConfig(vocab_size=40, d_model=32, n_lower_layers=1, n_upper_layers=2, hsa_every=1,
                           num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=48, window=window,
                           d_state=8, mamba_head_dim=16, mamba_chunk_size=16, chunk_size=chunk, topk=topk,
                           retrieval_dim=8, initializer_range=0.3, local_mixer=mixer, hsa_residual=residual,
                           mamba_reset=reset, mamba_reset_upper=2 * reset, mamba_reset_stagger=bool(reset))


def check_model(rank: int, size: int, mixer, seed: int) -> None:
    """One random case (the same on every rank): the sharded forward and backward against one process."""
    rnd = random.Random(seed)
    chunk = rnd.choice([16, 32])
    per_rank = chunk * rnd.randint(1, 3)
    config = config_for(mixer, chunk, rnd.randint(1, 4), rnd.randint(2, per_rank + 1),
                        rnd.choice(["standard", "bypass"]), reset=7 if seed % 4 < 2 else 0)  # lower Mamba2
    torch.manual_seed(seed)
    model = HSAHybrid(config).double()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, per_rank * size), generator=gen)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=gen) < 0.2, -100)  # some ignored targets
    doc_ids = None  # packed documents: some continue across ranks, some are shorter than a chunk
    if seed % 4 in (0, 3):
        starts = torch.rand(ids.shape, generator=gen) < rnd.choice([0.01, 0.05, 0.2])
        doc_ids = starts.long().cumsum(dim=1) * 3 + 1
    docs = {} if doc_ids is None else {"doc_ids": doc_ids}
    mask = torch.ones_like(ids)
    if seed % 4 >= 2:  # padding: at the start of row 0, and a run inside row 1 (it splits its document)
        mask[0, :rnd.randint(1, 20)] = 0
        start = rnd.randint(0, ids.shape[1] - 8)
        mask[1, start:start + rnd.randint(1, 40)] = 0
        if seed % 4 == 2 and size > 1:  # and the last rank's whole slice: trailing padding
            mask[:, -per_rank:] = 0
        docs["attention_mask"] = mask

    want = model(ids, labels=labels, return_retrieval=True, **docs)
    want.loss.backward()
    want_grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()  # unused: short documents
                  for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    lo, hi = rank * per_rank, (rank + 1) * per_rank
    docs = {k: v[:, lo:hi] for k, v in docs.items()}
    real = mask[:, lo:hi].bool()  # padding positions' outputs are not compared (one process zeroes them)
    if doc_ids is not None:  # each rank knows where its documents start and its tokens' places in them
        whole, mine = DocIndex(doc_ids), shard_documents(doc_ids[:, lo:hi], ContextParallel()).docs
        assert torch.equal(mine.starts, whole.starts[:, lo:hi]) and torch.equal(mine.offsets, whole.offsets[:, lo:hi])
    reset_traffic()
    if seed % 2:  # the three steps by hand, and through loss_and_gradients
        with context_parallel():
            out = model(ids[:, lo:hi], labels=labels[:, lo:hi], return_retrieval=True, **docs)
            out.loss.backward()
        all_reduce_gradients(model)
        loss, moved = out.loss, traffic()
    else:
        loss = loss_and_gradients(model, ids[:, lo:hi], labels[:, lo:hi], **docs)
        moved = traffic()
        with torch.no_grad(), context_parallel():
            out = model(ids[:, lo:hi], return_retrieval=True, **docs)
    if mixer == "swa" and not docs:  # no documents, no padding  # gathered once a forward: every other rank's landmarks and memory keys and values
        chunks = 2 * per_rank // config.chunk_size
        per_chunk = config.num_retrieval_heads * config.retrieval_dim + 2 * config.chunk_size * config.head_dim
        assert moved["all_gather"] == (size - 1) * chunks * per_chunk * 8
        halo = 2 * (config.window - 1) * 2 * config.head_dim * 8 * 3  # k and v of 2 rows, 3 SWA layers
        assert moved["p2p"] == halo * ((rank + 1 < size) + (rank > 0)) + 16 * (rank > 0)  # + the labels
    what = (f"{mixer} seed {seed} ({size} ranks, {config.chunk_size=}, {config.topk=}, {config.window=}, "
            f"{config.mamba_reset=}, documents: {doc_ids is not None}, padding: {'attention_mask' in docs})")
    torch.testing.assert_close(out.logits[real], want.logits[:, lo:hi][real], rtol=0, atol=1e-9,
                               msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(loss, want.loss.detach(), rtol=0, atol=1e-12, msg=lambda m: f"{what} loss: {m}")
    for got, expected in zip(out.retrieval, want.retrieval, strict=True):
        assert torch.equal(got[real], expected[:, lo:hi][real]), what
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=0, atol=1e-9,
                                   msg=lambda m: f"{what}, gradient of {name}: {m}")


def check_bad_input(rank: int, size: int) -> None:
    config = config_for("swa", 16, 2, 8, "standard")
    model = HSAHybrid(config).double()
    ids = torch.randint(0, 40, (1, 32))
    with context_parallel():
        with pytest.raises(ValueError, match="slices of equal length, each a multiple of chunk_size"):
            model(ids[:, :24])                                   # not a multiple of the chunk size
        if size > 1:
            with pytest.raises(ValueError, match="slices of equal length"):
                model(ids[:, :16 * (1 + rank % 2)])              # ranks disagree on the length
        with pytest.raises(ValueError, match="not cu_seqlens"):
            model(ids, cu_seqlens=torch.tensor([0, 32]))
        with pytest.raises(ValueError, match="labels are not supported with a cache"):
            model(ids, labels=ids, cache=model.new_cache(1))     # more in test_context_parallel_cache.py
        model.gradient_checkpointing = True
        with pytest.raises(ValueError, match="gradient_checkpointing off"):
            model(ids)
        model.gradient_checkpointing = False
        model(ids)                                               # and a good call still works after them


def init_gloo(rank: int, size: int, init_file: str) -> None:
    """Join the spawned processes' gloo group (one thread each: the ranks share the machine's cores)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)


def worker(rank: int, size: int, init_file: str) -> None:
    init_gloo(rank, size, init_file)
    try:
        for i, mixer in enumerate(MIXERS):
            for seed in range(4):
                check_model(rank, size, mixer, 100 * size + 10 * i + seed)
        check_bad_input(rank, size)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size", [1, 2, 4])
def test_context_parallel_model_matches_one_process(size, tmp_path):
    mp.spawn(worker, args=(size, str(tmp_path / "init")), nprocs=size, join=True)


def test_context_parallel_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        with context_parallel():
            pass

"""The GPU-free parts of benchmarks/kernels/ and benchmarks/aggregate_tuning.py: the random causal selections,
the FLOP and byte counts, the argument checks, the exit without CUDA."""

import pytest
import torch

from benchmarks import aggregate_tuning, profile_prefill, retrieve_sass, retrieve_tuning
from benchmarks.common import command_line
from benchmarks.kernels import __main__ as kernels
from benchmarks.kernels.aggregate import aggregate_bytes, aggregate_flops, causal_selection, random_weights


def check_selection(indices: torch.Tensor, positions: torch.Tensor, topk: int, chunk_size: int) -> None:
    """Causal, distinct, most recent first, -1 only in the last slots, min(topk, visible) chunks per row."""
    visible = (positions // chunk_size)[:, :, None]  # chunks c with (c+1)*S <= p
    valid = indices >= 0
    assert bool((indices >= -1).all())
    assert bool(((indices < visible[..., None]) | ~valid).all()), "a chunk not complete before its token"
    assert torch.equal(valid.sum(-1), visible.expand(valid.shape[:3]).clamp(max=topk))
    assert bool((valid[..., :-1] | ~valid[..., 1:]).all()), "-1 before a selected chunk"
    assert bool(((indices[..., :-1] > indices[..., 1:]) | ~valid[..., 1:]).all()), "repeated or not most recent first"


@pytest.mark.parametrize("B,L,heads,topk,chunk_size", [(2, 700, 2, 8, 64), (1, 300, 1, 3, 16), (3, 40, 1, 8, 64)])
def test_training_selections_are_causal_distinct_and_ordered(B, L, heads, topk, chunk_size):
    positions = torch.arange(L).expand(B, L)
    indices = causal_selection(positions, heads, topk, chunk_size, L // chunk_size, torch.Generator().manual_seed(0))
    assert indices.shape == (B, L, heads, topk) and indices.dtype == torch.long
    check_selection(indices, positions, topk, chunk_size)


def test_decoding_selections_reach_the_whole_history_uniformly():
    C, S, topk = 1 << 20, 64, 8
    positions = torch.full((4000, 1), C * S)
    indices = causal_selection(positions, 1, topk, S, C, torch.Generator().manual_seed(1))
    check_selection(indices, positions, topk, S)
    # uniform over [0, C): the mean chunk is near C/2, and both ends are reached
    assert abs(indices.double().mean().item() / C - 0.5) < 0.01
    assert indices.min().item() < C // 100 and indices.max().item() > C - C // 100


def test_selection_depends_only_on_the_generator():
    positions = torch.arange(512).expand(2, 512)
    a, b = (causal_selection(positions, 1, 8, 64, 8, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b)


def test_weights_are_a_softmax_over_the_selected_slots():
    positions = torch.arange(300).expand(2, 300)
    indices = causal_selection(positions, 1, 8, 32, 9, torch.Generator().manual_seed(2))
    weights = random_weights(indices, torch.Generator().manual_seed(3))
    assert bool((weights[indices < 0] == 0).all())
    sums = weights.sum(-1)
    has_chunk = (indices >= 0).any(-1)
    assert torch.allclose(sums[has_chunk], torch.ones_like(sums[has_chunk]))
    assert bool((sums[~has_chunk] == 0).all())


def test_flops_match_a_hand_count():
    # DESIGN section 5: B=8, L=4K, HQ=16, H=1, K=8, S=64, D=64, every slot used: 69 GFLOP forward.
    # Per (token, query head, slot): q.K^T is 64 x 64 multiply-adds, P.V another 64 x 64: 4 * 64 * 64 FLOPs.
    slots = 8 * 4096 * 1 * 8
    forward = 8 * 4096 * 16 * 8 * (2 * 64 * 64 + 2 * 64 * 64)
    assert forward == 68_719_476_736
    assert aggregate_flops(slots, 16, 64, 64) == forward
    assert aggregate_flops(slots, 16, 64, 64, backward=True) == forward * 14 // 4


def test_bytes_match_a_hand_count():
    # B=1, L=128, HQ=4, H=2, D=8, K=2, bf16: q and o 1*128*4*8 elements, k and v 1*128*2*8, 1*128*2*2 slots.
    q, kv, slots = 4096, 2048, 512
    forward = 2 * q * 2 + 2 * kv * 2 + slots * (8 + 4)  # q read, o written, k and v read, indices and weights read
    backward = (2 * q * 2 + 2 * kv * 2 + slots * (8 + 4)  # q, dO, k, v, indices, weights read
                + q * 2 + 2 * kv * 2 + slots * 4)  # dq, dk, dv, dweights written
    assert aggregate_bytes(q, kv, slots, 2) == forward
    assert aggregate_bytes(q, kv, slots, 2, backward=True) == forward + backward


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_without_cuda_the_benchmark_exits_with_a_message():
    with pytest.raises(SystemExit) as exit_info:
        kernels.main(["--quick"])
    assert "needs a CUDA GPU" in str(exit_info.value.code)


def test_unknown_sections_are_refused():
    with pytest.raises(SystemExit):
        kernels.main(["--sections", "check,nonsense"])


def test_tuning_reads_shapes_and_refuses_bad_ones():
    assert aggregate_tuning.parse_shapes("8x4096x16x1,2x16384x32x2") == [(8, 4096, 16, 1), (2, 16384, 32, 2)]
    with pytest.raises(SystemExit, match="BxLxHQxH"):
        aggregate_tuning.parse_shapes("8x4096x16")
    with pytest.raises(SystemExit):
        aggregate_tuning.main(["--kernels", "fwd,nonsense"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_without_cuda_the_tuning_exits_with_a_message():
    with pytest.raises(SystemExit, match="torch.cuda.is_available"):
        aggregate_tuning.main([])


def test_retrieve_tuning_reads_shapes_and_refuses_bad_ones():
    assert retrieve_tuning.parse_shapes("4096x1048576x128,1x64x64") == [(4096, 1048576, 128), (1, 64, 64)]
    for bad in ("4096x1048576", "4096x0x64", "ax1x2"):
        with pytest.raises(SystemExit, match="LxCxDR"):
            retrieve_tuning.parse_shapes(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
@pytest.mark.parametrize("module", [retrieve_tuning, profile_prefill])
def test_without_cuda_the_gpu_only_tools_exit_with_a_message(module):
    with pytest.raises(SystemExit, match="torch.cuda.is_available"):
        module.main([])


def test_command_line_names_the_module_and_its_arguments(monkeypatch):
    assert command_line("probe", ["--lengths", "4k", "--out", "x.md"]) == \
        "python -m benchmarks.probe --lengths 4k --out x.md"
    monkeypatch.setattr("sys.argv", ["benchmarks/key_probe.py", "--prompts", "9"])
    assert command_line("key_probe", None) == "python -m benchmarks.key_probe --prompts 9"


def test_retrieve_sass_splits_basic_blocks_at_labels_and_branches():
    code = """
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_1) ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
.L_x_1:
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   EXIT ;
"""
    assert retrieve_sass.blocks(code) == [("entry", 2, ["branch"]), ("entry+", 1, ["async copy"]),
                                          (".L_x_1", 3, ["mma", "barrier"])]


def test_insertion_share_counts_the_tiles_that_can_change_a_top_k():
    # while fewer than K chunks were seen, every tile enters; with K beyond the memory, all of them do
    assert retrieve_sass.insertion_share(4, 640, 16, topk=640) == 1.0
    share = retrieve_sass.insertion_share(64, 64 * 200, 16)
    assert 1 / 200 <= share < 1.0
    assert retrieve_sass.insertion_share(8, 64 * 200, 16) < share  # fewer rows a tile, fewer tiles enter

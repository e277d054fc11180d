"""benchmarks.key_probe: needle positions, features at the right places, the report (the probes: test_probing.py)."""

import random
import re

import pytest
import torch

from benchmarks.key_probe import collect, needles, report
from ramba import HSAHybrid, HSAHybridConfig
from ramba.data.tasks import TASKS
from ramba.data.tasks.filler import ADJECTIVES
from ramba.layers.hsa import HSA
from ramba.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_needles_are_found_where_the_text_has_them():
    for seed in range(5):
        sample = TASKS["niah_multikey_1"](random.Random(seed), TOK, 600)
        ids = sample.prompt_ids.tolist()
        assert ids[0] == TOK.bos_id
        text = " " + bytes(ids[1:]).decode()  # text[i] is token i
        expected = re.findall(r"for ([a-z]+)-[a-z]+ is (\d{7})\.", text)  # in prompt order
        found = needles(ids, sample.insert_offsets)
        assert [(adj, value) for _, _, value, adj in found] == expected
        for dash, digit, value, _ in found:
            assert text[dash] == "-" and text[digit:digit + 7] == value
        assert sum(value in sample.references for _, _, value, _ in found) == 1


def small_model() -> HSAHybrid:
    torch.manual_seed(0)
    config = HSAHybridConfig.preset("tiny", d_model=32, num_heads=2, head_dim=16, intermediate_size=64,
                                    n_lower_layers=1, n_upper_layers=1, hsa_every=1, retrieval_dim=8)
    return HSAHybrid(config).eval()


def test_features_are_taken_at_the_answer_and_at_the_needles():
    model = small_model()
    seed = next(s for s in range(20) if len(collect(model, 1, s, 520, 640).asked) == 1)  # a usable first prompt
    f = collect(model, 1, seed, 520, 640)
    rng = random.Random(seed)  # the same prompt again, drawn the way collect draws it
    sample = TASKS["niah_multikey_1"](rng, TOK, rng.randint(520, 640))
    ids = sample.prompt_ids.tolist()
    found = needles(ids, sample.insert_offsets)
    assert found[int(f.asked[0])][2] in sample.references
    assert f.adjectives[0].tolist() == [ADJECTIVES.index(adj) for *_, adj in found]
    # a causal model: the retrieval input at the first answer token is the last one of the prompt plus that
    # token, and a chunk's landmark is that of the prompt cut after the chunk
    hsa = next(m for m in model.modules() if isinstance(m, HSA))
    S = model.config.chunk_size
    chunk = found[0][1] // S
    seen = {}
    hooks = [hsa.qr_proj.register_forward_hook(lambda m, i, o: seen.update(x=i[0][0, -1])),
             model.encoder.lmk_proj.register_forward_hook(lambda m, i, o: seen.update(landmark=o[-1]))]
    with torch.no_grad():
        model(torch.tensor(ids + TOK.encode(sample.target)[:1])[None])
        x = seen["x"]
        model(torch.tensor(ids[:(chunk + 1) * S])[None])
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(f.query_in[0], x)
    torch.testing.assert_close(f.landmark[0, 0], seen["landmark"])
    assert f.summary.shape == (1, 4, 32) and f.query.shape == (1, 8) and f.token_out.shape == (1, 32)


def test_report_needs_enough_prompts_and_lists_every_probe():
    model = small_model()
    f = collect(model, 80, 0, 520, 640)
    assert len(f.asked) >= 20
    text = report(f)
    assert text.count("\n| ") == 12  # header, rule and ten probes
    with pytest.raises(ValueError, match="too few"):
        report(collect(model, 3, 0, 520, 640))

"""python benchmarks/results/generalization/gpu_multikey_2026-11-29c/uniform_weights.py LENGTH SAMPLES MODEL_DIR
(run from the repository root with PYTHONPATH=.)

Intervention: a model with its retrieval weights replaced by uniform ones over the selected
chunks (the selection itself unchanged). If it still answers, the reading inside chunks tells the keys apart."""
import sys
import torch
import ramba.layers.hsa as hsa
from benchmarks.answering import load_answerer
from ramba.data.tasks import Key, make_sample, score

original = hsa.retrieval_weights


def uniform(scores, indices, kind):
    valid = (indices >= 0).to(scores.dtype)
    return valid / valid.sum(-1, keepdim=True).clamp(min=1)


def nothing(scores, indices, kind):
    return torch.zeros_like(scores)


length, n, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
a = load_answerer(f"m={model}", device="cpu", segment=65536)
keys = [Key("niah_multikey_1", length, d, i) for d in (0.0, 0.25, 0.5, 0.75, 1.0) for i in range(n)]
for name, fn in (("softmax (as trained)", original), ("uniform", uniform), ("zero: no memory read", nothing)):
    hsa.retrieval_weights = fn
    right = sum(score("niah_multikey_1", a.answer(s), s.references)
                for s in (make_sample(k, a.tokenizer, seed=2) for k in keys))
    print(f"{name}: {right:.0f} of {len(keys)} right at {length} tokens")

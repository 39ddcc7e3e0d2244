"""Unlikelihood negatives: on a controlled corpus, λ > 0 lowers the probability the model gives to noise
tokens drawn the way training draws them (unigram, target excluded), at a small cost in held-out loss."""

import json
import random

import torch

from model_store.finetune.checkpoint import read_log
from model_store.finetune.data import Blocks
from model_store.finetune.export import restore_model
from model_store.finetune.model import load_tokenizer
from model_store.finetune.objective import lm_loss, noise_generator, sample_noise, unlikelihood
from model_store.finetune.train import _load_data
from tests.support.finetune import train_run

# Same noise draws in both runs (noise depends on seed and data position only); lambda = 0 leaves it unused.
RUN = dict(steps=30, batch_size=4, grad_accum=1, lr=1e-2, eval_every=10, checkpoint_every=30, negatives=4)
WEIGHT = 10.0  # the term is a mean over the K noise tokens, so its pull on each is lambda / K
MARGIN_NATS = 0.1  # held-out cross-entropy may rise by at most this much (measured: +0.02)


def controlled_corpus(path):
    """Sentences of a tiny grammar (3 subjects x 3 verbs x 3 objects, drawn at random): the model learns
    the unigram distribution first, so frequent tokens carry real probability where they are wrong."""
    rng = random.Random(0)
    parts = (
        ["The fox", "A dog", "The model"],
        ["jumps over", "serves", "decodes"],
        ["the lazy dog.", "requests.", "every sequence."],
    )
    docs = [" ".join(rng.choice(words) for words in parts) for _ in range(300)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def noise_probability(model, held_out: Blocks, unigram: torch.Tensor, k: int = 8) -> float:
    """Geometric mean of p(noise) over held-out positions, noise drawn as in training (same draws for both
    models)."""
    inputs, targets = held_out.tokens[:, :-1], held_out.tokens[:, 1:]
    noise = torch.stack([sample_noise(t, unigram, k, noise_generator(123, i)) for i, t in enumerate(targets)])
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=inputs).logits.float(), -1).gather(-1, noise)  # (B, T, k)
    return log_p.mean().exp().item()


def test_unlikelihood_pushes_noise_tokens_down(tiny_store, tmp_path):
    data = controlled_corpus(tmp_path / "grammar.jsonl")
    plain = train_run(tiny_store, tmp_path / "plain", data, negative_weight=0.0, **RUN)
    negative = train_run(tiny_store, tmp_path / "neg", data, negative_weight=WEIGHT, **RUN)

    dataset = _load_data(plain.config, load_tokenizer(tiny_store, plain.config))
    p_plain = noise_probability(
        restore_model(tiny_store, tmp_path / "plain", best=False), dataset.held_out, dataset.unigram.float()
    )
    p_neg = noise_probability(
        restore_model(tiny_store, tmp_path / "neg", best=False), dataset.held_out, dataset.unigram.float()
    )
    # the noise tokens sampled during training: mean -log(1 - p) over the last 10 steps, as logged
    ul_plain, ul_neg = (sum(r["unlikelihood"] for r in read_log(tmp_path / d)[-10:]) for d in ("plain", "neg"))
    assert ul_neg < 0.95 * ul_plain  # measured 0.88
    # fresh noise on held-out text
    assert p_neg < 0.95 * p_plain  # measured 0.89
    assert negative.state.best_eval_loss <= plain.state.best_eval_loss + MARGIN_NATS


def test_unlikelihood_term_is_bounded_and_excludes_the_target():
    targets = torch.tensor([3, 1, 3, 0])
    unigram = torch.tensor([0.1, 0.2, 0.0, 0.7])
    noise = sample_noise(targets, unigram, 50, torch.Generator().manual_seed(0))
    assert not (noise == targets[:, None]).any() and not (noise == 2).any()
    # a model certain of a noise token pays a large but finite penalty; one that gives it 0 pays ~0
    certain = torch.full((1, 1, 4), -1e4)
    certain[..., 1] = 0.0
    log_probs = torch.log_softmax(certain, -1)
    assert 10 < unlikelihood(log_probs, torch.tensor([[0]]), torch.tensor([[[1]]])).item() < 20
    assert unlikelihood(log_probs, torch.tensor([[0]]), torch.tensor([[[3]]])).item() < 1e-6
    # lambda = 0 is plain cross-entropy
    logits = torch.randn(2, 5, 4)
    t = torch.randint(0, 4, (2, 5))
    parts = lm_loss(logits, t, torch.randint(0, 4, (2, 5, 3)), 0.0)
    assert torch.equal(parts.loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten()))

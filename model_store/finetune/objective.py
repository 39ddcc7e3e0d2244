"""The training objective: next-token cross-entropy, plus optional unlikelihood on sampled noise tokens.

loss = CE(target) + λ · mean_k −log(1 − p(noise_k))   (token-level unlikelihood, Welleck et al. 2019)

Noise tokens are drawn from the training data's unigram distribution with the position's target excluded
(rejection sampling, which gives exactly the renormalised distribution). log(1 − p) is computed from the
log-probability as log(−expm1(log p)), which stays accurate as p → 1; log p is clamped just below 0 so a
noise token the model is certain of costs a large but finite penalty. The bounded form matters: simply
subtracting the noise tokens' cross-entropy is unbounded below and diverges.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MAX_LOG_P = -1e-6  # log p clamp: -log(1 - p) <= ~13.8
_REJECTION_ROUNDS = 64


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor  # scalar, what is minimised
    ce: torch.Tensor  # scalar
    unlikelihood: torch.Tensor | None


def sample_noise(targets: torch.Tensor, unigram: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(T,) targets -> (T, k) noise ids from `unigram`, never equal to their position's target.

    Where the unigram has no mass outside the target (a one-token corpus), the draw stays equal to the
    target; `unlikelihood` masks those out.
    """
    (t,) = targets.shape
    noise = torch.multinomial(unigram, t * k, replacement=True, generator=generator).view(t, k)
    for _ in range(_REJECTION_ROUNDS):
        clash = noise == targets[:, None]
        num = int(clash.sum())
        if num == 0:
            break
        noise[clash] = torch.multinomial(unigram, num, replacement=True, generator=generator)
    return noise


def unlikelihood(log_probs: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """mean over positions and k of −log(1 − p(noise)); (B, T, V) log-probs, (B, T) targets, (B, T, K) noise."""
    log_p = log_probs.gather(-1, noise).clamp(max=_MAX_LOG_P)  # (B, T, K)
    penalty = -torch.log(-torch.expm1(log_p))
    valid = (noise != targets[..., None]).to(penalty.dtype)
    return (penalty * valid).sum() / valid.sum().clamp(min=1)


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor | None = None, weight: float = 0.0
) -> LossParts:
    """(B, T, V) logits, (B, T) targets; noise (B, T, K) or None."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_probs.flatten(0, 1), targets.flatten())
    if noise is None:
        return LossParts(ce, ce, None)
    ul = unlikelihood(log_probs, targets, noise)
    return LossParts(ce + weight * ul, ce, ul)


def noise_generator(seed: int, position: int) -> torch.Generator:
    """The generator for one training sample's noise: a function of the run seed and the sample's stream
    position only, so noise is the same after a resume and whatever the number of processes."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + position * 2654435761 + 1) % (1 << 63))

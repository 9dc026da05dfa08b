"""Reverse (denoising) steps of hybriddiff's samplers, as pure JAX functions of network outputs.

A generation driver owns the loop (``jax.lax.scan`` over hyperschedule steps, KV cache, prompts);
each step here maps ``(key, x [..., L], network output [..., L, N], per-position noise now and
next, options) -> x_next`` and returns positions whose noise does not change exactly unchanged.
Per hyperschedule transition ``t -> t+1`` a driver computes
``now, nxt = level_noise(schedule, tau[t], T), level_noise(schedule, tau[t+1], T)`` and calls:

* γ-hybrid / absorb / uniform score models: :func:`analytic_step` (exact inverse; the default)
  or :func:`euler_step` with ``now.sigma_bar, nxt.sigma_bar``; both take the final denoising
  step where the next level is 0 (:func:`denoise_step` does it for every position).
* masked (MDLM/SUBS, BD3-LM) and ε-hybrid models: :func:`mdlm_step` (or
  :func:`mdlm_cached_step` to reuse predictions), :func:`acs_step` (η), with
  ``now.alpha, nxt.alpha``; :func:`first_hitting_step` + :func:`first_hitting_mask_rate` for
  BD3-LM's first-hitting sampler; :func:`unmask_step` with :func:`plan_from_schedule` (or any
  count) for the seed 002 strategies. γ-hybrid score models reach these through
  :func:`clean_log_probs_from_score` and :func:`alpha_of`.

Generation drivers (:mod:`hybriddiff.sampling.generate`, :mod:`hybriddiff.sampling.cached`) run
those steps in one jitted loop: :func:`generate` over the whole sequence, :func:`generate_cached`
with settled tokens in the KV cache and only the active window fed, :func:`generate_blocks` for
BD3-LM arbitrary-length generation that stops at EOS or on a low-entropy block.

Token draws use :class:`CategoricalConfig` (temperature, top-k, top-p, precision
``"float32"`` / ``"float32_high"`` / ``"float64"``; see :mod:`hybriddiff.sampling.categorical`).
"""

from hybriddiff.sampling.cached import generate_blocks, generate_cached, window_plan
from hybriddiff.sampling.categorical import (
    PRECISIONS,
    CategoricalConfig,
    bernoulli,
    filter_logits,
    gumbel,
    gumbel_argmax,
    require_x64,
    sample_categorical,
)
from hybriddiff.sampling.generate import (
    GenerationResult,
    MDLMReverse,
    ReverseStep,
    ScoreReverse,
    UnmaskReverse,
    generate,
    prompt_state,
)
from hybriddiff.sampling.score import (
    analytic_step,
    analytic_transition,
    clean_log_probs_from_score,
    denoise_step,
    denoise_transition,
    euler_step,
    euler_transition,
)
from hybriddiff.sampling.steps import (
    CachedStep,
    NoiseLevels,
    acs_step,
    alpha_of,
    first_hitting_mask_rate,
    first_hitting_step,
    level_noise,
    mdlm_cached_step,
    mdlm_step,
    transfer_probability,
)
from hybriddiff.sampling.unmasking import (
    ADAPTIVE_STRATEGIES,
    COUNT_STRATEGIES,
    UnmaskingConfig,
    UnmaskPlan,
    pc_log_scores,
    plan_from_schedule,
    prediction_entropy,
    select_entropy_bounded,
    select_factor,
    select_threshold,
    select_top_k,
    semi_ar_candidates,
    top_two_margin,
    unmask_step,
)

__all__ = [
    "ADAPTIVE_STRATEGIES",
    "COUNT_STRATEGIES",
    "PRECISIONS",
    "CachedStep",
    "CategoricalConfig",
    "GenerationResult",
    "MDLMReverse",
    "NoiseLevels",
    "ReverseStep",
    "ScoreReverse",
    "UnmaskPlan",
    "UnmaskReverse",
    "UnmaskingConfig",
    "acs_step",
    "alpha_of",
    "analytic_step",
    "analytic_transition",
    "bernoulli",
    "clean_log_probs_from_score",
    "denoise_step",
    "denoise_transition",
    "euler_step",
    "euler_transition",
    "filter_logits",
    "first_hitting_mask_rate",
    "first_hitting_step",
    "generate",
    "generate_blocks",
    "generate_cached",
    "gumbel",
    "gumbel_argmax",
    "level_noise",
    "mdlm_cached_step",
    "mdlm_step",
    "pc_log_scores",
    "plan_from_schedule",
    "prediction_entropy",
    "prompt_state",
    "require_x64",
    "sample_categorical",
    "select_entropy_bounded",
    "select_factor",
    "select_threshold",
    "select_top_k",
    "semi_ar_candidates",
    "top_two_margin",
    "transfer_probability",
    "unmask_step",
    "window_plan",
]

"""Sample-quality metrics: generative perplexity under a judge, unigram entropy, MAUVE.

* **Generative perplexity** ``exp(Σ NLL / Σ tokens)`` of generated texts under a judge causal LM,
  pooled over every scored token of every sample. (The published code averages per-sample
  perplexities, which over-weights short or badly scored samples; the pooled form is the judge's
  perplexity of the sample corpus.) Texts are retokenised with the judge's tokenizer; with
  ``eos_id`` a sample is scored up to and including its first EOS. A sample longer than the
  judge's context ``C`` is scored in sliding windows ``[kS, kS + C)`` (stride ``S``): window 0
  scores positions ``1..C-1``, window ``k >= 1`` its last ``S`` positions, so every token after the
  first is scored exactly once with at least ``C - S`` tokens of context. With ``bos_id`` the
  judge's BOS is prepended, so the first token is scored too.
* **Unigram entropy** ``H = -Σ_v p_v log p_v`` of each sample's token frequencies, averaged over
  samples (the diversity check of MDLM / seed 000 §4 tables).
* **MAUVE** (Pillutla et al.): :func:`hybriddiff.evaluation.huggingface.mauve_score`.

Judges: :class:`ARJudge` (a hybriddiff ``quench`` run, offline) and
:class:`~hybriddiff.evaluation.huggingface.HuggingFaceJudge` (a local ``transformers`` causal LM;
needs ``transformers`` and ``torch``), re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ARJudge",
    "GenPPLResult",
    "Judge",
    "eos_mask",
    "generative_perplexity",
    "score_tokens",
    "unigram_entropy",
    "window_plan",
]

Array = jax.Array


class Judge(Protocol):
    """A causal LM: ``log_probs(tokens [B, C]) -> [B, C, V]``, output ``p`` predicting ``p + 1``."""

    context_length: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> Sequence[int]: ...

    def log_probs(self, tokens: np.ndarray) -> np.ndarray: ...


class GenPPLResult(NamedTuple):
    """Pooled judge NLL of a set of samples."""

    nll_sum: float  # nats over every scored token
    num_tokens: int  # scored tokens
    per_sample_nll: np.ndarray  # [B] nats per sample

    @property
    def perplexity(self) -> float:
        """``exp(nll_sum / num_tokens)``."""
        return math.exp(min(self.nll_sum / max(self.num_tokens, 1), 700.0))


def eos_mask(tokens: Array, eos_id: int | None) -> Array:
    """``[B, L]`` True up to and including each row's first ``eos_id`` (everything without one)."""
    tokens = jnp.asarray(tokens)
    chex.assert_rank(tokens, 2)
    if eos_id is None:
        return jnp.ones(tokens.shape, bool)
    is_eos = (tokens == eos_id).astype(jnp.int32)
    seen_before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS strictly before p
    return seen_before == 0


def window_plan(length: int, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows over ``length`` tokens (module docstring).

    Returns ``index [K, C]`` (token position of each window cell, clipped to ``length - 1``) and
    ``scored [K, C]`` (True where the output of cell ``c - 1`` scores the token in cell ``c``; each
    position ``1..length-1`` is scored exactly once).
    """
    if context < 2:
        raise ValueError(f"context must be >= 2, got context={context}")
    if not 1 <= stride <= context - 1:
        raise ValueError(f"stride must be in [1, context - 1] = [1, {context - 1}], got "
                         f"stride={stride}")
    num_windows = 1 if length <= context else 1 + math.ceil((length - context) / stride)
    starts = np.arange(num_windows) * stride  # [K]
    cells = np.arange(context)  # [C]
    position = starts[:, None] + cells[None, :]  # [K, C]
    first_scored = np.where(starts == 0, 1, context - stride)  # [K]
    scored = (cells[None, :] >= first_scored[:, None]) & (position < length)
    return np.minimum(position, length - 1).astype(np.int32), scored


def score_tokens(log_probs_fn: Callable[[Array], Array], tokens: Array, valid: Array,
                 context: int, stride: int | None = None) -> Array:
    """Per-sample NLL ``[B]`` (nats) of ``tokens [B, L]`` under a causal LM, summed over positions
    ``p >= 1`` where ``valid`` (sliding windows of ``context`` with ``stride``, default
    ``context // 2``). ``log_probs_fn([M, C]) -> [M, C, V]``. Usable under ``jax.jit``."""
    tokens = jnp.asarray(tokens)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape((tokens, valid))
    batch, length = tokens.shape
    stride = max(context // 2, 1) if stride is None else stride
    index, scored = window_plan(length, context, stride)
    windows = tokens[:, index]  # [B, K, C]
    num_windows = index.shape[0]
    log_probs = log_probs_fn(windows.reshape(batch * num_windows, context))
    log_probs = jax.nn.log_softmax(log_probs.astype(jnp.float32), axis=-1)
    log_probs = log_probs.reshape(batch, num_windows, context, -1)  # [B, K, C, V]
    target = windows[:, :, 1:]  # [B, K, C-1]
    picked = jnp.take_along_axis(log_probs[:, :, :-1], target[..., None], axis=-1)[..., 0]
    keep = jnp.asarray(scored[:, 1:])[None] & jnp.asarray(valid)[:, index][:, :, 1:]
    return -jnp.sum(jnp.where(keep, picked, 0.0), axis=(1, 2))  # [B]


def generative_perplexity(judge: Judge, texts: Sequence[str], *, eos_id: int | None = None,
                          ended: Sequence[bool] | None = None, stride: int | None = None,
                          batch_size: int = 8) -> GenPPLResult:
    """Pooled generative perplexity of ``texts`` under ``judge`` (module docstring).

    ``eos_id``: the judge's EOS id; each retokenised sample is scored up to and including its
    first EOS. ``ended[i]``: sample ``i`` stopped at an EOS of the generator (which decoding
    drops), so the judge's ``eos_id`` is appended and scored.
    """
    if not texts:
        raise ValueError("texts must hold at least one sample, got none")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    ended = [False] * len(texts) if ended is None else list(ended)
    if len(ended) != len(texts) or (eos_id is None and any(ended)):
        raise ValueError(f"ended must hold one flag per text ({len(texts)}) and needs eos_id, got "
                         f"{len(ended)} flags with eos_id={eos_id}")
    prefix = [] if judge.bos_id is None else [int(judge.bos_id)]
    rows = [prefix + [int(t) for t in judge.encode(text)] + ([int(eos_id)] if stop else [])
            for text, stop in zip(texts, ended)]
    length = max(2, max(len(r) for r in rows))
    tokens = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        valid[i, :len(row)] = True
    skip = len(prefix)  # the judge's BOS may be its EOS too (GPT-2's <|endoftext|>)
    valid[:, skip:] &= np.asarray(eos_mask(tokens[:, skip:], eos_id))
    per_sample = []
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        per_sample.append(np.asarray(score_tokens(judge.log_probs, tokens[chunk], valid[chunk],
                                                  judge.context_length, stride), np.float64))
    nll = np.concatenate(per_sample)
    return GenPPLResult(nll_sum=float(nll.sum()), num_tokens=int(valid[:, 1:].sum()),
                        per_sample_nll=nll)


def unigram_entropy(tokens: Array, num_tokens: int, valid: Array | None = None) -> Array:
    """Per-sample unigram entropy ``[B]`` (nats) of ``tokens [B, L]`` over ids ``0..num_tokens-1``,
    counting only ``valid`` positions (default all); the papers report its mean."""
    tokens = jnp.asarray(tokens)
    chex.assert_rank(tokens, 2)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    chex.assert_equal_shape((tokens, valid))

    def one(row: Array, keep: Array) -> Array:
        counts = jnp.zeros(num_tokens, jnp.float32).at[row].add(keep.astype(jnp.float32))
        p = counts / jnp.maximum(counts.sum(), 1.0)  # [N]
        return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))

    return jax.vmap(one)(tokens, valid)


@dataclasses.dataclass(frozen=True)
class ARJudge:
    """A hybriddiff autoregressive run (``loss.kind = "ar"``, quench) as a judge."""

    setup: Any
    params: Any
    tokenizer: Any

    @classmethod
    def from_workdir(cls, workdir: str | Path) -> ARJudge:
        """The newest checkpoint of an AR run (EMA parameters when it keeps an EMA)."""
        from hybriddiff.sampling.drive import restore_run

        run = restore_run(workdir)
        if run.setup.objective.loss_kind != "ar":
            raise ValueError(f"judge_workdir={str(workdir)!r} holds a loss.kind="
                             f"{run.setup.objective.loss_kind!r} model; a judge must be an "
                             "autoregressive run (loss.kind='ar', hyperschedule.kind='quench')")
        return cls(run.setup, run.params, run.tokenizer)

    @property
    def context_length(self) -> int:
        return int(self.setup.objective.length)

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_id(self) -> int | None:
        return int(self.tokenizer.eos_id)

    def encode(self, text: str) -> Sequence[int]:
        return self.tokenizer.encode(text)

    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """Rows are padded to a multiple of the mesh size (the model shards its batch)."""
        tokens = np.asarray(tokens, np.int32)
        rows = tokens.shape[0]
        multiple = int(self.setup.mesh.devices.size)
        padded = np.pad(tokens, ((0, -rows % multiple), (0, 0)))
        return np.asarray(_ar_log_probs(self.setup, self.params, jnp.asarray(padded)))[:rows]


def _ar_log_probs(setup: Any, params: Any, tokens: Array) -> Array:
    from hybriddiff.model.sharding import activate
    from hybriddiff.training import core, objective as objective_lib

    objective = setup.objective
    layout = objective_lib.causal_layout(objective.length)
    context = tokens.shape[1]
    mask = jnp.asarray(np.asarray(layout.mask)[:context, :context])
    positions = jnp.arange(context, dtype=jnp.int32)
    with activate(setup.mesh, setup.rules):
        apply = core.make_apply_fn(setup, params, deterministic=True)
        return apply(tokens, positions, jnp.zeros(tokens.shape, jnp.float32), mask)

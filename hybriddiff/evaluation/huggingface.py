"""Hugging Face models in evaluation: a local causal LM as a generative-perplexity judge, text
features from a local model, and MAUVE (Pillutla et al., NeurIPS 2021) on those features.

Everything here is offline: models and tokenizers load from a local directory with
``local_files_only=True``, and MAUVE (the ``mauve-text`` package) only ever sees feature arrays,
so it never fetches a featurizer by name. ``torch``, ``transformers`` and ``mauve-text`` are
imported lazily, so :mod:`hybriddiff.evaluation` imports without them.

* :class:`HuggingFaceJudge` implements the judge protocol of
  :func:`hybriddiff.evaluation.generative.generative_perplexity`.
* :func:`featurize_texts` embeds each text as the final-layer hidden state of its last token
  (truncated to ``max_length`` tokens), the MAUVE paper's GPT-2 featurization.
* :func:`mauve_score` quantises ``P`` and ``Q`` features jointly (l2 normalisation, PCA, k-means
  into ``num_buckets`` clusters) and integrates the divergence frontier of the two histograms: with
  ``R_λ = λP + (1 - λ)Q`` on the grid ``λ = linspace(1e-6, 1 - 1e-6, m)``, the curve
  ``(exp(-c KL(Q‖R_λ)), exp(-c KL(P‖R_λ)))`` closed by ``(1, 0)`` and ``(0, 1)``; MAUVE is its area
  (trapezoid rule, the mean of integrating over either axis), ``c = mauve_scaling_factor``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import chex
import numpy as np

__all__ = [
    "HuggingFaceJudge",
    "MauveResult",
    "featurize_texts",
    "mauve_score",
]

_TORCH_HINT = ("pip install transformers torch (for the CPU-only torch build: pip install torch "
               "--index-url https://download.pytorch.org/whl/cpu)")
# Config fields that hold a model's context length, in order of preference.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length",
                   "max_sequence_length")


def _torch_transformers(what: str) -> tuple[Any, Any]:
    """``(torch, transformers)``, or an ImportError saying how to install them."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise ImportError(f"{what} needs transformers and torch: {_TORCH_HINT}") from error
    return torch, transformers


def _local_dir(path: str | Path, argument: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{argument}={str(path)!r} is not a directory holding a Hugging "
                                "Face model (only local directories are loaded, nothing is "
                                "downloaded)")
    return directory


def _torch_dtype(torch: Any, dtype: str) -> Any:
    if dtype == "auto":
        return "auto"
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be 'auto' or a torch floating dtype name such as 'float32', "
                         f"got dtype={dtype!r}")
    return value


def _config_context(config: Any) -> int | None:
    """The context length stored in a ``transformers`` config (its text config for multimodal
    models), or None."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _resolve_context(model: Any, requested: int | None, path: Path, argument: str) -> int:
    stored = _config_context(model.config)
    if requested is None:
        if stored is None:
            raise ValueError(f"the config in {path} stores no context length (none of "
                             f"{', '.join(_CONTEXT_FIELDS)}); pass {argument}")
        return stored
    if requested < 2 or (stored is not None and requested > stored):
        raise ValueError(f"{argument} must be in [2, {stored}] for the model in {path}, got "
                         f"{argument}={requested}")
    return requested


@dataclasses.dataclass(frozen=True)
class HuggingFaceJudge:
    """A local Hugging Face causal LM (e.g. a GPT-2 directory) as a judge of
    :func:`~hybriddiff.evaluation.generative.generative_perplexity`; needs ``transformers`` and
    ``torch``. ``context_length`` defaults to the config's (``max_position_embeddings``,
    ``n_positions``, ...); the judge's BOS (if its tokenizer has one) is prepended to each text."""

    path: str
    model: Any = dataclasses.field(compare=False, repr=False)
    tokenizer: Any = dataclasses.field(compare=False, repr=False)
    context_length: int

    @classmethod
    def load(cls, path: str | Path, *, context_length: int | None = None, dtype: str = "float32",
             device: str = "cpu") -> HuggingFaceJudge:
        """Loads the model and tokenizer in the local directory ``path`` (never downloads).
        ``dtype``: a torch dtype name or ``'auto'`` (the checkpoint's)."""
        torch, transformers = _torch_transformers("a Hugging Face judge")
        directory = _local_dir(path, "path")
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=_torch_dtype(torch, dtype)).to(device).eval()
        context = _resolve_context(model, context_length, directory, "context_length")
        return cls(str(path), model, tokenizer, context)

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode(self, text: str) -> Sequence[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """``[M, C]`` ids -> ``[M, C, V]`` float32 log-probabilities (output ``c`` predicts
        ``c + 1``)."""
        import torch

        tokens = np.array(tokens, np.int64)
        chex.assert_rank(tokens, 2)
        ids = torch.as_tensor(tokens, device=self.model.device)  # [M, C]
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()  # [M, C, V]


def featurize_texts(texts: Sequence[str], featurizer: str | Path, *, max_length: int | None = None,
                    batch_size: int = 8, dtype: str = "float32",
                    device: str = "cpu") -> np.ndarray:
    """``[n, d]`` float32 features of ``texts``: the final-layer hidden state of each text's last
    token under the local model directory ``featurizer`` (loaded with ``transformers.AutoModel``),
    after truncating to the first ``max_length`` tokens (default: the model's context). Texts are
    right-padded in batches of ``batch_size``; padding never reaches a last token (causal model)."""
    torch, transformers = _torch_transformers("featurize_texts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    if not texts:
        raise ValueError("texts must hold at least one text, got none")
    directory = _local_dir(featurizer, "featurizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(
        directory, local_files_only=True, dtype=_torch_dtype(torch, dtype)).to(device).eval()
    max_length = _resolve_context(model, max_length, directory, "max_length")
    rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"texts[{empty[0]}]={texts[empty[0]]!r} has no tokens to featurize")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    features = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        lengths = np.array([len(row) for row in chunk])  # [b]
        ids = np.full((len(chunk), lengths.max()), pad_id, np.int64)  # [b, T]
        mask = np.arange(lengths.max())[None, :] < lengths[:, None]  # [b, T]
        ids[mask] = np.concatenate(chunk)
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(ids, device=model.device),
                        attention_mask=torch.as_tensor(mask.astype(np.int64), device=model.device),
                        output_hidden_states=True)
        last = out.hidden_states[-1][torch.arange(len(chunk)), torch.as_tensor(lengths - 1)]
        features.append(last.float().cpu().numpy())  # [b, d]
    return np.concatenate(features)


class MauveResult(NamedTuple):
    """MAUVE of ``P`` (e.g. model samples) against ``Q`` (e.g. human text); ``mauve`` in [0, 1],
    higher is closer."""

    mauve: float  # area under the divergence curve (module docstring)
    mauve_star: float  # the same on Krichevsky-Trofimov smoothed histograms (counts + 1/2)
    frontier_integral: float  # in [0, 1], lower is closer (Pillutla et al., JMLR 2023)
    divergence_curve: np.ndarray  # [m + 2, 2] points (exp(-c KL(Q‖R_λ)), exp(-c KL(P‖R_λ)))
    p_hist: np.ndarray  # [num_buckets] quantised P
    q_hist: np.ndarray  # [num_buckets] quantised Q
    num_buckets: int


def _side_features(name: str, texts: Sequence[str] | None, features: Any, featurizer: Any,
                   featurize: dict[str, Any]) -> np.ndarray:
    if (texts is None) == (features is None):
        raise ValueError(f"give exactly one of {name}_texts or {name}_features, got "
                         f"{'neither' if texts is None else 'both'}")
    if texts is not None:
        if not texts:
            raise ValueError(f"{name}_texts must hold at least one text, got none")
        if featurizer is None:
            raise ValueError(f"{name}_texts need a featurizer (a local Hugging Face model "
                             "directory), got featurizer=None")
        return featurize_texts(texts, featurizer, **featurize)
    array = np.asarray(features, np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name}_features must be a finite [n, d] array with n >= 1, got "
                         f"shape {array.shape}")
    return array


def mauve_score(p_texts: Sequence[str] | None = None, q_texts: Sequence[str] | None = None, *,
                p_features: Any = None, q_features: Any = None,
                featurizer: str | Path | None = None, max_length: int | None = None,
                batch_size: int = 8, device: str = "cpu", num_buckets: int | str = "auto",
                kmeans_num_redo: int = 5, kmeans_max_iter: int = 500,
                kmeans_explained_var: float = 0.9, pca_max_data: int = -1,
                divergence_curve_discretization_size: int = 25,
                mauve_scaling_factor: float = 5.0, seed: int = 25) -> MauveResult:
    """MAUVE (module docstring) between ``P`` and ``Q``, each given as texts (featurized with
    :func:`featurize_texts` and the local model directory ``featurizer``) or as ``[n, d]``
    features. ``num_buckets='auto'`` is the package's ``max(2, round(min(n_P, n_Q) / 10))``; the
    quantisation options and ``seed`` go to ``mauve.compute_mauve`` (needs ``mauve-text``)."""
    try:
        import mauve
    except ImportError as error:
        raise ImportError("mauve_score needs the mauve-text package: pip install mauve-text "
                          f"(featurizing texts also needs {_TORCH_HINT})") from error
    featurize = {"max_length": max_length, "batch_size": batch_size, "device": device}
    p = _side_features("p", p_texts, p_features, featurizer, featurize)
    q = _side_features("q", q_texts, q_features, featurizer, featurize)
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"p_features and q_features must have the same dimension, got shapes "
                         f"{p.shape} and {q.shape}")
    if num_buckets == "auto":
        num_buckets = max(2, round(min(len(p), len(q)) / 10))
    if not isinstance(num_buckets, int) or not 2 <= num_buckets <= len(p) + len(q):
        raise ValueError(f"num_buckets must be 'auto' or an integer in [2, n_P + n_Q = "
                         f"{len(p) + len(q)}], got num_buckets={num_buckets!r}")
    if not 0.0 < kmeans_explained_var < 1.0:
        raise ValueError(f"kmeans_explained_var must be in (0, 1), got "
                         f"kmeans_explained_var={kmeans_explained_var}")
    out = mauve.compute_mauve(
        p_features=p, q_features=q, num_buckets=num_buckets, pca_max_data=pca_max_data,
        kmeans_explained_var=kmeans_explained_var, kmeans_num_redo=kmeans_num_redo,
        kmeans_max_iter=kmeans_max_iter,
        divergence_curve_discretization_size=divergence_curve_discretization_size,
        mauve_scaling_factor=mauve_scaling_factor, seed=seed, verbose=False)
    return MauveResult(mauve=float(out.mauve), mauve_star=float(out.mauve_star),
                       frontier_integral=float(out.frontier_integral),
                       divergence_curve=np.asarray(out.divergence_curve),
                       p_hist=np.asarray(out.p_hist), q_hist=np.asarray(out.q_hist),
                       num_buckets=int(out.num_buckets))

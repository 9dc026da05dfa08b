"""Tests for hybriddiff.evaluation.huggingface.mauve_score and featurize_texts: MAUVE of equal and
of disjoint feature distributions, the reported scores against an independent numpy/scipy
divergence frontier on the package's histograms, last-token features of the tiny local GPT-2 of
test_hf_judge.py against a per-text torch reference, texts end to end, and the error paths."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("mauve")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pydoc_data.topics import topics  # noqa: E402
from scipy import integrate  # noqa: E402
from tiny_gpt2 import offline, tiny  # noqa: E402,F401 (fixtures)

from hybriddiff.evaluation import featurize_texts, mauve_score  # noqa: E402

QUANTISE = {"kmeans_num_redo": 2, "kmeans_max_iter": 100}


def gaussians(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """P ~ N(-shift e_0, I), Q ~ N(+shift e_0, I) in 8 dimensions, n points each."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(size=(2, n, 8))
    p[:, 0] -= shift
    q[:, 0] += shift
    return p, q


def kl(a: np.ndarray, b: np.ndarray) -> float:
    """KL(a‖b) of two histograms (b > 0 wherever a > 0 for the mixtures used here)."""
    terms = [x * np.log(x / y) for x, y in zip(a, b) if x > 0]
    return float(sum(terms))


def reference_mauve(p: np.ndarray, q: np.ndarray, c: float, m: int) -> float:
    """Area under the divergence frontier of histograms p, q: mixtures R = λP + (1-λ)Q on
    λ = linspace(1e-6, 1 - 1e-6, m), points (exp(-c KL(Q‖R)), exp(-c KL(P‖R))) with the end points
    (1, 0) and (0, 1); trapezoid areas over x and over y, averaged."""
    points = [(1.0, 0.0)]
    for lam in np.linspace(1e-6, 1 - 1e-6, m):
        r = lam * p + (1 - lam) * q
        points.append((np.exp(-c * kl(q, r)), np.exp(-c * kl(p, r))))
    points.append((0.0, 1.0))

    def area(pairs: list[tuple[float, float]]) -> float:
        pairs = sorted(pairs)
        return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]))

    return 0.5 * (area(points) + area([(y, x) for x, y in points]))


def reference_frontier_integral(p: np.ndarray, q: np.ndarray) -> float:
    """FI(P, Q) = 2 ∫_0^1 [λ KL(P‖R_λ) + (1 - λ) KL(Q‖R_λ)] dλ by quadrature (JMLR 2023)."""
    def integrand(lam: float) -> float:
        r = lam * p + (1 - lam) * q
        return lam * kl(p, r) + (1 - lam) * kl(q, r)

    return 2 * integrate.quad(integrand, 0, 1, limit=200)[0]


def test_mauve_is_near_one_for_one_distribution_and_near_zero_for_disjoint_ones() -> None:
    p, q = gaussians(400, 0.0, 0)
    same = mauve_score(p_features=p, q_features=q, num_buckets=8, **QUANTISE)
    assert same.mauve > 0.95 and same.frontier_integral < 0.05
    p, q = gaussians(400, 10.0, 1)
    apart = mauve_score(p_features=p, q_features=q, num_buckets=8, **QUANTISE)
    assert np.all(apart.p_hist * apart.q_hist == 0)  # no shared bucket
    assert apart.mauve < 0.02 and apart.frontier_integral > 0.99


@pytest.mark.parametrize("scaling, size", [(5.0, 25), (2.0, 11)])
def test_reported_scores_match_divergence_frontier_of_histograms(scaling: float, size: int) -> None:
    n_p, n_q = 300, 240
    p, q = gaussians(300, 0.6, 3)
    result = mauve_score(p_features=p, q_features=q[:n_q], num_buckets=6,
                         mauve_scaling_factor=scaling, divergence_curve_discretization_size=size,
                         **QUANTISE)
    assert result.p_hist.shape == result.q_hist.shape == (6,) and result.num_buckets == 6
    assert result.divergence_curve.shape == (size + 2, 2)
    assert 0.05 < result.mauve < 0.95  # a case between the extremes
    np.testing.assert_allclose(result.mauve, reference_mauve(result.p_hist, result.q_hist, scaling,
                                                             size), rtol=1e-10)
    p_counts, q_counts = np.rint(result.p_hist * n_p), np.rint(result.q_hist * n_q)
    assert p_counts.sum() == n_p and q_counts.sum() == n_q
    smooth_p, smooth_q = (p_counts + 0.5) / (n_p + 3.0), (q_counts + 0.5) / (n_q + 3.0)
    np.testing.assert_allclose(result.mauve_star,
                               reference_mauve(smooth_p, smooth_q, scaling, size), rtol=1e-10)
    np.testing.assert_allclose(result.frontier_integral,
                               reference_frontier_integral(result.p_hist, result.q_hist),
                               rtol=1e-6)
    again = mauve_score(p_features=p, q_features=q[:n_q], num_buckets=6,
                        mauve_scaling_factor=scaling, divergence_curve_discretization_size=size,
                        **QUANTISE)
    np.testing.assert_array_equal(again.p_hist, result.p_hist)  # fixed seed


def test_auto_num_buckets_is_a_tenth_of_the_smaller_set() -> None:
    p, q = gaussians(70, 0.0, 4)
    assert mauve_score(p_features=p, q_features=q[:41], **QUANTISE).num_buckets == 4


def test_featurize_texts_is_the_last_token_hidden_state(tiny: SimpleNamespace) -> None:
    texts = ["a", topics["assert"][:400], "The quick brown fox.", topics["if"][:200], "<eos> x"]
    got = featurize_texts(texts, tiny.directory, max_length=16, batch_size=3)
    want = []
    for text in texts:
        ids = torch.tensor([tiny.raw.encode(text).ids[:16]])
        with torch.no_grad():
            hidden = tiny.model(ids, output_hidden_states=True).hidden_states[-1]
        want.append(hidden[0, -1].numpy())
    assert got.shape == (5, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)


def test_mauve_of_texts_with_a_local_featurizer(tiny: SimpleNamespace) -> None:
    words = topics["assert"].split() + topics["if"].split()
    rng = np.random.default_rng(5)
    p_texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) for _ in range(24)]
    q_texts = [topics[key][:300] for key in sorted(topics)[10:34]]
    result = mauve_score(p_texts, q_texts, featurizer=tiny.directory, num_buckets=3, **QUANTISE)
    assert np.isfinite(result.mauve) and 0.0 <= result.mauve <= 1.0
    assert result.p_hist.sum() == pytest.approx(1.0) and result.num_buckets == 3


def test_mauve_rejects_bad_arguments(tiny: SimpleNamespace, tmp_path: Path) -> None:
    p, q = gaussians(20, 0.0, 6)
    with pytest.raises(ValueError, match="give exactly one of p_texts or p_features, got neither"):
        mauve_score(q_features=q)
    with pytest.raises(ValueError, match="q_texts or q_features, got both"):
        mauve_score(q_texts=["x"], p_features=p, q_features=q)
    with pytest.raises(ValueError, match=r"same dimension, got shapes \(20, 8\) and \(20, 5\)"):
        mauve_score(p_features=p, q_features=q[:, :5])
    with pytest.raises(ValueError, match=r"p_features must be a finite \[n, d\] array.*\(20,\)"):
        mauve_score(p_features=p[:, 0], q_features=q)
    with pytest.raises(ValueError, match="p_texts need a featurizer.*featurizer=None"):
        mauve_score(["x"], q_features=q)
    with pytest.raises(ValueError, match="q_texts must hold at least one text"):
        mauve_score(p_features=p, q_texts=[], featurizer=tiny.directory)
    missing = tmp_path / "no_model"
    with pytest.raises(FileNotFoundError, match=f"featurizer='{missing}' is not a directory"):
        mauve_score(["x"], ["y"], featurizer=missing)
    with pytest.raises(ValueError, match=r"num_buckets must be .*\[2, n_P \+ n_Q = 40\].*=41"):
        mauve_score(p_features=p, q_features=q, num_buckets=41)
    with pytest.raises(ValueError, match="got kmeans_explained_var=1.0"):
        mauve_score(p_features=p, q_features=q, kmeans_explained_var=1.0)
    with pytest.raises(ValueError, match=r"texts\[1\]='' has no tokens"):
        featurize_texts(["x", ""], tiny.directory)
    with pytest.raises(ValueError, match="got batch_size=0"):
        featurize_texts(["x"], tiny.directory, batch_size=0)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 32\].*max_length=33"):
        featurize_texts(["x"], tiny.directory, max_length=33)

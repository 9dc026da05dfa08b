"""Evaluation: Monte-Carlo negative-ELBO likelihood bounds (seed 000 App. C) and sample quality
(generative perplexity under a judge, unigram entropy, MAUVE). Hugging Face judges, text features
and MAUVE (optional torch / transformers / mauve-text, imported lazily):
:mod:`hybriddiff.evaluation.huggingface`. Sampling and evaluating a run directory:
:mod:`hybriddiff.evaluation.runs`."""

from hybriddiff.evaluation.generative import (ARJudge, GenPPLResult, Judge, eos_mask,
                                              generative_perplexity, score_tokens, unigram_entropy,
                                              window_plan)
from hybriddiff.evaluation.huggingface import (HuggingFaceJudge, MauveResult, featurize_texts,
                                               mauve_score)
from hybriddiff.evaluation.likelihood import (NelboOutput, negative_elbo, prior_kl,
                                              substitution_entropy)

__all__ = [
    "ARJudge",
    "GenPPLResult",
    "HuggingFaceJudge",
    "Judge",
    "MauveResult",
    "NelboOutput",
    "eos_mask",
    "featurize_texts",
    "generative_perplexity",
    "mauve_score",
    "negative_elbo",
    "prior_kl",
    "score_tokens",
    "substitution_entropy",
    "unigram_entropy",
    "window_plan",
]

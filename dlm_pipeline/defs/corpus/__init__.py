"""Corpus domain: configs, weights, raw and expanded corpus, and the expansion checks."""

from dlm_pipeline.defs.corpus.assets import expanded_corpus, raw_corpus, training_configs, weights_map
from dlm_pipeline.defs.corpus.checks import expansion_deterministic, expansion_matches_weights

__all__ = [
    "expanded_corpus",
    "expansion_deterministic",
    "expansion_matches_weights",
    "raw_corpus",
    "training_configs",
    "weights_map",
]

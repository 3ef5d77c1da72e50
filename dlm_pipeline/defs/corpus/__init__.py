"""Corpus domain: configs, weights, raw and expanded corpus, and the expansion checks."""

from dlm_pipeline.defs.corpus.assets import expanded_corpus, raw_corpus, training_configs, weights_map
from dlm_pipeline.defs.corpus.checks import expanded_corpus_checks

__all__ = ["expanded_corpus", "expanded_corpus_checks", "raw_corpus", "training_configs", "weights_map"]

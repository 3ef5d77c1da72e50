"""Tokens domain: the per-seed tokenized cache over the shared token store, and its check."""

from dlm_pipeline.defs.tokens.assets import tokenized_cache
from dlm_pipeline.defs.tokens.checks import tokens_match_tokenizer

__all__ = ["tokenized_cache", "tokens_match_tokenizer"]

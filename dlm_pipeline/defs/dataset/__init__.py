"""The training dataset (SPEC §7): the asset and its checks."""

from dlm_pipeline.defs.dataset.assets import training_dataset
from dlm_pipeline.defs.dataset.checks import packing_conserves_tokens, split_is_leak_free

__all__ = ["packing_conserves_tokens", "split_is_leak_free", "training_dataset"]

"""The training dataset (SPEC §7): the asset and its checks."""

from dlm_pipeline.defs.dataset.assets import training_dataset
from dlm_pipeline.defs.dataset.checks import training_dataset_checks

__all__ = ["training_dataset", "training_dataset_checks"]

"""Everything Dagster loads: assets, checks, the job, sensor, schedule, resources and the executor.

`DLM_DEPLOYMENT` picks the executor: `local` (default) runs each seed's graph in one process
(~1 s per run); `shared` uses the multiprocess executor for very large trees; `k8s` runs each
step in its own Kubernetes pod (needs dagster-k8s; run config in examples/deployments/k8s/).
"""

from __future__ import annotations

import os

import dagster as dg

from dlm_pipeline import settings
from dlm_pipeline.defs.assets import expanded_corpus, raw_corpus, training_configs, weights_map
from dlm_pipeline.defs.automation import config_change_sensor, nightly_all_seeds
from dlm_pipeline.defs.checks import expansion_deterministic, expansion_matches_weights
from dlm_pipeline.defs.compute import ComputeResource
from dlm_pipeline.defs.constants import CORPUS_JOB
from dlm_pipeline.defs.resources import (
    DatasetResource,
    ParquetIOManager,
    SourceTree,
    TokenCacheResource,
    TokenizerResource,
)
from dlm_pipeline.defs.tokens import tokenized_cache, tokens_match_tokenizer

ASSETS = [training_configs, weights_map, raw_corpus, expanded_corpus, tokenized_cache]
CHECKS = [expansion_deterministic, expansion_matches_weights, tokens_match_tokenizer]

corpus_job = dg.define_asset_job(
    CORPUS_JOB,
    selection=dg.AssetSelection.assets(*ASSETS),
    description="The whole corpus graph for one seed.",
)

def _k8s_executor() -> dg.ExecutorDefinition:
    from dagster_k8s import k8s_job_executor  # only deployments that ask for it need the package

    return k8s_job_executor


_EXECUTORS = {
    "local": lambda: dg.in_process_executor,
    "shared": lambda: dg.multiprocess_executor,
    "k8s": _k8s_executor,
}


def default_resources() -> dict:
    return {
        "source": SourceTree.from_env(),
        "io_manager": ParquetIOManager(output_dir=settings.output_dir()),
        "tokenizer": TokenizerResource.from_env(),
        "token_cache": TokenCacheResource.from_env(),
        "compute": ComputeResource.from_env(),
        "dataset": DatasetResource.from_env(),
    }


def build_defs(resources: dict | None = None) -> dg.Definitions:
    """The definitions, with resources from the environment unless given (tests pass their own)."""
    deployment = os.environ.get(settings.ENV_DEPLOYMENT, "local")
    if deployment not in _EXECUTORS:
        raise settings.SettingsError(f"{settings.ENV_DEPLOYMENT} must be one of {', '.join(_EXECUTORS)}, got {deployment!r}")
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=[corpus_job],
        sensors=[config_change_sensor],
        schedules=[nightly_all_seeds],
        resources=resources if resources is not None else default_resources(),
        executor=_EXECUTORS[deployment](),
    )


defs = build_defs()


def resolved_corpus_job() -> dg.JobDefinition:
    """The job with resources from the current environment: what the CLI runs, and hands to
    `dg.reconstructable` so that out-of-process executors rebuild it in their step processes."""
    return build_defs().resolve_job_def(CORPUS_JOB)

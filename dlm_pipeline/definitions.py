"""Everything Dagster loads: assets, checks, the job, sensor, schedule, resources and the executor.

`DLM_DEPLOYMENT` picks the executor: `local` (default) runs each seed's graph in one process
(~1 s per run); `shared` uses the multiprocess executor for very large trees; `k8s` runs each
step in its own Kubernetes pod (needs dagster-k8s; run config in examples/deployments/k8s/).

Nothing is built at import: Dagster's tools (`dg`, `dagster dev`, workspace.yaml) call the lazy
`load_defs`, the CLI and tests call `build_defs`, so a bad setting is reported where it can be caught.
"""

from __future__ import annotations

import dagster as dg

from dlm_pipeline import settings
from dlm_pipeline.defs.automation import build_config_change_sensor, build_nightly_schedule, build_source_change_sensor
from dlm_pipeline.defs.compute import ComputeResource
from dlm_pipeline.defs.constants import CORPUS_JOB
from dlm_pipeline.defs.corpus import expanded_corpus, expanded_corpus_checks, raw_corpus, training_configs, weights_map
from dlm_pipeline.defs.dataset import training_dataset, training_dataset_checks
from dlm_pipeline.defs.resources import (
    DatasetResource,
    ParquetIOManager,
    SourceTree,
    TokenCacheResource,
    TokenizerResource,
)
from dlm_pipeline.defs.tokens import tokenized_cache, tokens_match_tokenizer

ASSETS = [training_configs, weights_map, raw_corpus, expanded_corpus, tokenized_cache, training_dataset]
# Checks of one asset share a step where they share their inputs: Dagster's cost per step was most
# of what each check cost.
CHECKS = [expanded_corpus_checks, tokens_match_tokenizer, training_dataset_checks]

corpus_job = dg.define_asset_job(
    CORPUS_JOB,
    selection=dg.AssetSelection.assets(*ASSETS),
    description="The whole corpus graph for one seed.",
)


def _k8s_executor() -> dg.ExecutorDefinition:
    try:
        from dagster_k8s import k8s_job_executor  # only deployments that ask for it need the package
    except ImportError:
        message = f"{settings.ENV_DEPLOYMENT}=k8s needs dagster-k8s: pip install dagster-k8s"
        raise settings.SettingsError(message) from None

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
    """The definitions, with resources from the environment unless given (tests pass their own).
    Raises settings.SettingsError for a bad DLM_* value."""
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=[corpus_job],
        sensors=[
            build_config_change_sensor(settings.sensor_interval()),
            build_source_change_sensor(settings.sensor_interval()),
        ],
        schedules=[build_nightly_schedule(settings.nightly_cron())],
        resources=resources if resources is not None else default_resources(),
        executor=_EXECUTORS[settings.deployment()](),
    )


@dg.definitions
def load_defs() -> dg.Definitions:
    return build_defs()


def __getattr__(name: str):
    """`defs`, built on first access, for code written when this module built it at import."""
    if name == "defs":
        return build_defs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolved_corpus_job() -> dg.JobDefinition:
    """The job with resources from the current environment: what the CLI runs, and hands to
    `dg.reconstructable` so that out-of-process executors rebuild it in their step processes."""
    return build_defs().resolve_job_def(CORPUS_JOB)

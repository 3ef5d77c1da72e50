"""Checks on the training dataset, per seed: no text on both sides, and no id lost or changed.

Both read the written files back and compare them with a recomputation from the stored inputs and
the token store, using the settings recorded in dataset.json. They run in one step
(`training_dataset_checks`) that recomputes the plan once for both; either can still be run alone.
The ids are read from the store a batch of texts at a time and compared with every document that
uses them, in place in the memory-mapped .bin (no spill file, the store decoded once).
"""

from concurrent.futures import Future, ThreadPoolExecutor

import dagster as dg
import numpy as np

from dlm_pipeline.core.dataset import (
    DatasetError,
    DatasetPlan,
    conservation_problems,
    leak_report,
    parquet_problems,
    plan_leak_report,
    read_manifest,
    used_text_ids,
)
from dlm_pipeline.core.megatron import MegatronFormatError
from dlm_pipeline.defs.constants import PACKING_CONSERVES_TOKENS, SPLIT_IS_LEAK_FREE
from dlm_pipeline.defs.dataset.assets import INPUTS, dataset_folder, plan_of, read_inputs, training_dataset
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seed_check_spec
from dlm_pipeline.defs.resources import ParquetIOManager, SourceTree, TokenCacheResource, TokenizerResource
from dlm_pipeline.defs.reuse import unchanged_check_results

LEAK_SPEC = seed_check_spec(
    SPLIT_IS_LEAK_FREE,
    asset=training_dataset,
    additional_deps=INPUTS,
    description="Reads every Megatron document of both splits back and finds its text by its ids: no text is on "
    "both sides, and every document is on the side the split rule gives its content key.",
)
PACKING_SPEC = seed_check_spec(
    PACKING_CONSERVES_TOKENS,
    asset=training_dataset,
    additional_deps=INPUTS,
    description="The Parquet sequences, the Megatron documents and the token store agree id for id; every sequence "
    "but the last holds seq_len ids, and doc_starts mark where each document begins.",
)


def _leak_result(folder, manifest, plan: DatasetPlan, text_ids, files_equal_plan: bool) -> dg.AssetCheckResult:
    """From the plan when the packing check just found the files equal to it id for id (reading
    every document back again would cost as much as writing it); else from the files read back."""
    try:
        report = (
            plan_leak_report(plan)
            if files_equal_plan
            else leak_report(folder, plan, text_ids(), int(manifest["eos_id"]), np.dtype(manifest["dtype"]))
        )
    except (OSError, MegatronFormatError) as exc:
        return dg.AssetCheckResult(
            check_name=SPLIT_IS_LEAK_FREE, passed=False, description=f"cannot read the dataset: {exc}"
        )
    report["method"] = "plan, files verified id for id" if files_equal_plan else "files read back"
    problems = [
        f"{report['leaked']} text(s) on both sides" if report["leaked"] else "",
        f"{report['misplaced']} document(s) on the wrong side" if report["misplaced"] else "",
        f"{report['unknown']} document(s) matching no text of the corpus" if report["unknown"] else "",
    ]
    problems = [p for p in problems if p]
    return dg.AssetCheckResult(
        check_name=SPLIT_IS_LEAK_FREE, passed=not problems, description="; ".join(problems) or None, metadata=report
    )


def _packing_result(folder, manifest, plan: DatasetPlan, text_ids, parquet: Future) -> dg.AssetCheckResult:
    try:
        problems = conservation_problems(folder, plan, text_ids(), int(manifest["eos_id"]), parquet.result())
    except (OSError, MegatronFormatError) as exc:
        problems = [f"cannot read the dataset: {exc}"]
    return dg.AssetCheckResult(
        check_name=PACKING_CONSERVES_TOKENS,
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={f"{split}/{k}": v for split, counts in manifest["splits"].items() for k, v in counts.items()},
    )


@dg.multi_asset_check(name="training_dataset_checks", specs=[LEAK_SPEC, PACKING_SPEC], can_subset=True)
def training_dataset_checks(
    context: dg.AssetCheckExecutionContext,
    io_manager: dg.ResourceParam[ParquetIOManager],
    tokenizer: TokenizerResource,
    token_cache: TokenCacheResource,
    source: SourceTree,
):
    """One recomputation of the split and order from the stored inputs, shared by the selected checks."""
    seed = parse_seed_or_fail(context)  # first: a hostile partition key names no folder to read
    selected = [spec.name for spec in (LEAK_SPEC, PACKING_SPEC) if spec.key in context.selected_asset_check_keys]
    if (same := unchanged_check_results(context, "training_dataset", selected, source)) is not None:
        yield from same
        return
    folder = dataset_folder(io_manager, context.instance, context.partition_key)
    try:
        manifest = read_manifest(folder)
    except DatasetError as exc:
        for name in selected:
            yield dg.AssetCheckResult(check_name=name, passed=False, description=str(exc))
        return
    loaded = tokenizer.load()
    if loaded.fingerprint != manifest.get("tokenizer_fingerprint"):
        for name in selected:
            yield dg.AssetCheckResult(
                check_name=name,
                passed=False,
                description="the dataset was written with another tokenizer: re-materialize it",
            )
        return
    with ThreadPoolExecutor(1) as pool:
        # The Parquet files against the Megatron files (no plan needed) while the plan is recomputed.
        packing_selected = PACKING_CONSERVES_TOKENS in selected
        parquet = pool.submit(parquet_problems, folder, int(manifest["seq_len"])) if packing_selected else None
        inputs = read_inputs(io_manager, context)
        plan = plan_of(
            inputs,
            seed=seed,
            split_seed=int(manifest["split_seed"]),
            val_fraction=float(manifest["val_fraction"]),
        )
        store = token_cache.store(context.instance)

        def text_ids():
            return used_text_ids(store, loaded, plan, inputs.raw_corpus)

        packing = _packing_result(folder, manifest, plan, text_ids, parquet) if packing_selected else None
    if packing is not None:
        yield packing
    if SPLIT_IS_LEAK_FREE in selected:
        yield _leak_result(folder, manifest, plan, text_ids, files_equal_plan=packing is not None and packing.passed)

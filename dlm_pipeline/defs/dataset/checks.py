"""Checks on the training dataset, per seed: no text on both sides, and no id lost or changed.

Both read the written files back and compare them with a recomputation from the stored inputs and
the token store, using the settings recorded in dataset.json.
"""

import dagster as dg
import numpy as np
import pyarrow as pa

from dlm_pipeline.core.dataset import DatasetError, conservation_problems, leak_report, read_manifest
from dlm_pipeline.core.megatron import MegatronFormatError
from dlm_pipeline.defs.constants import PACKING_CONSERVES_TOKENS, SPLIT_IS_LEAK_FREE
from dlm_pipeline.defs.dataset.assets import INS, dataset_folder, prepare, training_dataset
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seed_check
from dlm_pipeline.defs.resources import ParquetIOManager, TokenCacheResource, TokenizerResource


def _recomputed(context, io_manager, tokenizer, token_cache, raw_corpus, expanded_corpus, weights_map):
    """(folder, manifest, prepared) for this seed's dataset, or a failed check result that says why."""
    folder = dataset_folder(io_manager, context.instance, context.partition_key)
    try:
        manifest = read_manifest(folder)
    except DatasetError as exc:
        return dg.AssetCheckResult(passed=False, description=str(exc))
    prepared = prepare(
        context,
        seed=parse_seed_or_fail(context),
        split_seed=int(manifest["split_seed"]),
        val_fraction=float(manifest["val_fraction"]),
        tokenizer=tokenizer,
        token_cache=token_cache,
        raw_corpus=raw_corpus,
        expanded_corpus=expanded_corpus,
        weights_map=weights_map,
    )
    if prepared.loaded.fingerprint != manifest.get("tokenizer_fingerprint"):
        return dg.AssetCheckResult(
            passed=False, description="the dataset was written with another tokenizer: re-materialize it"
        )
    return folder, manifest, prepared


@seed_check(
    asset=training_dataset,
    name=SPLIT_IS_LEAK_FREE,
    additional_ins=INS,
    description="Reads every Megatron document of both splits back and finds its text by its ids: no text is on "
    "both sides, and every document is on the side the split rule gives its content key.",
)
def split_is_leak_free(
    context: dg.AssetCheckExecutionContext,
    io_manager: dg.ResourceParam[ParquetIOManager],
    tokenizer: TokenizerResource,
    token_cache: TokenCacheResource,
    raw_corpus: pa.Table,
    expanded_corpus: pa.Table,
    weights_map: pa.Table,
) -> dg.AssetCheckResult:
    found = _recomputed(context, io_manager, tokenizer, token_cache, raw_corpus, expanded_corpus, weights_map)
    if isinstance(found, dg.AssetCheckResult):
        return found
    folder, manifest, prepared = found
    try:
        report = leak_report(folder, prepared.plan, prepared.ids, int(manifest["eos_id"]), np.dtype(manifest["dtype"]))
    except (OSError, MegatronFormatError) as exc:
        return dg.AssetCheckResult(passed=False, description=f"cannot read the dataset: {exc}")
    problems = [
        f"{report['leaked']} text(s) on both sides" if report["leaked"] else "",
        f"{report['misplaced']} document(s) on the wrong side" if report["misplaced"] else "",
        f"{report['unknown']} document(s) matching no text of the corpus" if report["unknown"] else "",
    ]
    problems = [p for p in problems if p]
    return dg.AssetCheckResult(passed=not problems, description="; ".join(problems) or None, metadata=report)


@seed_check(
    asset=training_dataset,
    name=PACKING_CONSERVES_TOKENS,
    additional_ins=INS,
    description="The Parquet sequences, the Megatron documents and the token store agree id for id; every sequence "
    "but the last holds seq_len ids, and doc_starts mark where each document begins.",
)
def packing_conserves_tokens(
    context: dg.AssetCheckExecutionContext,
    io_manager: dg.ResourceParam[ParquetIOManager],
    tokenizer: TokenizerResource,
    token_cache: TokenCacheResource,
    raw_corpus: pa.Table,
    expanded_corpus: pa.Table,
    weights_map: pa.Table,
) -> dg.AssetCheckResult:
    found = _recomputed(context, io_manager, tokenizer, token_cache, raw_corpus, expanded_corpus, weights_map)
    if isinstance(found, dg.AssetCheckResult):
        return found
    folder, manifest, prepared = found
    try:
        problems = conservation_problems(
            folder, prepared.plan, prepared.ids, int(manifest["eos_id"]), int(manifest["seq_len"])
        )
    except (OSError, MegatronFormatError) as exc:
        problems = [f"cannot read the dataset: {exc}"]
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={f"{split}/{k}": v for split, counts in manifest["splits"].items() for k, v in counts.items()},
    )

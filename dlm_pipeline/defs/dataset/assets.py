"""`training_dataset`: what a trainer reads, per seed (SPEC §7).

Files under `<output_dir>/training_dataset/<seed>/`, written by the asset itself (a folder of
Parquet, Megatron and JSON files is not one table for the IO manager).
"""

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import dagster as dg
import numpy as np
import pyarrow as pa

from dlm_pipeline import settings
from dlm_pipeline.core.blob_store import BlobStore, BlobStoreError
from dlm_pipeline.core.corpus import ROW_SCHEMA
from dlm_pipeline.core.dataset import (
    MANIFEST,
    SPLITS,
    TRAIN,
    VALIDATION,
    DatasetError,
    DatasetPlan,
    DatasetSettings,
    StoredIds,
    manifest_bytes,
    plan_dataset,
    plan_token_ids,
    remove_stale_builds,
    resolve_eos_id,
    train_tag_tokens,
    write_dataset,
)
from dlm_pipeline.core.expansion import composed_row_weights
from dlm_pipeline.core.parquet_io import ParquetRows
from dlm_pipeline.core.tokenize import LoadedTokenizer
from dlm_pipeline.defs.checked_output import input_fingerprints, stored_columns, stored_rows
from dlm_pipeline.defs.constants import TOKEN_STORE_MARK
from dlm_pipeline.defs.metadata import ProgressLog, base_metadata, config_lineage, table_metadata
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seeds_partitions
from dlm_pipeline.defs.resources import (
    STORED_FILES,
    DatasetResource,
    ParquetIOManager,
    SourceTree,
    TokenCacheResource,
    TokenizerResource,
    stored_files,
    writes_into,
)
from dlm_pipeline.defs.reuse import computed_metadata, step_key, unchanged_output

GROUP = "dataset"
ASSET = "training_dataset"
# What the token rows and the dataset are made of (read by `read_inputs`, after the unchanged test).
INPUTS = ["raw_corpus", "expanded_corpus", "weights_map"]


class Inputs(NamedTuple):
    raw_corpus: ParquetRows  # its texts are read a batch at a time; the columns are checked to be there
    expanded_corpus: pa.Table  # only the row identity of the (large, text-carrying) expanded corpus
    weights_map: pa.Table


def read_inputs(io_manager: ParquetIOManager, context) -> Inputs:
    """The stored INPUTS of this step's seed, as `tokenized_cache`, `training_dataset` and its checks read them."""
    return Inputs(
        stored_rows(io_manager, context, "raw_corpus", ROW_SCHEMA.names),
        stored_columns(io_manager, context, "expanded_corpus", ["section_id", "copy"]),
        stored_columns(io_manager, context, "weights_map"),
    )


def dataset_folder(io_manager: ParquetIOManager, instance: dg.DagsterInstance, partition_key: str) -> Path:
    return io_manager.root(instance) / ASSET / partition_key


def dataset_files(folder: Path) -> list[Path]:
    """The files a dataset folder holds (SPEC §7)."""
    return [folder / MANIFEST, *(folder / f"{split}{ext}" for split in SPLITS for ext in (".parquet", ".bin", ".idx"))]


def spill_folder(io_manager: ParquetIOManager, instance: dg.DagsterInstance) -> Path:
    """Where the dataset's ids are spilled while it is written: beside the datasets, in the asset's
    folder, which is refused when a symlink or a file is in its place (the datasets would be written
    through it, outside the output directory; it was followed)."""
    try:
        return Path(BlobStore(io_manager.root(instance)).folder(ASSET))
    except BlobStoreError as exc:
        raise dg.Failure(description=str(exc)) from None


@dataclass(frozen=True)
class Prepared:
    loaded: LoadedTokenizer
    plan: DatasetPlan
    ids: StoredIds  # full ids per unique text of the plan (none for texts no document uses), in the store


def plan_of(inputs: Inputs, *, seed: int, split_seed: int, val_fraction: float) -> DatasetPlan:
    """The split and order of the documents (what the checks recompute without the ids)."""
    try:
        return plan_dataset(
            inputs.raw_corpus,
            inputs.expanded_corpus,
            composed_row_weights(inputs.raw_corpus.read(["path", "tags"]), inputs.weights_map),
            seed=seed,
            split_seed=split_seed,
            val_fraction=val_fraction,
        )
    except DatasetError as exc:
        raise dg.Failure(description=str(exc)) from None


def prepare(
    context,
    *,
    seed: int,
    split_seed: int,
    val_fraction: float,
    loaded: LoadedTokenizer,
    token_cache: TokenCacheResource,
    inputs: Inputs,
    spill_dir: Path,
) -> Prepared:
    """The split and order of the documents, and the full ids of the texts they use (the store is
    shared by all seeds, and `tokenized_cache` put every one of them there), spilled to an unnamed
    file in `spill_dir` (a folder we own)."""
    plan = plan_of(inputs, seed=seed, split_seed=split_seed, val_fraction=val_fraction)
    ids = plan_token_ids(
        token_cache.store(context.instance),
        loaded,
        plan,
        inputs.raw_corpus,
        ProgressLog(context, "texts tokenized"),
        spill_dir,
    )
    return Prepared(loaded, plan, ids)


def checked_split_settings(dataset: DatasetResource) -> tuple[float, int]:
    """The resource's values, checked as the DLM_* variables are (it can be configured in code or the UI)."""
    try:
        val_fraction = settings.check_val_fraction(float(dataset.val_fraction))
    except settings.SettingsError as exc:
        raise dg.Failure(description=f"{exc} (DLM_VAL_FRACTION / --val-fraction)") from None
    try:
        split_seed = settings.check_seed_text("the split seed", str(dataset.split_seed))
    except settings.SettingsError as exc:
        raise dg.Failure(description=f"{exc} (DLM_SPLIT_SEED / --split-seed)") from None
    return val_fraction, split_seed


def token_settings(loaded: LoadedTokenizer, val_fraction: float, split_seed: int) -> dict:
    """The settings that decide a seed's token rows and dataset (part of their step keys): the
    validation side also decides which texts tokenized_cache tokenizes ahead for the dataset."""
    return {
        "tokenizer": loaded.fingerprint,
        "max_seq_len": loaded.max_seq_len,
        "add_special_tokens": loaded.add_special_tokens,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
    }


def read_namespace(loaded: LoadedTokenizer) -> str:
    """The store namespace the dataset reads ids from: without special tokens (core/dataset.plan_token_ids),
    whatever `tokenized_cache` stores its rows under."""
    return dataclasses.replace(loaded, add_special_tokens=False).cache_namespace


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dg.asset(
    partitions_def=seeds_partitions,
    group_name=GROUP,
    kinds={"python", "parquet"},
    code_version="1",
    deps=[*INPUTS, "tokenized_cache"],  # after tokenized_cache, so the shared store is warm: nothing is tokenized twice
)
def training_dataset(
    context: dg.AssetExecutionContext,
    source: SourceTree,
    tokenizer: TokenizerResource,
    token_cache: TokenCacheResource,
    dataset: DatasetResource,
    io_manager: dg.ResourceParam[ParquetIOManager],
) -> dg.MaterializeResult:
    """Train/validation split by content before expansion; whole documents ended by EOS, packed into
    max_seq_len sequences (Parquet) and one sequence per document (Megatron .bin/.idx); dataset.json."""
    seed = parse_seed_or_fail(context)
    val_fraction, split_seed = checked_split_settings(dataset)
    folder = dataset_folder(io_manager, context.instance, context.partition_key)
    with writes_into(io_manager.root(context.instance), settings.ENV_OUTPUT_DIR):
        spill_dir = spill_folder(io_manager, context.instance)  # refused first if not a plain folder
    remove_stale_builds(folder)  # of killed runs: publishing removes them too, but an unchanged dataset is not
    loaded = tokenizer.load()
    inputs = input_fingerprints(io_manager, context, INPUTS)
    settings_used = {
        **token_settings(loaded, val_fraction, split_seed),
        "eos": dataset.eos_token,
        "mode": source.mode(),
    }
    key = step_key(context, inputs, settings_used)
    store = token_cache.store(context.instance)
    same = unchanged_output(
        context,
        key,
        inputs,
        dataset_files(folder),
        source,
        own_files=True,
        still={TOKEN_STORE_MARK: store.namespace_mark(read_namespace(loaded))},  # the ids it read are the store's
    )
    if same:
        return same
    read = read_inputs(io_manager, context)
    with writes_into(io_manager.root(context.instance), settings.ENV_OUTPUT_DIR):  # the ids spill beside the datasets
        prepared = prepare(
            context,
            seed=seed,
            split_seed=split_seed,
            val_fraction=val_fraction,
            loaded=loaded,
            token_cache=token_cache,
            inputs=read,
            spill_dir=spill_dir,
        )
    plan, ids = prepared.plan, prepared.ids
    try:
        eos_id = resolve_eos_id(loaded, dataset.eos_token)
    except DatasetError as exc:
        raise dg.Failure(description=str(exc)) from None
    options = DatasetSettings(
        seed=seed,
        split_seed=split_seed,
        val_fraction=val_fraction,
        seq_len=loaded.max_seq_len,
        expansion_mode=source.mode(),
        tokenizer_fingerprint=loaded.fingerprint,
        eos_id=eos_id,
        vocab_size=loaded.tokenizer.get_vocab_size(with_added_tokens=True),
    )
    try:
        objects = BlobStore(io_manager.root(context.instance))
        with writes_into(objects.root, settings.ENV_OUTPUT_DIR):
            manifest, summaries = write_dataset(folder, plan, ids, options, share=objects.share_in_place)
            objects.prune()  # the replaced dataset's files that no other seed shares
    except (DatasetError, BlobStoreError) as exc:
        raise dg.Failure(description=str(exc)) from None
    train, validation = summaries[TRAIN], summaries[VALIDATION]
    fingerprint = hashlib.sha256(manifest_bytes(manifest)).hexdigest()
    context.log.info(
        f"{train.documents:,} train documents ({train.tokens:,} tokens), {validation.documents:,} validation "
        f"documents ({validation.tokens:,} tokens) in {folder}"
    )
    base = base_metadata(seed, pa.table({}), fingerprint, inputs)
    base["dagster/row_count"] = dg.MetadataValue.int(train.sequences + validation.sequences)
    split_numbers = {
        f"{split}/{name}": dg.MetadataValue.int(value)
        for split in SPLITS
        for name, value in {**summaries[split].counts(), "last_sequence_padding": summaries[split].last_padding}.items()
    }
    metadata = {
        "seed": base.pop("seed"),
        "path": dg.MetadataValue.path(str(folder)),
        **split_numbers,
        "validation_fraction/documents": dg.MetadataValue.float(
            _share(validation.documents, train.documents + validation.documents)
        ),
        "validation_fraction/tokens": dg.MetadataValue.float(
            _share(validation.tokens, train.tokens + validation.tokens)
        ),
        "train_tokens_by_tag": table_metadata(
            train_tag_tokens(read.raw_corpus.read(["tags"])["tags"], plan.train_rows, ids, plan.text_index)
        ),
        "unique_texts": dg.MetadataValue.int(len(plan.unique_keys)),
        "validation_side_texts": dg.MetadataValue.int(int(np.count_nonzero(plan.validation[plan.unique_rows]))),
        "seq_len": dg.MetadataValue.int(options.seq_len),
        "val_fraction": dg.MetadataValue.float(val_fraction),
        "split_seed": dg.MetadataValue.int(split_seed),
        "expansion_mode": dg.MetadataValue.text(options.expansion_mode),
        "eos_id": dg.MetadataValue.int(eos_id),
        "dtype": dg.MetadataValue.text(options.dtype.name),
        "tokenizer_fingerprint": dg.MetadataValue.text(loaded.fingerprint),
        "dataset_json": dg.MetadataValue.json(manifest),
        **config_lineage(context),
        **computed_metadata(context, key),
        TOKEN_STORE_MARK: dg.MetadataValue.text(store.namespace_mark(read_namespace(loaded))),
        STORED_FILES: dg.MetadataValue.json(stored_files(dataset_files(folder))),
        **base,
    }
    with warnings.catch_warnings():  # data versions are beta in Dagster 1.13; we rely on them knowingly
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(fingerprint))

"""Resources: the source tree (with its limits), the Parquet IO manager, the tokenizer and its cache."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from dlm_pipeline import settings
from dlm_pipeline.core.blob_store import OBJECTS_DIR, BlobStore, BlobStoreError
from dlm_pipeline.core.config import DEFAULT_MAX_WEIGHT
from dlm_pipeline.core.corpus import DEFAULT_MAX_FILE_BYTES
from dlm_pipeline.core.fingerprint import parquet_fingerprint
from dlm_pipeline.core.ingest_index import IngestIndex
from dlm_pipeline.core.parquet_io import ParquetRows, error_line, read_parquet, write_parquet, write_parquet_stream
from dlm_pipeline.core.token_store import DEFAULT_MAX_BYTES as DEFAULT_CACHE_MAX_BYTES
from dlm_pipeline.core.token_store import TokenStore, TokenStoreError
from dlm_pipeline.core.tokenize import DEFAULT_MAX_SEQ_LEN, LoadedTokenizer, TokenizerError, load_tokenizer
from dlm_pipeline.core.tree import TreeScan, scan_tree
from dlm_pipeline.core.weights import SCOPE_NEAREST, check_scope
from dlm_pipeline.defs.constants import PARTITION_TAG
from dlm_pipeline.defs.metadata import StreamedOutput
from dlm_pipeline.defs.partitions import is_seed


class SourceTree(dg.ConfigurableResource):
    """The annotated source tree and the limits that apply to it."""

    root: str
    weights_scope: str = SCOPE_NEAREST
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_weight: float = DEFAULT_MAX_WEIGHT
    expansion_mode: str = settings.EXPANSION_BERNOULLI
    secret_entropy: bool = False
    max_expanded_bytes: int = settings.DEFAULT_MAX_EXPANDED_BYTES
    full_rescan: bool = False  # read every file, ignoring (and rebuilding) the ingest index

    @classmethod
    def from_env(cls) -> SourceTree:
        return cls(
            root=settings.source_root(),
            weights_scope=settings.weights_scope(),
            max_file_bytes=settings.max_file_bytes(),
            max_weight=settings.max_weight(),
            expansion_mode=settings.expansion_mode(),
            secret_entropy=settings.secret_entropy(),
            max_expanded_bytes=settings.max_expanded_bytes(),
            full_rescan=settings.full_rescan(),
        )

    def scope(self) -> str:
        return check_scope(self.weights_scope)

    def mode(self) -> str:
        return settings.check_expansion_mode(self.expansion_mode)

    def scan(self, instance: dg.DagsterInstance | None = None, files: bool = True) -> TreeScan:
        """Walk the tree; with `instance`, the pipeline's own folders in it are passed over."""
        return scan_tree(self.root, files=files, exclude_dirs=own_dirs(instance) if instance is not None else ())

    def ingest_index(self, instance: dg.DagsterInstance, scan: TreeScan, full_rescan: bool) -> IngestIndex:
        """The incremental-ingest index of this tree, kept under $DAGSTER_HOME (a folder the pipeline
        owns); with `full_rescan` (this setting, or the run's tag) every file is read again."""
        return IngestIndex(
            instance.root_directory,
            scan.root,
            max_file_bytes=self.max_file_bytes,
            secret_entropy=self.secret_entropy,
            full_rescan=full_rescan,
        )


def own_dirs(instance: dg.DagsterInstance) -> list[str]:
    """Folders the pipeline writes, as `default_resources` configures them (SPEC §1)."""
    return settings.pipeline_dirs(instance.root_directory) + [instance.storage_directory()]


# OS errors only a write gets: the file system is full (or the quota used up) or read-only. (Not EACCES:
# a read inside the same block could get it, and a folder we cannot use is refused before anything is written.)
_UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def writes_into(folder: str | os.PathLike, setting: str) -> Iterator[None]:
    """A write into `folder` that the file system refuses (disk full, read-only) fails the step with
    one line naming the folder and the setting that moves it; it was Dagster's wrapper and a bare
    `OSError: [Errno 28] No space left on device`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        raise dg.Failure(
            description=f"cannot write into {folder} ({exc.strerror}): free space there or make it writable, "
            f"or set {setting} to a folder that is"
        ) from None


SEED_INDEPENDENT_ASSETS = frozenset({"training_configs", "weights_map", "raw_corpus"})
STORED_FILES = "stored_files"  # metadata: what the stored output is (defs/reuse.py)


def stored_files(paths: Iterable[str | os.PathLike]) -> dict[str, list[int]]:
    """Size, mtime, inode, device and mode of each stored file (a symlink's own): an output whose
    files still have them was not rewritten (nor made unreadable) since (git's index trusts the same). A file whose folder is
    now a symlink (to where it was moved) counts as missing: the pipeline never reads through one."""
    found = {}
    for path in paths:
        try:
            if stat.S_ISLNK(os.lstat(os.path.dirname(path)).st_mode):
                continue
            info = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        found[str(path)] = [info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev, info.st_mode]
    return found


@dataclass(frozen=True)
class Unchanged:
    """What an asset hands over when its stored file is still its output (defs/reuse.py): nothing is written."""

    path: str


@dataclass(frozen=True)
class ReusedOutput:
    """What a seed-independent asset returns instead of a table when another seed's stored file
    (`path`, bytes hashing to `sha256`, verified by the asset) is its output too."""

    path: str
    sha256: str


class ParquetIOManager(dg.ConfigurableIOManager):
    """Tables at `<output_dir>/<asset_key>/<seed>.parquet`, written atomically.

    An empty `output_dir` means the instance's storage directory ($DAGSTER_HOME/storage). Equal
    bytes are stored once: each seed's file is a hard link to `<output_dir>/.objects/<sha256>.parquet`
    (core/blob_store.py), shared by every seed whose output is the same (the seed-independent
    assets always; a per-seed one when no fraction of a weight made the seeds differ).

    An asset hands over a table, or a `StreamedOutput` written row group by row group (memory: one
    row group), then fingerprinted from the stored file. An input gets the whole table, only the
    columns it asks for (`AssetIn(metadata={"columns": [...]})`), or with
    `AssetIn(metadata={"stream": True})` a `ParquetRows` reader that reads row group by row group
    (with `"columns"` too, the stored file must have them).
    """

    output_dir: str = ""

    @contextlib.contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator[ParquetIOManager]:
        """The run's seed's outputs are written by this run alone: it holds the seed's lock (core
        BlobStore.seed_lock) while the IO manager is up: the whole run in process, each step in a
        process of its own (the steps of one run share it). Another run of the seed waits for it, and says so."""
        seed = context.run.tags.get(PARTITION_TAG) if context.run else None
        with contextlib.ExitStack() as held:
            if context.instance is not None and seed is not None and is_seed(seed):
                root = self.root(context.instance)
                store = BlobStore(root)
                lock = store.seed_lock(
                    seed,
                    lambda: context.log.warning(f"waiting for another run of seed {seed} to finish"),
                    holder=context.run.run_id,  # the steps of this run share it (a process per step)
                )
                try:
                    with writes_into(root, settings.ENV_OUTPUT_DIR):  # the lock file records its holder
                        held.enter_context(lock)
                except (BlobStoreError, OSError) as exc:
                    raise dg.Failure(description=f"cannot lock seed {seed}'s outputs: {exc}") from None
                with contextlib.suppress(BlobStoreError, OSError):  # a clean-up, never a reason to fail
                    if store.delete_stale_temps(seed):
                        store.prune()  # the objects only those temp files held
            with super().yield_for_execution(context) as value:
                yield value

    def root(self, instance: dg.DagsterInstance) -> Path:
        """The output folder: `output_dir`, else the instance's storage directory."""
        return Path(self.output_dir) if self.output_dir else Path(instance.storage_directory())

    def _base(self, context: dg.OutputContext | dg.InputContext) -> Path:
        return self.root(context.step_context.instance)

    def output_path(self, instance: dg.DagsterInstance, asset: str, partition: str) -> Path:
        return self.root(instance) / asset / f"{partition}.parquet"

    def _path(self, context: dg.OutputContext | dg.InputContext, partition: str) -> Path:
        return self.output_path(context.step_context.instance, context.asset_key.path[-1], partition)

    def handle_output(
        self, context: dg.OutputContext, obj: pa.Table | ReusedOutput | StreamedOutput | Unchanged
    ) -> None:
        asset, name = context.asset_key.path[-1], f"{context.asset_partition_key}.parquet"
        if isinstance(obj, Unchanged):  # its metadata, recorded when it was written, is the step's
            return
        store = BlobStore(self._base(context))
        if isinstance(obj, StreamedOutput):

            def write(fh):
                write_parquet_stream(obj.rows, fh)

        else:

            def write(fh):
                write_parquet(obj, fh)

        try:
            with writes_into(store.root, settings.ENV_OUTPUT_DIR):
                if isinstance(obj, ReusedOutput):
                    stored = store.link_from(obj.path, asset, name, obj.sha256)
                    if stored is None:
                        raise dg.Failure(description=f"{obj.path} changed while it was being reused; re-run this seed")
                else:
                    stored = store.put(asset, name, write)
        except BlobStoreError as exc:
            raise dg.Failure(description=str(exc)) from None
        self._streamed_metadata(context, obj, stored.path)
        if not stored.linked and asset in SEED_INDEPENDENT_ASSETS:  # a per-seed output is most often its own
            context.log.warning(f"{stored.path} is a full copy: hard links are not possible in {store.root}")
        context.add_output_metadata(
            {
                "path": dg.MetadataValue.path(stored.path),
                "file_sha256": dg.MetadataValue.text(stored.sha256),
                "file_bytes": dg.MetadataValue.int(stored.size),
                "storage": dg.MetadataValue.text(
                    f"hard link to {OBJECTS_DIR}/{stored.sha256}.parquet" if stored.linked else "copy"
                ),
                STORED_FILES: dg.MetadataValue.json(stored_files([stored.path])),
            }
        )

    @staticmethod
    def _streamed_metadata(context: dg.OutputContext, obj: object, path: str | os.PathLike) -> None:
        """For a streamed output, what `versioned_output` records, from the stored file: its row
        count, fingerprint and data version (set on the step, where Dagster takes it from when the
        output itself carries none)."""
        if not isinstance(obj, StreamedOutput):
            return
        fingerprint = obj.rows.fingerprint or parquet_fingerprint(path)  # from the rows written, when held
        context.add_output_metadata(obj.metadata(ParquetRows(path).num_rows, fingerprint))
        with warnings.catch_warnings():  # data versions are beta in Dagster 1.13 (as in metadata.versioned_output)
            warnings.simplefilter("ignore", dg.BetaWarning)
            context.step_context.set_data_version(context.asset_key, dg.DataVersion(fingerprint))

    def load_input(self, context: dg.InputContext) -> pa.Table | ParquetRows:
        """The whole table, only the columns an input asks for (`AssetIn(metadata={"columns": [...]})`),
        or a lazy reader (`AssetIn(metadata={"stream": True})`)."""
        asked = context.definition_metadata or {}
        return read_stored(
            self._path(context, context.asset_partition_key),
            context.asset_key.to_user_string(),
            context.asset_partition_key,
            asked.get("columns"),
            stream=bool(asked.get("stream")),
        )


def read_stored(
    path: Path, asset: str, seed: str, columns: list[str] | None = None, stream: bool = False
) -> pa.Table | ParquetRows:
    """The stored output at `path` (`columns` of it, or a lazy reader with `stream`), after
    `stored_file`; a file that is no Parquet file or lacks a column asked for is one clear Failure,
    not pyarrow's error from deep inside a step."""
    stored_file(path, asset, seed)
    try:
        names = pq.read_schema(path).names
        missing = [name for name in columns or () if name not in names]
        if missing:
            raise ValueError(f"it has no column {missing[0]!r}")
        return ParquetRows(path) if stream else read_parquet(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = error_line(exc)
        raise dg.Failure(
            description=f"{path} is not a {asset} output the pipeline wrote ({reason}): "
            f"re-materialize {asset} for seed {seed}"
        ) from None


def stored_file(path: Path, asset: str, seed: str) -> Path:
    """`path` when it is a regular file the pipeline could have written; else one clear Failure. A
    symlink (at the file or its asset folder, which the IO manager never creates) is not followed,
    and a FIFO or other special file is refused before any reader could block on it."""
    for where in (path.parent, path):
        try:
            mode = os.lstat(where).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise dg.Failure(description=f"{path} is missing: materialize {asset} for seed {seed} first") from None
        if stat.S_ISLNK(mode):
            raise dg.Failure(
                description=f"{where} is a symlink, not a file the pipeline wrote: remove it and re-materialize"
            )
    if not stat.S_ISREG(mode):
        raise dg.Failure(description=f"{path} is not a regular file (a FIFO?): remove it and re-materialize {asset}")
    return path


class TokenizerResource(dg.ConfigurableResource):
    """Which tokenizer and how: a tokenizer.json path, a directory holding one, a hub id, or "" (bundled)."""

    tokenizer: str = ""
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    add_special_tokens: bool = False

    @classmethod
    def from_env(cls) -> TokenizerResource:
        return cls(tokenizer=settings.tokenizer(), max_seq_len=settings.max_seq_len())

    def load(self) -> LoadedTokenizer:
        try:
            return load_tokenizer(
                self.tokenizer, max_seq_len=self.max_seq_len, add_special_tokens=self.add_special_tokens
            )
        except TokenizerError as exc:
            raise dg.Failure(description=f"{exc} (set DLM_TOKENIZER or --tokenizer)") from None


class TokenCacheResource(dg.ConfigurableResource):
    """The content-addressed token store; "" puts it at $DAGSTER_HOME/token_cache."""

    cache_dir: str = ""
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    max_text_bytes: int = DEFAULT_MAX_FILE_BYTES  # bounds the ids a stored text may have (DLM_MAX_FILE_BYTES)

    @classmethod
    def from_env(cls) -> TokenCacheResource:
        return cls(
            cache_dir=settings.cache_dir(),
            max_bytes=settings.cache_max_bytes(),
            max_text_bytes=settings.max_file_bytes(),
        )

    def store(self, instance: dg.DagsterInstance) -> TokenStore:
        root = self.cache_dir or os.path.join(instance.root_directory, settings.TOKEN_CACHE_DIR)
        try:
            return TokenStore(root, max_bytes=self.max_bytes, max_text_bytes=self.max_text_bytes)
        except TokenStoreError as exc:
            raise dg.Failure(description=str(exc)) from None


class DatasetResource(dg.ConfigurableResource):
    """How training datasets are cut (SPEC §7): the validation share, the split seed and the
    end-of-document token ("" = the tokenizer's own EOS)."""

    val_fraction: float = settings.DEFAULT_VAL_FRACTION
    split_seed: int = 0
    eos_token: str = ""

    @classmethod
    def from_env(cls) -> DatasetResource:
        return cls(
            val_fraction=settings.val_fraction(), split_seed=settings.split_seed(), eos_token=settings.eos_token()
        )

"""Where the misses of the token store are tokenized, and the files the ingest index misses are
read (SPEC §6, `--compute local|ray`).

The plan is the same for any backend: the missing texts are cut into consecutive batches of at
most `batch_bytes` UTF-8 bytes; a task tokenizes one batch and writes it into the shared store as
immutable shards named by their content (`TokenStore.write_unlisted`), so a retried task writes
the same bytes under the same name; the driver only commits the returned entries to the manifest
(`TokenStore.commit`) and reads the shards back, verified. A task receives its own keys and texts,
never the corpus. Ingest is planned the same way by the files' sizes from the walk: a task gets the
source root and relative paths (with their walk stat and whether to scan for credentials), reads
each file exactly as the local run does (`ingest_index.read_entry`: bounded, non-blocking, decode,
normalise, credential scan, content key) and returns one result per file; the driver updates the
ingest index and assembles the rows in path order. `ray` is imported only when the Ray backend runs.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.ingest_index import Entry, read_entry
from dlm_pipeline.core.token_store import STORE_SCHEMA, TokenStore
from dlm_pipeline.core.tokenize import LoadedTokenizer, chunk_bounds
from dlm_pipeline.core.tree import FileEntry, StatKey

BACKENDS = ("local", "ray")
DEFAULT_BATCH_BYTES = 2 * 1024**2
DEFAULT_MAX_RETRIES = 3  # Ray re-runs a task whose worker died this many times
IN_FLIGHT_PER_CPU = 2  # tasks submitted ahead per cluster CPU: bounds what sits in the object store
# One task per CPU, so the tokenizer's own thread pool gets one thread (it would take every core).
ONE_THREAD = {"env_vars": {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}


def byte_batches(sizes: np.ndarray, batch_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges whose sizes sum to at most `batch_bytes` (a larger single
    item gets a range of its own); none for no items."""
    if batch_bytes <= 0:
        raise ValueError(f"batch_bytes must be > 0, got {batch_bytes}")
    return chunk_bounds(sizes, batch_bytes) if len(sizes) else []


def plan_batches(texts: Sequence[str], batch_bytes: int) -> list[tuple[int, int]]:
    """Batches of texts by UTF-8 bytes. Depends only on the texts, so the same misses always make
    the same batches."""
    return byte_batches(pc.binary_length(pa.array(texts, pa.string())).to_numpy(zero_copy_only=False), batch_bytes)


@dataclass(frozen=True)
class BatchResult:
    """What one task reports back: the shards it wrote (name, manifest entry), never its tokens."""

    batch: int
    shards: tuple[tuple[str, dict], ...]
    texts: int
    text_bytes: int
    tokens: int
    seconds: float
    worker: str  # node id prefix / pid
    attempt: int  # 0 on the first try; Ray counts up when it re-runs a task whose worker died
    unit: ClassVar[str] = "tokens"

    @property
    def count(self) -> int:
        return self.tokens


def tokenize_batch(
    store_root: str,
    max_text_bytes: int,
    namespace: str,
    tokenizer: LoadedTokenizer,
    keys: Sequence[str],
    texts: Sequence[str],
    batch: int = 0,
    worker: str = "",
    attempt: int = 0,
) -> BatchResult:
    """The task: tokenize one batch (full ids) and write it as content-named shards of the store, built
    with the driver's `max_text_bytes` (DLM_MAX_FILE_BYTES): the bound on the ids a text may have is the same
    on both sides, so a worker neither drops a text the driver would store nor writes one it refuses."""
    start = time.perf_counter()
    encoded = tokenizer.encode(texts)
    table = pa.table(
        {
            "content_key": pa.array(list(keys), pa.string()),
            "input_ids": encoded["input_ids"],
            "n_tokens": encoded["n_tokens"],
        },
        schema=STORE_SCHEMA,
    )
    shards = TokenStore(store_root, max_text_bytes=max_text_bytes).write_unlisted(namespace, table)
    return BatchResult(
        batch,
        tuple(shards),
        len(texts),
        sum(len(t.encode()) for t in texts),
        int(pc.sum(encoded["n_tokens"]).as_py() or 0),
        time.perf_counter() - start,
        worker or f"pid {os.getpid()}",
        attempt,
    )


@dataclass(frozen=True)
class ReadResult:
    """What one ingest task reports back: per file (relative path), `read_entry`'s result."""

    batch: int
    entries: tuple[tuple[str, Entry | tuple[str, str]], ...]
    text_bytes: int
    seconds: float
    worker: str
    attempt: int
    unit: ClassVar[str] = "files"

    @property
    def count(self) -> int:
        return len(self.entries)


def inside(root: str, path: str) -> str:
    """root/path for a relative POSIX path from the walk; anything that could leave the root is refused."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or "\0" in path or ".." in parts:
        raise ValueError(f"not a relative path inside the source root: {path!r}")
    return os.path.join(root, path)


def read_batch(
    root: str,
    files: Sequence[tuple[str, StatKey | None, bool]],
    max_file_bytes: int,
    secret_entropy: bool,
    batch: int = 0,
    worker: str = "",
    attempt: int = 0,
) -> ReadResult:
    """The ingest task: read (path, walk stat, scan for secrets) files under `root` as the local run does."""
    from dlm_pipeline.core.secrets import secret_scanner  # detect-secrets: only in a task that reads

    start = time.perf_counter()
    scanner = secret_scanner(secret_entropy)
    entries = tuple(
        (path, read_entry(FileEntry(path, inside(root, path), stat), max_file_bytes, scanner if scan else None))
        for path, stat, scan in files
    )
    return ReadResult(
        batch,
        entries,
        sum(len(e.text.encode()) for _, e in entries if isinstance(e, Entry) and e.text is not None),
        time.perf_counter() - start,
        worker or f"pid {os.getpid()}",
        attempt,
    )


def plan_read_batches(files: Sequence[FileEntry], max_file_bytes: int, batch_bytes: int) -> list[tuple[int, int]]:
    """Batches of files by their size at the walk, each capped at what a read may take."""
    sizes = np.fromiter((min(f.stat[0], max_file_bytes) if f.stat else 0 for f in files), np.int64, len(files))
    return byte_batches(sizes, batch_bytes)


@dataclass
class RunStats:
    """Totals of one backend run, for progress and metadata."""

    tasks: int = 0
    retries: int = 0
    text_bytes: int = 0
    produced: Counter = field(default_factory=Counter)  # unit (tokens, files) -> total
    seconds: float = 0.0  # wall time of the whole run, as the driver saw it
    per_worker: dict[str, dict] = field(default_factory=dict)  # worker -> tasks, <unit>, seconds, <unit>_per_second

    @property
    def tokens(self) -> int:
        return self.produced["tokens"]

    def add(self, result: BatchResult | ReadResult) -> None:
        unit = result.unit
        self.retries += result.attempt
        self.text_bytes += result.text_bytes
        self.produced[unit] += result.count
        worker = self.per_worker.setdefault(result.worker, {"tasks": 0, unit: 0, "seconds": 0.0})
        worker["tasks"] += 1
        worker[unit] += result.count
        worker["seconds"] += result.seconds
        worker[f"{unit}_per_second"] = round(worker[unit] / worker["seconds"]) if worker["seconds"] else 0


def _on_worker(function, *args):
    """Runs on a Ray worker: `function(*args)` plus where it ran and which attempt this is."""
    import ray

    context = ray.get_runtime_context()
    core_worker = getattr(ray._private.worker.global_worker, "core_worker", None)  # attempt: no public API yet
    attempt = (
        core_worker.get_current_task_attempt_number() if hasattr(core_worker, "get_current_task_attempt_number") else 0
    )
    return function(*args, worker=f"{context.get_node_id()[:8]}/pid {os.getpid()}", attempt=int(attempt))


def run_tasks(
    function: Callable,
    task_args: Sequence[tuple],
    max_retries: int,
    progress: Callable[[int, int], None] | None,
    stats: RunStats,
) -> list:
    """Run `function(*args)` for each args on the Ray cluster this process is connected to (ray.init
    was called), at most IN_FLIGHT_PER_CPU tasks per cluster CPU at a time, so the object store holds
    a bounded share of the work; results in completion order."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False, runtime_env=ONE_THREAD)(_on_worker)
    stats.tasks += len(task_args)
    limit = max(1, int(ray.cluster_resources().get("CPU", 1)) * IN_FLIGHT_PER_CPU)
    started, running, results = time.perf_counter(), [], []
    while len(results) < len(task_args):
        while len(results) + len(running) < len(task_args) and len(running) < limit:
            running.append(task.remote(function, *task_args[len(results) + len(running)]))
        finished, running = ray.wait(running, num_returns=1)
        results.append(ray.get(finished[0]))
        stats.add(results[-1])
        if progress is not None:
            progress(len(results), len(task_args))
    stats.seconds += time.perf_counter() - started
    return results


def run_on_ray(
    store_root: str,
    max_text_bytes: int,
    namespace: str,
    tokenizer: LoadedTokenizer,
    keys: Sequence[str],
    texts: Sequence[str],
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    max_retries: int = DEFAULT_MAX_RETRIES,
    progress: Callable[[int, int], None] | None = None,
    stats: RunStats | None = None,
) -> tuple[list[tuple[str, dict]], float, int]:
    """Tokenize `texts` on the Ray cluster this process is connected to. Returns what
    `TokenStore.get_or_compute` wants from a remote writer: (shards, summed task seconds, tokens)."""
    import ray

    stats = stats if stats is not None else RunStats()
    tokenizer_ref = ray.put(tokenizer)
    batches = plan_batches(texts, batch_bytes)
    args = [
        (store_root, max_text_bytes, namespace, tokenizer_ref, keys[a:b], texts[a:b], i)
        for i, (a, b) in enumerate(batches)
    ]
    results = run_tasks(tokenize_batch, args, max_retries, progress, stats)
    written = [shard for result in sorted(results, key=lambda r: r.batch) for shard in result.shards]
    return written, sum(w["seconds"] for w in stats.per_worker.values()), stats.tokens


def read_on_ray(
    root: Path,
    files: Sequence[tuple[FileEntry, bool]],
    max_file_bytes: int,
    secret_entropy: bool,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    max_retries: int = DEFAULT_MAX_RETRIES,
    progress: Callable[[int, int], None] | None = None,
    stats: RunStats | None = None,
) -> dict[str, Entry | tuple[str, str]]:
    """Read `files` (with: scan for credentials) under `root` on the Ray cluster this process is
    connected to; {relative path: `read_entry` result}, for `IngestIndex.add_reads`."""
    stats = stats if stats is not None else RunStats()
    batches = plan_read_batches([f for f, _ in files], max_file_bytes, batch_bytes)
    args = [
        (str(root), [(f.path, f.stat, scan) for f, scan in files[a:b]], max_file_bytes, secret_entropy, i)
        for i, (a, b) in enumerate(batches)
    ]
    return {
        path: entry
        for result in run_tasks(read_batch, args, max_retries, progress, stats)
        for path, entry in result.entries
    }

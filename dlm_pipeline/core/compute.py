"""Where the misses of the token store are tokenized (SPEC §6, `--compute local|ray`).

The plan is the same for any backend: the missing texts are cut into consecutive batches of at
most `batch_bytes` UTF-8 bytes; a task tokenizes one batch and writes it into the shared store as
immutable shards named by their content (`TokenStore.write_unlisted`), so a retried task writes
the same bytes under the same name; the driver only commits the returned entries to the manifest
(`TokenStore.commit`) and reads the shards back, verified. A task receives its own keys and texts,
never the corpus. `ray` is imported only when the Ray backend runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.token_store import STORE_SCHEMA, TokenStore
from dlm_pipeline.core.tokenize import LoadedTokenizer, chunk_bounds

BACKENDS = ("local", "ray")
DEFAULT_BATCH_BYTES = 2 * 1024**2
DEFAULT_MAX_RETRIES = 3  # Ray re-runs a task whose worker died this many times
IN_FLIGHT_PER_CPU = 2  # tasks submitted ahead per cluster CPU: bounds what sits in the object store
# One task per CPU, so the tokenizer's own thread pool gets one thread (it would take every core).
ONE_THREAD = {"env_vars": {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}


def plan_batches(texts: Sequence[str], batch_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges whose texts hold at most `batch_bytes` UTF-8 bytes (a larger
    single text gets a batch of its own); none for no texts. Depends only on the texts, so the same
    misses always make the same batches."""
    if batch_bytes <= 0:
        raise ValueError(f"batch_bytes must be > 0, got {batch_bytes}")
    if not texts:
        return []
    return chunk_bounds(pc.binary_length(pa.array(texts, pa.string())).to_numpy(zero_copy_only=False), batch_bytes)


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


def tokenize_batch(
    store_root: str,
    namespace: str,
    tokenizer: LoadedTokenizer,
    keys: Sequence[str],
    texts: Sequence[str],
    batch: int = 0,
    worker: str = "",
    attempt: int = 0,
) -> BatchResult:
    """The task: tokenize one batch (full ids) and write it as content-named shards of the store."""
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
    shards = TokenStore(store_root).write_unlisted(namespace, table)
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


@dataclass
class RunStats:
    """Totals of one backend run, for progress and metadata."""

    tasks: int = 0
    retries: int = 0
    text_bytes: int = 0
    tokens: int = 0
    seconds: float = 0.0  # wall time of the whole run, as the driver saw it
    per_worker: dict[str, dict] = field(default_factory=dict)  # worker -> tasks, tokens, seconds, tokens_per_second

    def add(self, result: BatchResult) -> None:
        self.retries += result.attempt
        self.text_bytes += result.text_bytes
        self.tokens += result.tokens
        worker = self.per_worker.setdefault(result.worker, {"tasks": 0, "tokens": 0, "seconds": 0.0})
        worker["tasks"] += 1
        worker["tokens"] += result.tokens
        worker["seconds"] += result.seconds
        worker["tokens_per_second"] = round(worker["tokens"] / worker["seconds"]) if worker["seconds"] else 0


def _ray_task(store_root, namespace, tokenizer, keys, texts, batch):
    """Runs on a Ray worker: the batch plus where it ran and which attempt this is."""
    import ray

    context = ray.get_runtime_context()
    core_worker = getattr(ray._private.worker.global_worker, "core_worker", None)  # attempt: no public API yet
    attempt = (
        core_worker.get_current_task_attempt_number() if hasattr(core_worker, "get_current_task_attempt_number") else 0
    )
    worker = f"{context.get_node_id()[:8]}/pid {os.getpid()}"
    return tokenize_batch(store_root, namespace, tokenizer, keys, texts, batch, worker, int(attempt))


def run_on_ray(
    store_root: str,
    namespace: str,
    tokenizer: LoadedTokenizer,
    keys: Sequence[str],
    texts: Sequence[str],
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    max_retries: int = DEFAULT_MAX_RETRIES,
    progress: Callable[[int, int], None] | None = None,
    stats: RunStats | None = None,
) -> tuple[list[tuple[str, dict]], float, int]:
    """Tokenize `texts` on the Ray cluster this process is connected to (ray.init was called).
    At most IN_FLIGHT_PER_CPU tasks per cluster CPU are submitted at a time, so the object store
    holds a bounded share of the texts. Returns what `TokenStore.get_or_compute` wants from a
    remote writer: (shards, summed task seconds, tokens)."""
    import ray

    stats = stats if stats is not None else RunStats()
    task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False, runtime_env=ONE_THREAD)(_ray_task)
    batches = plan_batches(texts, batch_bytes)
    stats.tasks += len(batches)
    tokenizer_ref = ray.put(tokenizer)
    limit = max(1, int(ray.cluster_resources().get("CPU", 1)) * IN_FLIGHT_PER_CPU)
    started, running, written = time.perf_counter(), [], []
    next_batch = done = 0
    while done < len(batches):
        while next_batch < len(batches) and len(running) < limit:
            start, end = batches[next_batch]
            running.append(
                task.remote(store_root, namespace, tokenizer_ref, keys[start:end], texts[start:end], next_batch)
            )
            next_batch += 1
        finished, running = ray.wait(running, num_returns=1)
        result: BatchResult = ray.get(finished[0])
        written.extend(result.shards)
        stats.add(result)
        done += 1
        if progress is not None:
            progress(done, len(batches))
    stats.seconds += time.perf_counter() - started
    return written, sum(w["seconds"] for w in stats.per_worker.values()), stats.tokens

"""The compute resource (SPEC §6, `--compute local|ray`): where tokenized_cache tokenizes its misses
and raw_corpus reads the files the ingest index misses.

`local` (default) does both in the run's own process. `ray` runs the batches of
`dlm_pipeline.core.compute` on a Ray cluster through `dagster-ray` (the optional `[ray]` extra):
`LocalRay` on this machine when no address is set, otherwise the cluster at `ray_address`
(`ray://head:10001`, or `head:6379` from inside the cluster's network, e.g. a KubeRay head service).
Dagster stays the control plane: partitions, checks, lineage and metadata do not change, and the
outputs are byte-identical. The cluster is reached only when there are misses; an unreachable
address fails the step at once. On a cluster of several machines the source root, like the token
store, must be at the same path on every node (README, "Beyond one machine").
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg

from dlm_pipeline import settings
from dlm_pipeline.core.compute import (
    BACKENDS,
    DEFAULT_BATCH_BYTES,
    DEFAULT_MAX_RETRIES,
    RunStats,
    read_on_ray,
    run_on_ray,
)
from dlm_pipeline.core.corpus import ReadBatch
from dlm_pipeline.core.token_store import RemoteWriter, TokenStore
from dlm_pipeline.core.tokenize import LoadedTokenizer
from dlm_pipeline.core.tree import FileEntry
from dlm_pipeline.defs.metadata import ProgressLog

CONNECT_TIMEOUT_SECONDS = 5.0
RAY_CLIENT_PORT, RAY_GCS_PORT = 10001, 6379


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname:
        raise dg.Failure(
            description=f"Ray address {address!r} names no host; use ray://HOST:PORT or HOST:PORT (DLM_RAY_ADDRESS)"
        )
    return parts.hostname, port or (RAY_CLIENT_PORT if parts.scheme == "ray" else RAY_GCS_PORT)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Fail within `timeout` seconds, naming the address, when nothing listens there (ray.init
    itself keeps retrying for minutes)."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise dg.Failure(
            description=f"the Ray cluster at {address} cannot be reached ({exc.strerror or type(exc).__name__}); "
            "start it, fix DLM_RAY_ADDRESS / --ray-address, or use --compute local"
        ) from None


def _ray_resource(address: str, num_cpus: int):
    """dagster-ray's resource for the cluster: LocalRay, or one named by its address."""
    try:
        from dagster_ray import LocalRay, RayResource
    except ImportError:
        raise dg.Failure(
            description="--compute ray needs the optional Ray packages: pip install 'dlm-pipeline[ray]'"
        ) from None
    if not address:
        return LocalRay(ray_init_options={"num_cpus": num_cpus} if num_cpus else {})

    class RayAtAddress(RayResource):
        """An existing cluster, reached at the address as given (Ray client or GCS)."""

        @property
        def host(self) -> str:
            return _host_port(address)[0]

        @property
        def name(self) -> str:
            return f"Ray cluster at {address}"

        @property
        def ray_address(self) -> str:  # type: ignore[override]
            return address

        @property
        def created(self) -> bool:
            return True

        @property
        def ready(self) -> bool:
            return True

    return RayAtAddress()


class ComputeResource(dg.ConfigurableResource):
    """Where files the ingest index misses are read and texts the store misses tokenized: `local` or `ray`."""

    backend: str = "local"
    ray_address: str = ""  # "" = LocalRay: start (or join, with RAY_ADDRESS set) a cluster on this machine
    ray_num_cpus: int = 0  # LocalRay only; 0 = every core
    batch_bytes: int = DEFAULT_BATCH_BYTES
    max_retries: int = DEFAULT_MAX_RETRIES

    @classmethod
    def from_env(cls) -> ComputeResource:
        return cls(
            backend=settings.compute(), ray_address=settings.ray_address(), batch_bytes=settings.ray_batch_bytes()
        )

    @contextmanager
    def _cluster(self, context: dg.AssetExecutionContext) -> Iterator[Callable[[], str] | None]:
        """None for `local`; for `ray`, a function that connects on its first call (returning the
        cluster's name); the connection ends with the block."""
        if self.backend not in BACKENDS:
            raise dg.Failure(
                description=f"compute backend must be one of {', '.join(BACKENDS)}, got {self.backend!r} "
                "(DLM_COMPUTE / --compute)"
            )
        if self.backend == "local":
            yield None
            return
        if self.ray_address:
            check_reachable(self.ray_address)
        cluster = _ray_resource(self.ray_address, self.ray_num_cpus)
        with ExitStack() as stack:

            def connect() -> str:
                if not cluster.connected:
                    cluster._connect(context)  # dagster-ray's create / wait / connect, with its logging
                    stack.callback(cluster.cleanup, context, None)
                return cluster.name

            yield connect

    @contextmanager
    def writer(
        self, context: dg.AssetExecutionContext, store: TokenStore, tokenizer: LoadedTokenizer, stats: RunStats
    ) -> Iterator[RemoteWriter | None]:
        """None for `local`; for `ray`, a writer for `TokenStore.get_or_compute`."""
        with self._cluster(context) as connect:
            if connect is None:
                yield None
                return

            def write(namespace: str, keys: Sequence[str], texts: Sequence[str]):
                name = connect()
                context.log.info(
                    f"tokenizing {len(texts):,} texts on {name} in batches of <= {self.batch_bytes:,} bytes"
                )
                return run_on_ray(
                    str(store.root),
                    store.max_text_bytes,
                    namespace,
                    tokenizer,
                    keys,
                    texts,
                    self.batch_bytes,
                    self.max_retries,
                    ProgressLog(context, "tokenization tasks"),
                    stats,
                )

            yield write

    @contextmanager
    def reader(
        self, context: dg.AssetExecutionContext, max_file_bytes: int, secret_entropy: bool, stats: RunStats
    ) -> Iterator[ReadBatch | None]:
        """None for `local`; for `ray`, a `read_batch` for `build_raw_corpus` (no files: no cluster)."""
        with self._cluster(context) as connect:
            if connect is None:
                yield None
                return

            def read(root: Path, files: list[tuple[FileEntry, bool]]):
                if not files:
                    return {}
                name = connect()
                context.log.info(f"reading {len(files):,} files on {name} in batches of <= {self.batch_bytes:,} bytes")
                return read_on_ray(
                    root,
                    files,
                    max_file_bytes,
                    secret_entropy,
                    self.batch_bytes,
                    self.max_retries,
                    ProgressLog(context, "ingest read tasks"),
                    stats,
                )

            yield read

    @staticmethod
    def metadata(stats: RunStats) -> dict:
        """Asset metadata of a Ray run: tasks, retries, bytes and tokens/s (or files/s) per worker."""
        return {
            "compute_tasks": dg.MetadataValue.int(stats.tasks),
            "compute_retries": dg.MetadataValue.int(stats.retries),
            "compute_bytes": dg.MetadataValue.int(stats.text_bytes),
            "compute_seconds": dg.MetadataValue.float(stats.seconds),
            "compute_workers": dg.MetadataValue.json(stats.per_worker),
        }

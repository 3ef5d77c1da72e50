"""Shared fixtures: real trees on disk, the reference algorithm, a temporary Dagster instance."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from dlm_pipeline.definitions import CORPUS_JOB, build_defs
from dlm_pipeline.defs.compute import ComputeResource
from dlm_pipeline.defs.partitions import SEEDS_PARTITION
from dlm_pipeline.defs.resources import (
    DatasetResource,
    ParquetIOManager,
    SourceTree,
    TokenCacheResource,
    TokenizerResource,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "corpus"
REFERENCE = Path(os.environ.get("DLM_REFERENCE_PATH", REPO.parent / "shared" / "seed" / "weighted_rows.py"))


@pytest.fixture(scope="session")
def reference():
    """The reference algorithm (`../shared/seed/weighted_rows.py`), imported from where it lies."""
    if not REFERENCE.exists():
        pytest.skip(f"reference algorithm not found at {REFERENCE} (set DLM_REFERENCE_PATH)")
    spec = importlib.util.spec_from_file_location("weighted_rows_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Create files under root; str is written as UTF-8, bytes as-is."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def tree(tmp_path):
    """A factory: tree({relpath: content}) -> root directory."""
    root = tmp_path / "tree"

    def make(files: dict[str, str | bytes]) -> Path:
        return write_tree(root, files)

    return make


class Pipeline:
    """The real definitions bound to one source root and output folder, run on one instance."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        root: Path,
        out: Path,
        scope: str = "nearest",
        tokenizer: str = "",
        max_seq_len: int = 2048,
        dataset: DatasetResource | None = None,
        compute: ComputeResource | None = None,
        **limits,
    ):
        self.instance, self.root, self.out = instance, root, out
        self.cache = out.parent / "token_cache"
        self.defs = build_defs(
            {
                "source": SourceTree(root=str(root), weights_scope=scope, **limits),
                "io_manager": ParquetIOManager(output_dir=str(out)),
                "tokenizer": TokenizerResource(tokenizer=tokenizer, max_seq_len=max_seq_len),
                "token_cache": TokenCacheResource(cache_dir=str(self.cache)),
                "compute": compute or ComputeResource(),
                "dataset": dataset or DatasetResource(),
            }
        )

    def run(self, seed: str, raise_on_error: bool = True):
        if seed not in self.instance.get_dynamic_partitions(SEEDS_PARTITION):
            self.instance.add_dynamic_partitions(SEEDS_PARTITION, [seed])
        job = self.defs.resolve_job_def(CORPUS_JOB)
        return job.execute_in_process(instance=self.instance, partition_key=seed, raise_on_error=raise_on_error)

    def run_checks(self, seed: str, *names: str):
        """Only the named asset checks, against what is stored for `seed` (nothing re-materialized)."""
        job = self.defs.resolve_job_def(CORPUS_JOB)
        keys = {k for k in self.defs.resolve_asset_graph().asset_check_keys if k.name in names}
        subset = job.get_subset(asset_selection=set(), asset_check_selection=keys)
        return subset.execute_in_process(instance=self.instance, partition_key=seed, raise_on_error=False)

    def output(self, asset: str, seed: str) -> Path:
        return self.out / asset / f"{seed}.parquet"

    def metadata(self, asset: str, seed: str) -> dict:
        event = self.instance.get_latest_materialization_event(dg.AssetKey(asset))
        records = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[seed]), limit=1
        ).records
        assert records, f"no materialization of {asset} for seed {seed}"
        assert event is not None
        return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


@pytest.fixture
def pipeline(instance, tmp_path):
    """A factory: pipeline(root, scope=...) -> Pipeline writing under tmp_path/out."""

    def make(root: Path, scope: str = "nearest", **options) -> Pipeline:
        return Pipeline(instance, root, tmp_path / "out", scope, **options)

    return make


def small_tokenizer(path: Path, corpus: list[str], vocab_size: int, eos: bool = True) -> Path:
    """Train a tiny real BPE tokenizer on `corpus` (with an end-of-text token, as real ones have,
    unless `eos` is False) and save it as tokenizer.json at `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "<|endoftext|>"] if eos else ["[UNK]"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def check_evaluations(result) -> dict:
    """{check name: evaluation} of every asset check a run evaluated."""
    return {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def without_permission_override() -> list[str]:
    """A command prefix that runs a child without the capabilities that bypass file permissions, so
    unreadable files stay unreadable when the tests run as root (CI does); [] for other users."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot drop the permission-bypass capabilities")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def command() -> list[str]:
    """The console script next to this interpreter (what users run), else the module."""
    script = Path(sys.executable).parent / "dlm-pipeline"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dlm_pipeline.cli"]


def dlm(args: list[str], home: Path | None, prefix: tuple[str, ...] = (), **env) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: no DLM_ setting but `env`, DAGSTER_HOME at `home` (None: unset)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "KUBERNETES_", "DAGSTER_HOME"))}
    clean.update(env if home is None else {"DAGSTER_HOME": str(home), **env})
    return subprocess.run(
        [*prefix, *command(), *args], env=clean, capture_output=True, text=True, cwd=REPO, timeout=600
    )


def one_line_error(done: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("dlm-pipeline")]
    assert len(lines) == 1, done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]

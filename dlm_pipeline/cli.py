"""`dlm-pipeline`: materialize seeds into the Dagster instance at $DAGSTER_HOME, manage seeds, validate configs.

Runs go through the same job and instance the UI uses, so everything done here shows up there.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dlm_pipeline import settings
from dlm_pipeline.core.anchors import STATUS_ERROR, load_configs
from dlm_pipeline.core.tree import SourceTreeError, scan_tree
from dlm_pipeline.core.weights import SCOPES

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _ensure_dagster_home() -> Path:
    """$DAGSTER_HOME (created if missing), or the checkout's dagster_home/ when it is unset."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        bundled = settings.PROJECT_DIR / "dagster_home"
        if not bundled.is_dir():
            raise CliError("DAGSTER_HOME is not set; point it at a folder holding dagster.yaml")
        print(f"DAGSTER_HOME not set: using {bundled}", file=sys.stderr)
        home = str(bundled)
    path = Path(home).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def _seeds(values: list[str]) -> list[str]:
    from dlm_pipeline.defs.partitions import parse_seed

    seeds = []
    for value in values:
        try:
            parse_seed(value)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if value not in seeds:
            seeds.append(value)
    return seeds


def _apply_source_flags(args: argparse.Namespace) -> None:
    """Flags win over the environment: they are handed to the definitions as DLM_* variables."""
    if getattr(args, "source", None):
        os.environ[settings.ENV_SOURCE_ROOT] = str(Path(args.source).expanduser().resolve())
    if getattr(args, "weights_scope", None):
        os.environ[settings.ENV_WEIGHTS_SCOPE] = args.weights_scope
    if getattr(args, "tokenizer", None):
        local = Path(args.tokenizer).expanduser()
        os.environ[settings.ENV_TOKENIZER] = str(local.resolve()) if local.exists() else args.tokenizer
    if getattr(args, "max_seq_len", None) is not None:
        os.environ[settings.ENV_MAX_SEQ_LEN] = str(args.max_seq_len)
    if getattr(args, "compute", None):
        os.environ[settings.ENV_COMPUTE] = args.compute
    if getattr(args, "ray_address", None):
        os.environ[settings.ENV_RAY_ADDRESS] = args.ray_address


def _instance():
    import dagster as dg

    _ensure_dagster_home()
    return dg.DagsterInstance.get()


def _registered(instance) -> list[str]:
    from dlm_pipeline.defs.partitions import registered_seeds

    valid, invalid = registered_seeds(instance)
    for key in invalid:
        print(f"ignoring registered partition {key!r}: not a canonical seed (delete it in the UI)", file=sys.stderr)
    return valid


def _register(instance, seeds: list[str]) -> None:
    from dlm_pipeline.defs.partitions import SEEDS_PARTITION

    known = set(instance.get_dynamic_partitions(SEEDS_PARTITION))
    missing = [s for s in seeds if s not in known]
    if missing:
        instance.add_dynamic_partitions(SEEDS_PARTITION, missing)


def _failure_reasons(result) -> list[str]:
    reasons = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            data = event.step_failure_data
            text = (data.user_failure_data.description if data.user_failure_data else None) or (
                data.error.message.strip() if data.error else "failed"
            )
            reasons.append(f"{event.step_key}: {text}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed:
                errors = evaluation.metadata.get("errors")
                detail = errors.value.strip("`").strip() if errors is not None else evaluation.description
                reasons.append(f"check {evaluation.check_name} failed" + (f"\n{detail}" if detail else ""))
    return reasons


_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
_worker: dict = {}


def _worker_start() -> None:
    """Per process: one instance and one job, reused for every seed this process runs."""
    import dagster as dg

    from dlm_pipeline.definitions import resolved_corpus_job

    _worker["instance"] = dg.DagsterInstance.get()
    _worker["job"] = resolved_corpus_job()


def _run(seed: str):
    """One run of the whole graph. The in-process executor (default) runs it right here; any
    other executor (DLM_DEPLOYMENT) needs the job rebuilt elsewhere, so it goes through execute_job."""
    import dagster as dg

    from dlm_pipeline.definitions import resolved_corpus_job

    job = _worker["job"]
    if job.executor_def.name == "in_process":
        return job.execute_in_process(instance=_worker["instance"], partition_key=seed, raise_on_error=False, run_config=_QUIET)
    with dg.execute_job(
        dg.reconstructable(resolved_corpus_job),
        instance=_worker["instance"],
        tags={"dagster/partition": seed},
        run_config=_QUIET,
        raise_on_error=False,
    ) as result:
        return result


def _materialize_seed(seed: str) -> tuple[str, bool, str, list[str]]:
    """(seed, success, run id, lines to print) for one run of the whole graph."""
    result = _run(seed)
    if not result.success:
        return seed, False, result.run_id, _failure_reasons(result) or ["see the run in the UI"]
    lines = []
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        path = materialization.metadata.get("path")
        rows = materialization.metadata.get("dagster/row_count")
        lines.append(
            f"{materialization.asset_key.to_user_string():<18} {rows.value if rows else '?':>8} rows  {path.value if path else ''}"
        )
    return seed, True, result.run_id, lines


def cmd_materialize(args: argparse.Namespace) -> int:
    _apply_source_flags(args)
    seeds = _seeds(args.seed or [])
    from dlm_pipeline.definitions import build_defs

    try:
        build_defs()  # settings errors surface here, before any run
    except settings.SettingsError as exc:
        raise CliError(str(exc)) from None
    with _instance() as instance:
        seeds = seeds or _registered(instance) or ["0"]
        _register(instance, seeds)
    workers = min(max(args.parallel, 1), len(seeds))
    if workers > 1:
        # Forked workers start with everything imported: no start-up cost per seed. (Not a
        # multiprocessing.Pool: its daemonic workers could not start an executor's step processes.)
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start) as pool:
            results = list(pool.map(_materialize_seed, seeds))
    else:
        _worker_start()
        results = [_materialize_seed(seed) for seed in seeds]
    failed = 0
    for seed, success, run_id, lines in results:
        if success:
            print(f"seed {seed}: ok (run {run_id})")
            for line in lines:
                print(f"  {line}")
        else:
            failed += 1
            print(f"seed {seed}: FAILED (run {run_id})", file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_seeds(args: argparse.Namespace) -> int:
    instance = _instance()
    if args.action == "add":
        seeds = _seeds(args.seeds)
        _register(instance, seeds)
        print(f"registered: {' '.join(seeds)}")
    else:
        for seed in _registered(instance):
            print(seed)
    return EXIT_OK


def _token_store():
    from dlm_pipeline.core.token_store import TokenStore

    try:
        root = settings.cache_dir() or str(_ensure_dagster_home() / "token_cache")
        return TokenStore(root, max_bytes=settings.cache_max_bytes())
    except settings.SettingsError as exc:
        raise CliError(str(exc)) from None


def cmd_cache(args: argparse.Namespace) -> int:
    store = _token_store()
    if args.action == "stats":
        stats = store.stats()
        print(f"{stats['root']}: {stats['rows']:,} entries in {stats['shards']} shard(s), "
              f"{stats['bytes']:,} bytes (cap {stats['max_bytes']:,})")
        for namespace, ns in sorted(stats["namespaces"].items()):
            print(f"  {namespace}: {ns['rows']:,} entries, {ns['shards']} shard(s), {ns['bytes']:,} bytes")
    elif args.action == "prune":
        report = store.repair()
        merged = store.compact(at_shards=1)
        removed = store.evict(max_bytes=args.max_bytes)
        print(
            f"repaired {report}; merged {merged} small shard(s) away; evicted {len(removed)} shard(s); "
            f"now {store.stats()['bytes']:,} bytes"
        )
    else:
        store.clear()
        print(f"cleared {store.root}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    _apply_source_flags(args)
    try:
        scan = scan_tree(settings.source_root())
        records = load_configs(scan, max_weight=settings.max_weight())
    except (SourceTreeError, settings.SettingsError) as exc:
        raise CliError(str(exc)) from None
    errors = [r for r in records if r.status == STATUS_ERROR]
    for record in errors:
        print(record.error, file=sys.stderr)
    print(f"{len(records) - len(errors)} config file(s) valid, {len(errors)} invalid under {scan.root}")
    return EXIT_FAILED if errors else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    materialize = sub.add_parser("materialize", help="materialize the whole graph for each seed")
    materialize.add_argument("--source", help="source root (default: $DLM_SOURCE_ROOT or the bundled example)")
    materialize.add_argument(
        "--seed", action="extend", nargs="+", metavar="N",
        help="seeds to materialize: --seed 1 2 or --seed 1 --seed 2 (default: every registered seed, or 0)",
    )
    materialize.add_argument("--weights-scope", choices=SCOPES, help="nearest (default) or global")
    materialize.add_argument("--tokenizer", help="tokenizer.json path, directory holding one, or hub id (default: bundled)")
    materialize.add_argument("--max-seq-len", type=int, help="truncate token sequences to this length (default 2048)")
    materialize.add_argument("--parallel", type=int, default=1, help="seeds run at once, each in a forked worker (default 1)")
    materialize.add_argument("--compute", choices=("local", "ray"), help="where misses are tokenized (default: $DLM_COMPUTE or local)")
    materialize.add_argument("--ray-address", help="Ray cluster for --compute ray (default: $DLM_RAY_ADDRESS, or LocalRay)")
    materialize.set_defaults(func=cmd_materialize)

    seeds = sub.add_parser("seeds", help="register or list seed partitions")
    seeds_sub = seeds.add_subparsers(dest="action", required=True)
    add = seeds_sub.add_parser("add", help="register seeds")
    add.add_argument("seeds", nargs="+")
    seeds_sub.add_parser("list", help="list registered seeds")
    seeds.set_defaults(func=cmd_seeds)

    cache = sub.add_parser("cache", help="inspect or shrink the token cache ($DLM_CACHE_DIR or $DAGSTER_HOME/token_cache)")
    cache_sub = cache.add_subparsers(dest="action", required=True)
    cache_sub.add_parser("stats", help="entries, shards and bytes per tokenizer namespace")
    prune = cache_sub.add_parser("prune", help="repair, merge small shards, then evict least-recently-used shards down to the cap")
    prune.add_argument("--max-bytes", type=int, help="cap to prune to (default: DLM_CACHE_MAX_BYTES, 10 GiB)")
    cache_sub.add_parser("clear", help="delete every cached entry")
    cache.set_defaults(func=cmd_cache)

    validate = sub.add_parser("validate", help="check every config under the source root; exit 1 on any error")
    validate.add_argument("--source", help="source root (default: $DLM_SOURCE_ROOT or the bundled example)")
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"dlm-pipeline: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())

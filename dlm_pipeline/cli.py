"""`dlm-pipeline`: materialize seeds into the Dagster instance at $DAGSTER_HOME, manage seeds, validate configs.

Runs go through the same job and instance the UI uses, so everything done here shows up there.
Dagster, Arrow and the tokenizers are imported by the commands that need them, not here: `--help`,
`seeds` and `validate` start without them (tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from dlm_pipeline import settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
INSTANCE_LOCK = ".dlm-instance.lock"


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # raised in a forked worker, it reaches the parent whole
        return CliError, (str(self), self.code)


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
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"DAGSTER_HOME {path} cannot be created: {exc.strerror}", EXIT_FAILED) from None
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


# Flags handed to the definitions as DLM_* variables: (argparse dest, variable).
_FLAG_VARIABLES = [
    ("weights_scope", settings.ENV_WEIGHTS_SCOPE),
    ("max_seq_len", settings.ENV_MAX_SEQ_LEN),
    ("val_fraction", settings.ENV_VAL_FRACTION),
    ("split_seed", settings.ENV_SPLIT_SEED),
    ("expansion_mode", settings.ENV_EXPANSION_MODE),
    ("eos_token", settings.ENV_EOS_TOKEN),
    ("compute", settings.ENV_COMPUTE),
    ("ray_address", settings.ENV_RAY_ADDRESS),
    ("full_rescan", settings.ENV_FULL_RESCAN),
]


def _apply_source_flags(args: argparse.Namespace) -> None:
    """Flags win over the environment: they are handed to the definitions as DLM_* variables. The
    source root is checked here, first: a missing one is refused before a seed is registered or a run made."""
    from dlm_pipeline.core.tree import SourceTreeError, resolve_root

    if getattr(args, "source", None):
        os.environ[settings.ENV_SOURCE_ROOT] = str(Path(args.source).expanduser().resolve())
    try:
        resolve_root(settings.source_root())
    except SourceTreeError as exc:
        raise CliError(str(exc)) from None
    if getattr(args, "tokenizer", None):
        local = Path(args.tokenizer).expanduser()
        os.environ[settings.ENV_TOKENIZER] = str(local.resolve()) if local.exists() else args.tokenizer
    for dest, variable in _FLAG_VARIABLES:
        if getattr(args, dest, None) is not None:
            os.environ[variable] = str(getattr(args, dest))


def _flag(check, parse=str, expected: str = ""):
    """An argparse type: `parse` then `check` (a settings.py checker), their error as argparse's message."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _at_least(minimum: int):
    def check(value: int) -> int:
        if value < minimum:
            raise ValueError(f"must be a whole number >= {minimum}, got {value}")
        return value

    return check


def _describe(exc: BaseException) -> str:
    """What went wrong, without the wrapper: a database error's driver message, an OS error's text."""
    return str(getattr(exc, "orig", None) or exc)


def _instance():
    """The Dagster instance at $DAGSTER_HOME. The first opening creates its tables, and two processes
    doing that at once collide (`table run_tags already exists`): opening holds an exclusive lock on
    a file in DAGSTER_HOME."""
    import dagster as dg
    import sqlalchemy.exc

    home = _ensure_dagster_home()
    try:
        with open(home / INSTANCE_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return dg.DagsterInstance.get()
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise _instance_error("open", exc) from None


def _instance_error(doing: str, exc: BaseException) -> CliError:
    """The instance's storage failed (read-only, full, gone): one line, whichever step hit it."""
    return CliError(
        f"cannot {doing} the Dagster instance in DAGSTER_HOME {os.environ['DAGSTER_HOME']}: {_describe(exc)} "
        "(make it writable, free space, or point DAGSTER_HOME elsewhere)",
        EXIT_FAILED,
    )


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


def _error_text(error) -> str:
    """A serialized error and every error behind it: Dagster's own wrappers ("Error occurred while
    handling output ...") do not say why, the innermost cause does."""
    messages = []
    while error is not None:
        messages.append(error.message.strip())
        error = error.cause or error.context
    return "\n    caused by: ".join(messages)


INTERRUPTED = "interrupted (Ctrl-C or SIGTERM): the outputs written so far are whole; materialize again to finish"


def _error_reason(error) -> str:
    """A failure's error as its reason: an interruption (Dagster's own error, no message) says what it means."""
    return INTERRUPTED if error.cls_name == "DagsterExecutionInterruptedError" else _error_text(error)


def _failure_reasons(result) -> list[str]:
    """Failed steps and failed checks: either makes the seed fail. A run that failed with neither
    (its executor, say) says why through its RUN_FAILURE error."""
    import dagster as dg

    reasons, run_errors = [], []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            data = event.step_failure_data
            text = (data.user_failure_data.description if data.user_failure_data else None) or (
                _error_reason(data.error) if data.error else "failed"
            )
            reasons.append(f"{event.step_key}: {text}")
        elif event.event_type_value == "RESOURCE_INIT_FAILURE" and event.event_specific_data.error is not None:
            # Before any step (e.g. the seed's lock could not be taken): no step failed to say why.
            error = event.event_specific_data.error
            name, _, text = error.message.strip().partition(": ")
            reasons.append(f"resources: {text if name.endswith(error.cls_name) and text else error.message.strip()}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed:
                errors = evaluation.metadata.get("errors")
                detail = errors.value.strip("`").strip() if errors is not None else ""
                reasons.append(
                    f"check {evaluation.check_name} failed: {evaluation.description or 'no description'}"
                    + (f"\n{detail}" if detail else "")
                )
        elif event.event_type_value == dg.DagsterEventType.RUN_FAILURE.value:  # "PIPELINE_FAILURE", its old name
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:  # e.g. interrupted while waiting for the seed's lock
                run_errors.append(f"run: {_error_reason(error)}")
    return reasons or run_errors


_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _console_without_errors():
    """Dagster's console logger minus its ERROR records: a failed step or resource is logged with
    Dagster's stack trace (some 80 lines for one unusable folder), while the summary printed after the
    run already names each failure in one line. Warnings (a seed's lock waited for, an output left a
    copy) still show as they happen; the errors stay in the run's event log (UI)."""
    import logging

    import dagster as dg

    @dg.logger(dg.colored_console_logger.config_schema, description="console logger without ERROR records")
    def console(init_context):
        logger = dg.colored_console_logger.logger_fn(init_context)
        logger.addFilter(lambda record: record.levelno < logging.ERROR)
        return logger

    return console


# Per process: one instance and one job (built once, before any fork), reused for every seed it runs.
_worker: dict = {}


def _worker_start() -> None:
    """A forked worker opens its own instance: database connections do not survive a fork."""
    _worker["instance"] = _instance()


def _run(seed: str):
    """One run of the whole graph. The in-process executor (default) runs it right here; any
    other executor (DLM_DEPLOYMENT) needs the job rebuilt elsewhere, so it goes through execute_job."""
    import dagster as dg

    from dlm_pipeline.definitions import resolved_corpus_job
    from dlm_pipeline.defs.constants import PARTITION_TAG

    job = _worker["job"]
    if job.executor_def.name == "in_process":
        return job.execute_in_process(
            instance=_worker["instance"], partition_key=seed, raise_on_error=False, run_config=_QUIET
        )
    with dg.execute_job(
        dg.reconstructable(resolved_corpus_job),
        instance=_worker["instance"],
        tags={PARTITION_TAG: seed},
        run_config=_QUIET,
        raise_on_error=False,
    ) as result:
        return result


def _materialize_seed(seed: str) -> tuple[str, bool, str, list[str]]:
    """(seed, success, run id, lines to print) for one run of the whole graph."""
    import sqlalchemy.exc

    try:
        result = _run(seed)
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as exc:  # the event log could not be written
        raise _instance_error(f"record seed {seed}'s run in", exc) from None
    reasons = _failure_reasons(result)
    if not result.success or reasons:
        return seed, False, result.run_id, reasons or ["see the run in the UI"]
    lines = []
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        path = materialization.metadata.get("path")
        rows = materialization.metadata.get("dagster/row_count")
        name = materialization.asset_key.to_user_string()
        lines.append(f"{name:<18} {rows.value if rows else '?':>8} rows  {path.value if path else ''}")
    return seed, True, result.run_id, lines


@contextmanager
def _progress_bars():
    """On a terminal, the progress of runs executed in this process as bars on stderr (one per
    seed and step: files read, texts tokenized, ...); elsewhere nothing changes. Yields a one-item
    list: the seed whose run is under way, set by the caller."""
    from rich.console import Console

    current_seed = [""]
    console = Console(stderr=True)
    if not console.is_terminal or console.is_dumb_terminal:
        yield current_seed
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from dlm_pipeline.defs.metadata import progress_display

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    tasks: dict[tuple[str, str], int] = {}
    with Progress(*columns, console=console) as bars:

        def show(what: str, done: int, total: int) -> None:
            key = (current_seed[0], what)
            if key not in tasks:
                tasks[key] = bars.add_task(f"seed {key[0]}: {what}", total=total)
            bars.update(tasks[key], completed=done, total=total)

        with progress_display(show):
            yield current_seed


@contextmanager
def _loading():
    """Start-up of `materialize` and `status`: imports, definitions and the instance make some 200,000
    objects that live as long as the process. The cyclic garbage collector would walk them at each
    full collection (0.3-0.5 s before the first step) and again at exit (~1 s): it is off while they
    are made, then they are frozen out of its sight (gc.freeze), and it runs on what comes after."""
    if gc.get_freeze_count():  # main() called again in one process (tests): what the last call froze
        gc.unfreeze()  # may be garbage by now
        gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def cmd_materialize(args: argparse.Namespace) -> int:
    _apply_source_flags(args)
    with _loading():
        seeds, instance = _materialize_setup(args)
    workers = min(max(args.parallel, 1), len(seeds))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        instance.dispose()  # each worker opens its own
        # Forked workers start with everything imported and the job built: no start-up cost per
        # seed. (Not a multiprocessing.Pool: its daemonic workers could not start an executor's
        # step processes.)
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start) as pool:
            results = list(pool.map(_materialize_seed, seeds))
    else:
        _worker["instance"] = instance  # the one opened above: opening it twice cost ~1 s
        results = []
        with _progress_bars() as current_seed:
            for seed in seeds:
                current_seed[0] = seed
                results.append(_materialize_seed(seed))
    failed = 0
    interrupted = any(INTERRUPTED in line for _, _, _, lines in results for line in lines)
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
    return EXIT_INTERRUPTED if interrupted else EXIT_FAILED if failed else EXIT_OK


def _materialize_setup(args: argparse.Namespace) -> tuple:
    """(the seeds to run, the DagsterInstance opened), with the job built into `_worker`."""
    try:
        settings.check_all()  # before the definitions load: a bad setting is reported at once
        from dlm_pipeline.definitions import resolved_corpus_job

        # Built once, here: what else the definitions refuse surfaces before any run.
        _worker["job"] = resolved_corpus_job().with_logger_defs({"console": _console_without_errors()})
    except settings.SettingsError as exc:
        raise CliError(str(exc)) from None
    seeds = _seeds(args.seed or [])
    if settings.deployment() == "k8s":
        _check_cluster()
    instance = _instance()
    seeds = seeds or _registered(instance) or ["0"]
    _register(instance, seeds)
    return seeds, instance


def _check_cluster() -> None:
    """Runs started here use the k8s executor's default, the in-cluster configuration: outside a
    cluster that fails deep inside the run, so say it first."""
    from kubernetes.config import ConfigException, load_incluster_config

    try:
        load_incluster_config()
    except ConfigException as exc:
        raise CliError(
            f"{settings.ENV_DEPLOYMENT}=k8s runs each step in a Kubernetes pod, but this is not inside a cluster "
            f"({exc}): run the CLI in the cluster, or use {settings.ENV_DEPLOYMENT}=local or shared here",
            EXIT_FAILED,
        ) from None


def cmd_seeds(args: argparse.Namespace) -> int:
    seeds = _seeds(args.seeds) if args.action == "add" else []
    instance = _instance()
    if args.action == "add":
        _register(instance, seeds)
        print(f"registered: {' '.join(seeds)}")
    else:
        for seed in _registered(instance):
            print(seed)
    return EXIT_OK


PRUNE_SHOWN = 5  # foreign entries `cache prune` names (a folder may hold any number)
# How long `cache` commands wait for the token store's lock: far longer than a run holds it for one
# manifest update or a merge of small shards, short enough that a stuck holder is named, not waited on forever.
CACHE_LOCK_WAIT_SECONDS = 60.0


def cmd_cache(args: argparse.Namespace) -> int:
    from dlm_pipeline.core.token_store import TokenStore

    try:
        max_bytes, max_text_bytes = settings.cache_max_bytes(), settings.max_file_bytes()
        root = settings.cache_dir() or str(_ensure_dagster_home() / settings.TOKEN_CACHE_DIR)
    except settings.SettingsError as exc:
        raise CliError(str(exc)) from None
    try:
        store = TokenStore(root, max_bytes=max_bytes, max_text_bytes=max_text_bytes, lock_wait=CACHE_LOCK_WAIT_SECONDS)
        _cache_action(store, args)
    except (ValueError, OSError) as exc:  # a store that is not a folder we can use (TokenStoreError is a ValueError)
        raise CliError(f"token cache {root} ({settings.ENV_CACHE_DIR}): {exc}", EXIT_FAILED) from None
    return EXIT_OK


def _cache_action(store, args: argparse.Namespace) -> None:
    if args.action == "stats":
        stats = store.stats()
        print(
            f"{stats['root']}: {stats['rows']:,} entries in {stats['shards']} shard(s), "
            f"{stats['bytes']:,} bytes (cap {stats['max_bytes']:,})"
        )
        for namespace, ns in sorted(stats["namespaces"].items()):
            print(f"  {namespace}: {ns['rows']:,} entries, {ns['shards']} shard(s), {ns['bytes']:,} bytes")
    elif args.action == "prune":
        report = store.repair()
        merged = store.compact(at_shards=1)
        removed = store.evict(max_bytes=args.max_bytes)
        ignored = report["ignored"]
        examples = "; ".join(ignored[:PRUNE_SHOWN]) + (
            f"; and {len(ignored) - PRUNE_SHOWN} more" * (len(ignored) > PRUNE_SHOWN)
        )
        print(
            f"repaired: {report['dropped']} lost shard(s) dropped, {report['adopted']} adopted, {report['deleted']} "
            f"unreadable or stale file(s) deleted, {len(report['corrupt'])} corrupt shard(s) deleted, "
            f"{len(ignored)} foreign entr(y/ies) left alone{f' ({examples})' if ignored else ''}; "
            f"merged {merged} small shard(s) away; evicted {len(removed)} shard(s); now {store.stats()['bytes']:,} bytes"
        )
    else:
        store.clear()
        print(f"cleared {store.root}")


def cmd_validate(args: argparse.Namespace) -> int:
    from dlm_pipeline.core.config import printable
    from dlm_pipeline.core.config_records import (
        STATUS_ERROR,
        all_anchors_from_table,
        anchors_from_table,
        load_configs,
        records_table,
    )
    from dlm_pipeline.core.rules import unapplied_anchors
    from dlm_pipeline.core.tree import SourceTreeError, scan_tree
    from dlm_pipeline.core.weights import unmatched_weights

    _apply_source_flags(args)
    try:
        scan = scan_tree(settings.source_root(), exclude_dirs=settings.pipeline_dirs(os.environ.get("DAGSTER_HOME")))
        records = load_configs(scan, max_weight=settings.max_weight())
    except (SourceTreeError, settings.SettingsError) as exc:
        raise CliError(str(exc)) from None
    errors = [r for r in records if r.status == STATUS_ERROR]
    for record in errors:
        print(record.error, file=sys.stderr)
    valid = records_table([r for r in records if r.status != STATUS_ERROR])
    warnings = [
        f"{directory}/.dlm/: not applied, it lies in a folder the default excludes drop "
        "(say exclude_defaults: false in an anchor above it to take the folder in)"
        for directory in sorted(unapplied_anchors(all_anchors_from_table(valid)))
    ]
    for line in warnings + unmatched_weights(anchors_from_table(valid)):
        print(f"warning: {printable(line)}", file=sys.stderr)
    print(f"{len(records) - len(errors)} config file(s) valid, {len(errors)} invalid under {scan.root}")
    return EXIT_FAILED if errors else EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from dlm_pipeline.core.explain import ExplainError, explain
    from dlm_pipeline.core.tokenize import TokenizerError, load_tokenizer
    from dlm_pipeline.core.tree import SourceTreeError

    _apply_source_flags(args)
    seed = _seeds([args.seed])[0] if args.seed is not None else None
    try:
        settings.check_all(schedule=False)  # explain runs no Dagster: not even its cron validator is loaded
        result = explain(
            settings.source_root(),
            args.path,
            int(seed) if seed is not None else None,
            scope=settings.weights_scope(),
            mode=settings.expansion_mode(),
            max_file_bytes=settings.max_file_bytes(),
            max_weight=settings.max_weight(),
            secret_entropy=settings.secret_entropy(),
            exclude_dirs=settings.pipeline_dirs(os.environ.get("DAGSTER_HOME")),
            split_seed=settings.split_seed(),
            val_fraction=settings.val_fraction(),
            tokenizer=load_tokenizer(settings.tokenizer(), max_seq_len=settings.max_seq_len()),
        )
    except (ExplainError, SourceTreeError, settings.SettingsError, TokenizerError) as exc:
        raise CliError(str(exc)) from None
    sys.stdout.write(result.text())
    return EXIT_OK if result.in_raw_corpus else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from dlm_pipeline.core.tree import SourceTreeError

    _apply_source_flags(args)
    with _loading():
        try:
            settings.check_all()
            from dlm_pipeline.definitions import build_defs
            from dlm_pipeline.defs.status import (
                current_config_fingerprint,
                current_settings,
                seed_status,
                status_lines,
            )

            graph = build_defs().resolve_asset_graph()
        except settings.SettingsError as exc:
            raise CliError(str(exc)) from None
        instance = _instance()
    seeds = _seeds(args.seed or []) or _registered(instance)
    if not seeds:
        print("no seeds registered: nothing materialized (dlm-pipeline materialize)")
        return EXIT_OK
    try:
        fingerprint = current_config_fingerprint(instance)
    except SourceTreeError as exc:
        raise CliError(str(exc)) from None
    now = current_settings()
    for seed in seeds:
        print("\n".join(status_lines(seed, seed_status(instance, graph, seed, fingerprint, now))))
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dlm-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    materialize = sub.add_parser("materialize", help="materialize the whole graph for each seed")
    materialize.add_argument("--source", help="source root (default: $DLM_SOURCE_ROOT or the bundled example)")
    materialize.add_argument(
        "--seed",
        action="extend",
        nargs="+",
        metavar="N",
        help="seeds to materialize: --seed 1 2 or --seed 1 --seed 2 (default: every registered seed, or 0)",
    )
    materialize.add_argument("--weights-scope", choices=settings.SCOPES, help="nearest (default) or global")
    materialize.add_argument(
        "--tokenizer", help="tokenizer.json path, directory holding one, or hub id (default: bundled)"
    )
    materialize.add_argument(
        "--max-seq-len",
        type=_flag(settings.check_max_seq_len, settings.parse_whole, "a whole number >= 1"),
        help="truncate token sequences to this length (default 2048)",
    )
    materialize.add_argument(
        "--val-fraction",
        type=_flag(
            settings.check_val_fraction, settings.parse_number, f"a number from 0 to {settings.MAX_VAL_FRACTION}"
        ),
        help=f"share of rows on the validation side (default {settings.DEFAULT_VAL_FRACTION}; 0: none)",
    )
    materialize.add_argument(
        "--split-seed",
        type=_flag(lambda text: settings.check_seed_text("the split seed", text)),
        help="seed of the train/validation split (default 0)",
    )
    materialize.add_argument(
        "--expansion-mode", choices=settings.EXPANSION_MODES, help="bernoulli (default) or exact fractional copies"
    )
    materialize.add_argument("--eos-token", help="end-of-document token (default: the tokenizer's EOS token)")
    materialize.add_argument(
        "--full-rescan",
        action="store_const",
        const=1,
        help="read every source file again instead of trusting the ingest index (DLM_FULL_RESCAN=1)",
    )
    materialize.add_argument(
        "--parallel", type=int, default=1, help="seeds run at once, each in a forked worker (default 1)"
    )
    materialize.add_argument(
        "--compute",
        choices=settings.COMPUTE_BACKENDS,
        help="where misses are tokenized (default: $DLM_COMPUTE or local)",
    )
    materialize.add_argument(
        "--ray-address",
        help="Ray cluster for --compute ray (default: $DLM_RAY_ADDRESS, or LocalRay)",
    )
    materialize.set_defaults(func=cmd_materialize)

    seeds = sub.add_parser("seeds", help="register or list seed partitions")
    seeds_sub = seeds.add_subparsers(dest="action", required=True)
    add = seeds_sub.add_parser("add", help="register seeds")
    add.add_argument("seeds", nargs="+")
    seeds_sub.add_parser("list", help="list registered seeds")
    seeds.set_defaults(func=cmd_seeds)

    cache = sub.add_parser(
        "cache", help="inspect or shrink the token cache ($DLM_CACHE_DIR or $DAGSTER_HOME/token_cache)"
    )
    cache_sub = cache.add_subparsers(dest="action", required=True)
    cache_sub.add_parser("stats", help="entries, shards and bytes per tokenizer namespace")
    prune = cache_sub.add_parser(
        "prune", help="repair, merge small shards, then evict least-recently-used shards down to the cap"
    )
    prune.add_argument(
        "--max-bytes",
        type=_flag(_at_least(0), settings.parse_whole, "a whole number >= 0"),
        help="cap to prune to (default: DLM_CACHE_MAX_BYTES, 10 GiB)",
    )
    cache_sub.add_parser("clear", help="delete every cached entry")
    cache.set_defaults(func=cmd_cache)

    validate = sub.add_parser("validate", help="check every config under the source root; exit 1 on any error")
    validate.add_argument("--source", help="source root (default: $DLM_SOURCE_ROOT or the bundled example)")
    validate.set_defaults(func=cmd_validate)

    explain = sub.add_parser(
        "explain", help="why a file is in the corpus or not, and what happens to it; exit 0 in raw_corpus, 1 not"
    )
    explain.add_argument("path", help="the file: absolute, or relative to the source root (else to the current folder)")
    explain.add_argument("--seed", metavar="N", help="the seed whose copies to show (default 0)")
    explain.add_argument("--source", help="source root (default: $DLM_SOURCE_ROOT or the bundled example)")
    explain.add_argument("--weights-scope", choices=settings.SCOPES, help="nearest (default) or global")
    explain.add_argument(
        "--expansion-mode", choices=settings.EXPANSION_MODES, help="bernoulli (default) or exact fractional copies"
    )
    explain.set_defaults(func=cmd_explain)

    status = sub.add_parser("status", help="per seed: what is materialized, when, rows, checks, and what is stale")
    status.add_argument(
        "--seed", action="extend", nargs="+", metavar="N", help="seeds to show (default: every registered seed)"
    )
    status.add_argument("--source", help="source root (default: $DLM_SOURCE_ROOT or the bundled example)")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"dlm-pipeline: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C before or between runs (a run itself reports it as its failure)
        print("dlm-pipeline: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""The `dlm-pipeline` CLI against a real SQLite instance in a temporary DAGSTER_HOME."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import EXAMPLE, REPO, dlm

from dlm_pipeline import settings
from dlm_pipeline.cli import _apply_source_flags, build_parser, main

ASSETS = ["training_configs", "weights_map", "raw_corpus", "expanded_corpus", "tokenized_cache"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    # Set, then delete, every variable: monkeypatch then also removes those the CLI's flags set.
    names = {getattr(settings, n) for n in dir(settings) if n.startswith("ENV_")}
    for var in names | {v for v in os.environ if v.startswith("DLM_")}:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return home


def test_validate_ok_and_failing(tree, capsys, home):
    assert main(["validate", "--source", str(EXAMPLE)]) == 0
    assert "6 config file(s) valid, 0 invalid" in capsys.readouterr().out
    root = tree({".dlm/training.yaml": "dlm_training_version: 1\nweights: {a: {b: -1}}\n", "sub/.dlm/ignore": "x\n"})
    assert main(["validate", "--source", str(root)]) == 1
    captured = capsys.readouterr()
    assert ".dlm/training.yaml:2: weights.a.b: weight must be >= 0" in captured.err
    assert "1 config file(s) valid, 1 invalid" in captured.out


def test_validate_missing_source_is_a_usage_error(tmp_path, capsys, home):
    assert main(["validate", "--source", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["042", "-1", "abc", "1.0", "", "1" * 21, "9" * 301])
def test_seeds_add_refuses_non_canonical_keys(bad, capsys, home):
    assert main(["seeds", "add", bad]) == 2
    assert "canonical non-negative decimal integer of at most 20 digits" in capsys.readouterr().err


def test_a_seed_longer_than_20_digits_is_refused_before_it_is_registered(capsys, home):
    import dagster as dg

    assert main(["materialize", "--seed", "7", "1" * 301]) == 2
    assert "at most 20 digits" in capsys.readouterr().err
    assert main(["seeds", "add", "9" * 20]) == 0
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("seeds") == ["9" * 20]


def test_prune_refuses_a_negative_cap(capsys, home):
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "prune", "--max-bytes", "-1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --max-bytes: must be a whole number >= 0, got -1" in err


def test_dataset_flags_reach_the_resources(home):
    from dlm_pipeline.definitions import default_resources

    args = build_parser().parse_args(
        ["materialize", "--val-fraction", "0.25", "--split-seed", "7", "--expansion-mode", "exact"]
        + ["--eos-token", "</s>"]
    )
    _apply_source_flags(args)
    resources = default_resources()
    assert resources["source"].expansion_mode == "exact"
    dataset = resources["dataset"]
    assert (dataset.val_fraction, dataset.split_seed, dataset.eos_token) == (0.25, 7, "</s>")


def test_seeds_add_and_list(capsys, home):
    assert main(["seeds", "add", "10", "2", "2"]) == 0
    capsys.readouterr()
    assert main(["seeds", "list"]) == 0
    assert capsys.readouterr().out.split() == ["2", "10"]


def test_materialize_defaults_to_seed_0_then_every_registered_seed(capsys, home):
    assert main(["materialize"]) == 0
    out = capsys.readouterr().out
    assert "seed 0: ok" in out
    for asset in ASSETS:
        assert str(home / "storage" / asset / "0.parquet") in out
    assert main(["seeds", "add", "3"]) == 0
    assert main(["materialize"]) == 0
    out = capsys.readouterr().out
    assert "seed 0: ok" in out and "seed 3: ok" in out
    assert (home / "storage" / "expanded_corpus" / "3.parquet").exists()


def test_materialize_with_flags_and_output_dir(tree, tmp_path, capsys, home, monkeypatch):
    monkeypatch.setenv("DLM_OUTPUT_DIR", str(tmp_path / "outputs"))
    config = "dlm_training_version: 1\nmetadata: {k: v}\nweights: {k: {v: 2}}\n"
    root = tree({".dlm/training.yaml": config, "a.txt": "a"})
    assert main(["materialize", "--source", str(root), "--seed", "4", "9", "--weights-scope", "global"]) == 0
    for seed in ("4", "9"):
        table = pq.read_table(tmp_path / "outputs" / "expanded_corpus" / f"{seed}.parquet")
        assert table["copy"].to_pylist() == [0, 1]


def test_materialize_fails_with_the_reason(tree, capsys, home):
    root = tree({".dlm/training.yaml": "dlm_training_version: 1\nbogus: 1\n", "a.txt": "a"})
    assert main(["materialize", "--source", str(root)]) == 1
    err = capsys.readouterr().err
    assert "seed 0: FAILED" in err
    assert "check configs_valid failed" in err
    assert ".dlm/training.yaml:2: bogus: unknown field" in err


def test_a_credential_in_a_tag_fails_validate_and_materialize_and_reaches_no_output(tree, capsys, home):
    token = "ghp_" + "Ab1" * 12  # built at run time: no scanner flags this file
    root = tree(
        {".dlm/training.yaml": f"dlm_training_version: 1\nmetadata:\n  lang: python\n  ci: {token}\n", "a.txt": "a"}
    )
    expected = ".dlm/training.yaml:4: metadata.ci: the value holds a credential (GitHub Token)"
    assert main(["validate", "--source", str(root)]) == 1
    out, err = capsys.readouterr()
    assert expected in err and "0 config file(s) valid, 1 invalid" in out
    assert main(["materialize", "--source", str(root)]) == 1
    out, err = capsys.readouterr()
    assert "check configs_valid failed" in err and expected in err
    assert token not in out + err and token[4:16] not in out + err
    assert not (home / "storage" / "raw_corpus").exists()
    for path in home.rglob("*"):  # the instance's event log and run storage included
        assert not path.is_file() or token.encode() not in path.read_bytes(), path


def test_materialize_refuses_bad_settings(capsys, home, monkeypatch):
    monkeypatch.setenv("DLM_MAX_FILE_BYTES", "lots")
    assert main(["materialize"]) == 2
    assert "DLM_MAX_FILE_BYTES must be a whole number" in capsys.readouterr().err


def test_outputs_are_byte_identical_across_processes_and_hash_seeds(tmp_path):
    outputs = []
    for i, hash_seed in enumerate(["0", "4242"]):
        home, out = tmp_path / f"home{i}", tmp_path / f"out{i}"
        home.mkdir()
        done = dlm(
            ["materialize", "--seed", "1", "--seed", "8"], home, PYTHONHASHSEED=hash_seed, DLM_OUTPUT_DIR=str(out)
        )
        assert done.returncode == 0, done.stderr
        outputs.append({(a, s): (out / a / f"{s}.parquet").read_bytes() for a in ASSETS for s in ("1", "8")})
    assert outputs[0] == outputs[1]


def test_cache_stats_prune_clear_and_tokenizer_flags(capsys, home, tmp_path):
    assert main(["materialize", "--max-seq-len", "16"]) == 0
    capsys.readouterr()
    assert main(["cache", "stats"]) == 0
    out = capsys.readouterr().out
    from dlm_pipeline.core.tokenize import load_tokenizer

    assert (
        str(home / "token_cache") in out and f"{load_tokenizer().cache_namespace}: 11 entries" in out
    )  # 11 of 12 texts: seed 0 needs 11
    assert main(["cache", "prune", "--max-bytes", "0"]) == 0
    assert "evicted 1 shard(s); now 0 bytes" in capsys.readouterr().out
    assert main(["materialize", "--tokenizer", str(tmp_path / "missing.json")]) == 1
    assert "tokenizer file" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0
    assert main(["cache", "stats"]) == 0
    assert ": 0 entries in 0 shard(s)" in capsys.readouterr().out


def test_cache_prune_and_clear_give_up_on_a_held_lock_with_one_line(capsys, home, monkeypatch):
    import fcntl

    from dlm_pipeline import cli

    monkeypatch.setattr(cli, "CACHE_LOCK_WAIT_SECONDS", 0.2)
    assert main(["cache", "stats"]) == 0  # creates the store and its lock file
    capsys.readouterr()
    lock = home / "token_cache" / ".lock"
    held = os.open(lock, os.O_RDWR)  # another open file: flock sees another holder, in this very process
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        for action in (["prune"], ["clear"]):
            assert main(["cache", *action]) == 1
            err = capsys.readouterr().err.strip()
            assert err == (
                f"dlm-pipeline: token cache {home / 'token_cache'} (DLM_CACHE_DIR): {lock} is still held after 0.2 s "
                f"by process {os.getpid()}: a run or a `cache` command is using the token store; retry when it ends, "
                "or stop it"
            )
    finally:
        os.close(held)
    assert main(["cache", "clear"]) == 0


def test_parallel_seeds_give_the_same_outputs_as_sequential(tmp_path, home, monkeypatch, capsys):
    monkeypatch.setenv("DLM_OUTPUT_DIR", str(tmp_path / "parallel"))
    assert main(["materialize", "--parallel", "2", "--seed", "1", "--seed", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert all(f"seed {s}: ok" in out for s in ("1", "2", "3"))
    monkeypatch.setenv("DLM_OUTPUT_DIR", str(tmp_path / "sequential"))
    assert main(["materialize", "--seed", "1", "--seed", "2", "--seed", "3"]) == 0
    for seed in ("1", "2", "3"):
        for asset in ASSETS:
            a = (tmp_path / "parallel" / asset / f"{seed}.parquet").read_bytes()
            assert a == (tmp_path / "sequential" / asset / f"{seed}.parquet").read_bytes()


def test_two_seeds_at_once_with_the_multiprocess_executor_share_the_token_store(tmp_path):
    """Two concurrent runs (forked workers), each step in its own process, one token store."""
    from dlm_pipeline.core.token_store import MANIFEST, TokenStore

    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    done = dlm(
        ["materialize", "--parallel", "2", "--seed", "1", "2"], home, DLM_CACHE_DIR=str(cache), DLM_DEPLOYMENT="shared"
    )
    assert done.returncode == 0, done.stderr
    assert "seed 1: ok" in done.stdout and "seed 2: ok" in done.stdout
    import json

    manifest = json.loads((cache / MANIFEST).read_text())["shards"]
    for name, info in manifest.items():
        assert pq.read_table(cache / name).num_rows == info["rows"]
    from dlm_pipeline.core.tokenize import load_tokenizer

    loaded = load_tokenizer()
    from dlm_pipeline.core.corpus import content_key

    texts = sorted(set(pq.read_table(home / "storage" / "raw_corpus" / "1.parquet")["text"].to_pylist()))
    again = TokenStore(cache).get_or_compute(
        loaded.cache_namespace, [content_key(t) for t in texts], texts, loaded.encode
    )
    assert (again.hits, again.misses) == (len(texts), 0)
    expected = [e.ids for e in loaded.tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert again.table["input_ids"].to_pylist() == expected


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("DLM_MAX_WEIGHT", "nan", "DLM_MAX_WEIGHT must be a number, got 'nan'"),
        ("DLM_MAX_WEIGHT", "lots", "DLM_MAX_WEIGHT must be a number, got"),
        ("DLM_MAX_SEQ_LEN", "0", "DLM_MAX_SEQ_LEN must be a whole number > 0"),
        ("DLM_WEIGHTS_SCOPE", "local", "DLM_WEIGHTS_SCOPE: weights scope must be one of nearest, global"),
        ("DLM_CACHE_MAX_BYTES", "1.5", "DLM_CACHE_MAX_BYTES must be a whole number"),
    ],
)
def test_bad_settings_are_named(capsys, home, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    assert main(["materialize"]) == 2
    assert message in capsys.readouterr().err


def test_non_canonical_registered_partitions_are_ignored_with_a_warning(capsys, home):
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("seeds", ["abc", "7"])
    assert main(["seeds", "list"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == ["7"]
    assert "ignoring registered partition 'abc'" in captured.err


def test_a_second_run_of_a_seed_waits_for_the_first_and_says_so(tmp_path):
    """Two runs of one seed must not interleave (one could record an output as unchanged while the
    other rewrites it): a run holds its seed's lock in the output folder while it writes. Here the
    test holds it, as a running materialize would; the CLI waits, says why, and runs once it is free."""
    import fcntl

    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    (out / ".locks").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    env.update(DAGSTER_HOME=str(home), DLM_OUTPUT_DIR=str(out))
    with open(out / ".locks" / "4.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--seed", "4"],
            env=env,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        seen = []
        for line in proc.stderr:  # blocks until the CLI writes; it cannot finish while the lock is held
            seen.append(line)
            if "waiting for another run of seed 4 to finish" in line:
                break
        assert proc.poll() is None, "".join(seen)
        assert not (out / "expanded_corpus" / "4.parquet").exists()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(seen) + stderr
    assert "seed 4: ok" in stdout and (out / "expanded_corpus" / "4.parquet").exists()


def test_a_seed_lock_that_cannot_be_taken_fails_the_seed_with_its_reason(tmp_path):
    """The lock is taken before any step: the reason must reach the summary, not "see the run in the UI"."""
    home, out, elsewhere = tmp_path / "home", tmp_path / "out", tmp_path / "elsewhere"
    for folder in (home, out, elsewhere):
        folder.mkdir()
    (out / ".locks").symlink_to(elsewhere)  # planted: never followed
    (tmp_path / "tree").mkdir()
    proc = dlm(["materialize", "--seed", "4", "--source", str(tmp_path / "tree")], home, DLM_OUTPUT_DIR=str(out))
    assert proc.returncode != 0
    summary = proc.stderr[proc.stderr.index("seed 4: FAILED") :].splitlines()
    assert (
        summary[1]
        .strip()
        .startswith(f"resources: cannot lock seed 4's outputs: {out / '.locks'}/ is not a plain folder")
    )
    assert "see the run in the UI" not in proc.stderr and list(elsewhere.iterdir()) == []

"""Red team, black-box: hostile configs, settings and trees through what users run (`dlm-pipeline` in a
subprocess). Each test failed before its fix; cases earlier red-team files cover are not repeated."""

from __future__ import annotations

import pytest
from conftest import dlm, one_line_error

CONFIG = ".dlm/training.yaml"


def write(root, files: dict[str, str | bytes]):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return root


@pytest.mark.parametrize(
    "config, line, phrase",
    [
        # The YAML composer recursed per level: RecursionError and a 3,000-line traceback.
        ("dlm_training_version: 1\nmetadata: " + "[" * 5000 + "]" * 5000 + "\n", 2, "nested deeper than 32 levels"),
        ("dlm_training_version: 1\nmetadata: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", 2, "nested deeper than"),
        # int() refuses more than 4,300 digits: ValueError out of the YAML constructor.
        ("dlm_training_version: 1\nweights: {a: {b: " + "9" * 5000 + "}}\n", 2, "integer of 5000 characters"),
        # float() of an integer past 1.8e308: OverflowError out of the weight check.
        ("dlm_training_version: 1\nweights: {a: {b: 1" + "0" * 400 + "}}\n", 2, "weights.a.b: weight must be finite"),
        # A NUL character: yaml's reader raised before the parse, outside the error handling.
        ("dlm_training_version: 1\n\0\n", 2, "character 0x0000 is not allowed"),
        # A lone surrogate escape passed validation, then Arrow could not store it: UnicodeEncodeError.
        ('dlm_training_version: 1\nmetadata: {lang: "\\ud800"}\n', 2, "lone surrogate"),
        ('dlm_training_version: 1\ninclude: ["\\udfff/**"]\n', 2, "lone surrogate"),
    ],
)
def test_a_hostile_config_is_one_line_with_its_line_not_a_traceback(tmp_path, config, line, phrase):
    root = write(tmp_path / "tree", {CONFIG: config, "a.py": "x = 1\n"})
    done = dlm(["validate", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (error,) = done.stderr.splitlines()
    assert error.startswith(f"{CONFIG}:{line}: ") and phrase in error, error


@pytest.mark.parametrize(
    "variable, value",
    [
        ("DLM_MAX_FILE_BYTES", "\u0663"),  # ARABIC-INDIC DIGIT THREE: int() reads it as 3
        ("DLM_MAX_FILE_BYTES", "1_000"),  # int() reads 1000
        ("DLM_MAX_SEQ_LEN", " 512 "),  # int() strips spaces
        ("DLM_CACHE_MAX_BYTES", "5\u2009"),  # a thin space, stripped too
        ("DLM_MAX_WEIGHT", "\u0665"),
        ("DLM_VAL_FRACTION", "0_0"),  # float() reads 0.0
        ("DLM_VAL_FRACTION", "\u0660.\u0661"),  # ٠.١ is 0.1 to float()
    ],
)
def test_a_number_setting_in_other_digits_or_with_spaces_is_refused(tmp_path, variable, value):
    one_line_error(dlm(["materialize"], tmp_path / "home", **{variable: value}), 2, variable)
    assert not (tmp_path / "home" / "storage").exists()


@pytest.mark.parametrize("flags", [["--max-seq-len", "\u0665\u0661\u0662"], ["--val-fraction", " 0.1"]])
def test_a_number_flag_in_other_digits_or_with_spaces_is_refused(tmp_path, flags):
    one_line_error(dlm(["materialize", *flags], tmp_path / "home"), 2, flags[0])


@pytest.mark.parametrize("path", ["a\nb/.env", "a\nb/.git/config", "x\n/id_rsa", "a\nb/node_modules/x.js"])
def test_a_folder_name_with_a_newline_does_not_slip_past_the_default_excludes(tmp_path, path):
    """`**` and `(?:.+/)?` were compiled without (?s), so `.` stopped at the newline: the default
    excludes (and every include/exclude/ignore rule) missed whatever lay below such a folder."""
    root = write(tmp_path / "tree", {path: "PASSWORD=hunter2\n", "ok.py": "x = 1\n"})
    done = dlm(["explain", path, "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "built-in default exclude" in done.stdout and "not in raw_corpus" in done.stdout, done.stdout


def test_a_newline_in_a_folder_name_does_not_escape_an_anchors_globs(tmp_path):
    from dlm_pipeline.core.globs import GlobSet

    rules = GlobSet(["secret/", "docs/**", "**/*.py"])
    assert rules.matches("a\nb/secret/key.txt") and rules.matches("docs/a\nb/c.md") and rules.matches("a\nb/x.py")


@pytest.mark.parametrize("variable", ["DAGSTER_HOME", "DLM_OUTPUT_DIR", "DLM_CACHE_DIR"])
def test_a_symlink_into_the_pipelines_own_folder_is_not_ingested(tmp_path, variable):
    """The own folder is passed over by the walk, but a symlink elsewhere in the tree pointing into it
    was followed (its target is inside the root): our own logs and manifests became training text."""
    root = write(tmp_path / "tree", {"a.py": "x = 1\n", "own/logs/event.log": "run 1 started by alice\n"})
    (root / "notes.txt").symlink_to("own/logs/event.log")
    env = {variable: str(root / "own")} if variable != "DAGSTER_HOME" else {}
    home = root / "own" if variable == "DAGSTER_HOME" else tmp_path / "home"
    done = dlm(["explain", "notes.txt", "--source", str(root)], home, **env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "symlink_escape" in done.stdout and "not in raw_corpus" in done.stdout, done.stdout


@pytest.mark.parametrize("below", ["", "storage", "logs"])
def test_a_source_root_inside_dagster_home_is_refused(tmp_path, below):
    """The walk passed over the own folders only below the root: a root at (or in) DAGSTER_HOME read
    its event log, run databases and telemetry id as source."""
    home = write(tmp_path / "home", {"logs/event.log": "run 1\n", "storage/x.py": "x = 1\n"})
    done = dlm(["validate", "--source", str(home / below)], home)
    one_line_error(done, 2, "is inside the pipeline's own folder", "DAGSTER_HOME")


PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1234567890abcdefghij\n-----END RSA PRIVATE KEY-----\n"


def test_a_symlink_from_an_unscanned_folder_does_not_carry_a_key_past_the_scan(tmp_path):
    """`vendor/` says `scan_secrets: false`; `vendor/notes.txt -> ../keys/deploy.txt` was read under
    vendor's setting, so a key kept where scanning is on went into the corpus through the link."""
    import pyarrow.parquet as pq

    root = write(
        tmp_path / "tree",
        {
            "vendor/.dlm/training.yaml": "dlm_training_version: 1\nscan_secrets: false\n",
            "vendor/lib.py": "x = 1\n",
            "keys/deploy.txt": PRIVATE_KEY,
        },
    )
    (root / "vendor" / "notes.txt").symlink_to("../keys/deploy.txt")
    explained = dlm(["explain", "vendor/notes.txt", "--source", str(root)], tmp_path / "home")
    assert explained.returncode == 1 and "skipped: secret (Private Key)" in explained.stdout, explained.stdout
    done = dlm(["materialize", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(tmp_path / "home" / "storage" / "raw_corpus" / "0.parquet").to_pylist()
    assert [row["path"] for row in rows] == ["vendor/lib.py"]


@pytest.mark.parametrize(
    "config, where",
    [
        ({".dlm/ignore": "*.log\n" + "a" * 900_000 + "\n"}, ".dlm/ignore:2: "),
        ({CONFIG: "dlm_training_version: 1\ninclude: ['" + "a" * 100_000 + "']\n"}, f"{CONFIG}:2: include: "),
        ({".dlm/ignore": "x\\" + "b" * 500_000 + "\\\n"}, ".dlm/ignore:1: "),
    ],
)
def test_a_huge_refused_pattern_is_quoted_in_part(tmp_path, config, where):
    """The error quoted the whole pattern (and pathspec's reason quoted it again): one line of 900 KB."""
    root = write(tmp_path / "tree", {**config, "a.py": "x = 1\n"})
    done = dlm(["validate", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (error,) = done.stderr.splitlines()
    assert error.startswith(where) and len(error) < 500, error[:300]


@pytest.mark.parametrize("variable", ["DLM_OUTPUT_DIR", "DLM_CACHE_DIR", "DLM_TOKENIZER"])
@pytest.mark.parametrize("command", [["materialize"], ["status"]])
def test_a_path_setting_with_stray_spaces_is_refused_before_anything_is_written(tmp_path, variable, command):
    """`DLM_OUTPUT_DIR=" "` wrote every output into a folder named " " in the current directory."""
    folder = f"{tmp_path / 'out'} "
    one_line_error(dlm(command, tmp_path / "home", **{variable: folder}), 2, variable, "spaces")
    assert not (tmp_path / "out ").exists()


def test_explain_on_weights_whose_product_is_refused_says_so_instead_of_a_traceback(tmp_path):
    """Five tags weighted 100 each (all valid) compose to 10**10 copies: `explain` raised ExpansionTooLarge."""
    tags = "abcde"
    config = (
        "dlm_training_version: 1\n"
        f"metadata: {{{', '.join(f'{t}: x' for t in tags)}}}\n"
        f"weights: {{{', '.join(f'{t}: {{x: 100}}' for t in tags)}}}\n"
    )
    root = write(tmp_path / "tree", {CONFIG: config, "a.py": "x = 1\n"})
    done = dlm(["explain", "a.py", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert "expanded_corpus refuses it: the composed weights would produce 10,000,000,000 rows" in done.stdout


LIFTING = "dlm_training_version: 1\nexclude_defaults: false\nscan_secrets: false\n"


@pytest.mark.parametrize(
    "planted, secret_file",
    [("node_modules/evil", "node_modules/evil/.env"), (".git", ".git/config"), (".venv/lib", ".venv/lib/id_rsa")],
)
def test_a_config_inside_a_default_excluded_folder_cannot_lift_the_excludes_over_itself(tmp_path, planted, secret_file):
    """A `.dlm/` shipped in a dependency (or planted in `.git/`) said `exclude_defaults: false` and
    `scan_secrets: false`: being the nearest anchor, it re-admitted its folder unscanned, key included."""
    root = write(
        tmp_path / "tree",
        {f"{planted}/.dlm/training.yaml": LIFTING, secret_file: PRIVATE_KEY, "a.py": "x = 1\n"},
    )
    done = dlm(["explain", secret_file, "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1 and "built-in default exclude" in done.stdout, done.stdout
    checked = dlm(["validate", "--source", str(root)], tmp_path / "home")
    assert checked.returncode == 0, checked.stderr
    assert f"warning: {planted}/.dlm/: not applied, it lies in a folder the default excludes drop" in checked.stderr


def test_a_config_inside_a_default_excluded_folder_applies_once_an_anchor_above_takes_the_folder_in(tmp_path):
    root = write(
        tmp_path / "tree",
        {
            ".dlm/training.yaml": "dlm_training_version: 1\nexclude_defaults: false\n",
            "build/.dlm/training.yaml": "dlm_training_version: 1\nmetadata: {kind: generated}\n",
            "build/out.py": "x = 1\n",
        },
    )
    done = dlm(["explain", "build/out.py", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 0 and "kind=generated  (from build)" in done.stdout, done.stdout


# Built at run time so this file itself holds no credential a scanner would flag.
MISSED_BEFORE = {
    "redis_url_without_user": "REDIS_URL = 'redis://:" + "p4ssw0rdXYZ@redis:6379/0'\n",
    "putty_v3_key": "PuTTY-User-Key-File-3" + ": ssh-ed25519\nEncryption: none\n",
    "age_key": "AGE-SECRET-KEY-1" + "QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7LQPZRY9X8GF2TVDW0S3JN54KHCE\n",
    "anthropic": "ANTHROPIC_API_KEY=sk-ant-"
    + "api03-"
    + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9fG1hJ3kL5mN7pQ9rS1tU3vW5xY7zA9bC1dE3fG5hJ7kL9m-AA\n",
    "databricks": "token = 'dapi" + "0123456789abcdef0123456789abcdef'\n",
    "shopify": "SHOPIFY = 'shpat_" + "0123456789abcdef0123456789abcdef'\n",
}


@pytest.mark.parametrize("kind", sorted(MISSED_BEFORE))
def test_credentials_the_scan_missed_are_found(kind):
    from dlm_pipeline.core.secrets import secret_scanner

    assert secret_scanner().findings(MISSED_BEFORE[kind]) == ["Credential"]


@pytest.mark.parametrize(
    "text", ["url = f'redis://:{password}@host'\n", "see http://:@host\n", "dapi_version = 3\n", "sk-ant-test\n"]
)
def test_look_alikes_of_those_credentials_are_not_findings(text):
    from dlm_pipeline.core.secrets import secret_scanner

    assert secret_scanner().findings(text) == []


def test_a_connection_url_with_a_password_and_no_user_is_skipped_as_secret(tmp_path):
    root = write(tmp_path / "tree", {"app/cache.py": MISSED_BEFORE["redis_url_without_user"], "a.py": "x = 1\n"})
    done = dlm(["explain", "app/cache.py", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1 and "skipped: secret (Credential)" in done.stdout, done.stdout
    assert "p4ssw0rd" not in done.stdout + done.stderr


@pytest.mark.parametrize("folder", [".DLM", "sub/.Dlm"])
def test_an_anchor_folder_in_the_wrong_case_is_a_config_error_not_silently_text(tmp_path, folder):
    """`.DLM/training.yaml` was no anchor (its rules silently unapplied) and a row of training text."""
    root = write(tmp_path / "tree", {f"{folder}/training.yaml": "dlm_training_version: 1\n", "a.py": "x = 1\n"})
    done = dlm(["validate", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"{folder}: not read: an anchor folder must be named exactly .dlm/ (lower case); rename it"
    ]


def test_a_newline_in_a_key_or_folder_name_cannot_forge_a_second_error_line(tmp_path):
    """Field names and paths were printed raw: `"evil\\nnext.yaml:1: forged": 1` printed two lines,
    the second a made-up error."""
    root = write(
        tmp_path / "tree",
        {
            CONFIG: 'dlm_training_version: 1\n"evil\\nnext.yaml:1: forged": 1\nmetadata: {"a\\rb": [1]}\n',
            "x\ny/.dlm/training.yaml": "dlm_training_version: 2\n",
            "a.py": "x = 1\n",
        },
    )
    done = dlm(["validate", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1, done.stderr
    assert sorted(done.stderr.splitlines()) == [
        f"{CONFIG}:2: evil\\nnext.yaml:1: forged: unknown field; known fields are: dlm_training_version, include, "
        "exclude, exclude_defaults, scan_secrets, metadata, weights",
        f"{CONFIG}:3: metadata.a\\rb: tags are strings, got a list",
        "x\\ny/.dlm/training.yaml:1: dlm_training_version: only version 1 is known, got 2",
    ]


@pytest.mark.parametrize(
    "path", [".ENV", "deploy/.Env.production", "Credentials.json", "ops/Service-Account-prod.JSON"]
)
def test_a_credential_file_in_upper_case_is_a_default_exclude_too(tmp_path, path):
    """`.env*`, `credentials.json`... matched case-sensitively: `.ENV` holding a password (which the
    content scan does not flag, being a plain key=value) went into the corpus."""
    root = write(tmp_path / "tree", {path: "DB_PASSWORD=hunter2isMine\n", "a.py": "x = 1\n"})
    done = dlm(["explain", path, "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1 and "built-in default exclude" in done.stdout, done.stdout


def test_the_source_sensor_skips_a_hostile_config_instead_of_crashing_its_tick(pipeline, tmp_path):
    """The source sensor parses every config: one nested 5,000 levels deep raised RecursionError out of the tick."""
    import dagster as dg

    from dlm_pipeline.defs.automation import source_change_sensor

    root = write(
        tmp_path / "tree",
        {"sub/" + CONFIG: "dlm_training_version: 1\nmetadata: " + "[" * 5000 + "]" * 5000 + "\n", "a.py": "x = 1\n"},
    )
    pipe = pipeline(root)
    context = dg.build_sensor_context(
        instance=pipe.instance, definitions=pipe.defs, resources={"source": pipe.defs.resources["source"]}
    )
    result = source_change_sensor(context)
    assert isinstance(result, dg.SkipReason) and "invalid configs" in result.skip_message


@pytest.mark.parametrize("kind", ["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
def test_a_base64_private_key_in_a_kubernetes_secret_is_skipped_as_secret(tmp_path, kind):
    """`tls.key: LS0tLS1CRUdJTi...` (a Secret's data, a Helm value) went in: only the entropy plugins,
    off by default, could see it. Certificates and public keys in base64 stay text."""
    import base64

    def pem(what: str) -> str:
        return base64.b64encode(
            f"-----BEGIN {what}-----\nMIIEpAIBAAKCAQEA1234567890\n-----END {what}-----\n".encode()
        ).decode()

    secret = f"apiVersion: v1\nkind: Secret\ndata:\n  tls.crt: {pem('CERTIFICATE')}\n  tls.key: {pem(kind)}\n"
    public = f"apiVersion: v1\nkind: ConfigMap\ndata:\n  ca.crt: {pem('CERTIFICATE')}\n  key.pub: {pem('PUBLIC KEY')}\n"
    root = write(tmp_path / "tree", {"chart/templates/tls.yaml": secret, "chart/templates/ca.yaml": public})
    done = dlm(["explain", "chart/templates/tls.yaml", "--source", str(root)], tmp_path / "home")
    assert done.returncode == 1 and "skipped: secret (Credential)" in done.stdout, done.stdout
    kept = dlm(["explain", "chart/templates/ca.yaml", "--source", str(root)], tmp_path / "home")
    assert kept.returncode == 0, kept.stdout

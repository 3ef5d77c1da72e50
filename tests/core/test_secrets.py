"""Secrets never reach the corpus (SPEC §1): credential files by name, credentials by content."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dlm_pipeline.core.corpus import build_raw_corpus
from dlm_pipeline.core.rules import is_default_excluded
from dlm_pipeline.core.secrets import CREDENTIAL_PLUGINS, secret_scanner
from tests.core.test_tree_and_rules import V1, corpus, paths

# Built at run time so this file itself holds no credential a scanner would flag.
SECRETS = {
    "aws": "aws_key = 'AKIA" + "Q3EGRYMNHCZ7XWPA'\n",
    "github": "GITHUB_TOKEN = 'ghp_" + "Zx9kQ2mN4pR7sT1vW3yB5cD8fG0hJ6lK2aE4'\n",
    "gitlab": "token = 'glpat-" + "Xb7Kq2Lm9Np4Rs6Tv8Wz'\n",
    "slack": "hook = 'xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx'\n",
    "stripe": "STRIPE = 'sk_live_" + "51HcQ7rLk2Jd8Fv3Nw9Xp4Tz'\n",
    "private_key": "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\n",
    "openssh_key": "-----BEGIN OPENSSH " + "PRIVATE KEY-----\nb3Blbn\n",
    "postgres_url": "DATABASE_URL = 'postgres://app:" + "Hunter2pw@db.internal:5432/app'\n",
    "azure": "conn = 'DefaultEndpointsProtocol=https;AccountName=x;AccountKey=" + "A" * 86 + "=='\n",
}
SECRET_VALUES = {
    "aws": "Q3EGRYMNHCZ7XWPA",
    "github": "Zx9kQ2mN4pR7sT1vW3yB5cD8fG0hJ6lK2aE4",
    "gitlab": "Xb7Kq2Lm9Np4Rs6Tv8Wz",
    "slack": "AbCdEfGhIjKlMnOpQrStUvWx",
    "stripe": "51HcQ7rLk2Jd8Fv3Nw9Xp4Tz",
    "private_key": "MIIEow",
    "openssh_key": "b3Blbn",
    "postgres_url": "Hunter2pw",
    "azure": "A" * 86,
}

# Every path upstream DocumentLanguageModel's default-exclude test names
# (tests/unit/directives/test_defaults.py), plus the credential files of issue 9.
UPSTREAM_DEFAULT_EXCLUDED = [
    ".git/HEAD",
    ".git/objects/aa/bb",
    ".hg/store/data/foo",
    ".svn/entries",
    ".env",
    ".env.production",
    "src/.env",
    "src/.env.local",
    "home/user/id_rsa",
    "home/user/id_ed25519",
    "configs/production.pem",
    "configs/service.key",
    "app/secrets.toml",
    "src/__pycache__/foo.pyc",
    "a/b/__pycache__/c.pyo",
    ".venv/lib/python/site-packages/x.py",
    "venv/bin/activate",
    "node_modules/react/index.js",
    "dist/bundle.min.js",
    "dist/styles.min.css",
    "dist/app.map",
    "target/release/app",
    "artifacts/libx.rlib",
    "build/class/App.class",
    "build/lib/app.jar",
    "src/libx.so",
    "src/libx.dylib",
    "src/app.dll",
    "build/output.txt",
    "dist/index.html",
    "__generated__/proto.py",
    "generated/api_client.py",
    "package-lock.json",
    "subdir/yarn.lock",
    "Cargo.lock",
    "uv.lock",
    "poetry.lock",
    "Pipfile.lock",
    "assets/logo.png",
    "docs/diagram.pdf",
    "release.zip",
    "assets/clip.wasm",
    ".dlm/training.yaml",
    "src/.dlm/ignore",
    "lib/min.js.map",
    ".tox/py311/lib/x.py",
    "pkg/bundle.min.js",
]
CREDENTIAL_FILES = [
    ".ssh/id_ed25519",
    ".ssh/id_ecdsa",
    ".ssh/id_dsa",
    ".ssh/id_rsa",
    ".ssh/config",
    ".aws/credentials",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".pgpass",
    "credentials.json",
    "service-account.json",
    ".docker/config.json",
    "kubeconfig",
    "terraform.tfstate",
    "infra/prod.tfstate",
    ".kube/config",
    "home/u/.ssh/id_ed25519.pub",
    "deploy/secrets.yaml",
]
LEFT_ALONE = [
    "src/main.py",
    "docs/guide.md",
    "Makefile",
    "README.md",
    "src/utils/helpers.rs",
    "lib/auth.go",
    "app/models/user.java",
    "src/_generated/x.py",
    "src/targets.py",
    "docs/build.md",
]


@pytest.mark.parametrize("path", UPSTREAM_DEFAULT_EXCLUDED + CREDENTIAL_FILES)
def test_default_excludes_cover_upstream_and_credential_files(path):
    assert is_default_excluded(path)


@pytest.mark.parametrize("path", LEFT_ALONE)
def test_default_excludes_leave_source_alone(path):
    assert not is_default_excluded(path)


def test_credential_files_excluded_in_a_real_tree_and_readmitted_by_exclude_defaults_false(tree):
    files = {p: "harmless = 1\n" for p in CREDENTIAL_FILES if not p.startswith(".ssh/config")}
    root = tree({"keep.py": "x = 1\n", **files})
    assert paths(root) == ["keep.py"]
    (root / ".dlm").mkdir()
    (root / ".dlm" / "training.yaml").write_text(V1 + "exclude_defaults: false\n")
    assert set(paths(root)) == {"keep.py", ".dlm/training.yaml", *files}


def test_readmitted_credential_file_still_gets_the_content_scan(tree):
    root = tree(
        {
            ".dlm/training.yaml": V1 + "exclude_defaults: false\n",
            ".aws/credentials": SECRETS["aws"],
            ".netrc": "machine x login y\n",
        }
    )
    result = corpus(root)
    assert result.table["path"].to_pylist() == [".dlm/training.yaml", ".netrc"]
    assert result.skipped == [(".aws/credentials", "secret")]


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_file_with_a_credential_is_skipped_as_secret(tree, kind):
    root = tree({"app/settings.py": "import os\n" + SECRETS[kind] + "DEBUG = False\n", "app/ok.py": "x = 1\n"})
    result = corpus(root)
    assert result.table["path"].to_pylist() == ["app/ok.py"]
    assert result.skips["secret"] == 1
    assert result.skipped == [("app/settings.py", "secret")]


def test_ordinary_code_is_not_flagged(tree):
    root = tree(
        {
            "a.py": "password = input('password: ')\nurl = 'https://example.com/path?q=1'\nkey = 'name'\n",
            "b.md": "Use `postgres://user@host/db` (no password) and export AWS_SECRET_ACCESS_KEY yourself.\n",
            "c.py": "h = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'\n",
        }
    )
    assert paths(root) == ["a.py", "b.md", "c.py"]


def test_scan_secrets_false_on_the_nearest_anchor_wins(tree):
    root = tree(
        {
            ".dlm/training.yaml": V1 + "scan_secrets: false\n",
            "fixtures/key.py": SECRETS["github"],
            "fixtures/strict/.dlm/training.yaml": V1 + "scan_secrets: true\n",
            "fixtures/strict/key.py": SECRETS["github"],
            "other/.dlm/training.yaml": V1 + "metadata: {a: b}\n",
            "other/key.py": SECRETS["github"],
        }
    )
    result = corpus(root)
    assert result.table["path"].to_pylist() == ["fixtures/key.py", "other/key.py"]
    assert result.skipped == [("fixtures/strict/key.py", "secret")]


def test_high_entropy_plugins_only_when_asked(tree):
    root = tree({"a.py": "blob = 'Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4OTBhYmNkZWZnaGlqa2xtbm9w'\n"})
    assert paths(root) == ["a.py"]
    assert paths(root, secret_entropy=True) == []


def test_prefilter_never_hides_what_the_plugins_find():
    """The combined re2 prefilter is a superset: every line a plugin flags is a candidate line."""
    scanner = secret_scanner(True)
    lines = [line for text in SECRETS.values() for line in text.splitlines()]
    lines += ["x = 1", "s = 'Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4OTBhYmNk'", "u = 'https://a:b@c'"]
    for line in lines:
        by_plugins = sorted({p.secret_type for p in scanner.plugins if p.analyze_line(filename="", line=line)})
        assert scanner.findings(line) == by_plugins, line
    assert len(scanner.plugins) == len(CREDENTIAL_PLUGINS) + 2


def test_candidate_lines_are_few_on_ordinary_code():
    text = Path(subprocess.__file__).read_text()
    assert len(secret_scanner().candidate_lines(text)) < 10


def test_secret_never_appears_in_outputs_metadata_or_logs(tree, pipeline):
    """Plant every kind of secret; no output file, metadata value or event-log line holds one."""
    files = {f"src/{kind}.py": "x = 1\n" + text for kind, text in SECRETS.items()}
    root = tree({"src/ok.py": "y = 2\n", **files})
    p = pipeline(root)
    p.run("0")
    raw = p.metadata("raw_corpus", "0")
    assert raw["skipped/secret"] == len(SECRETS)
    skipped_files = str(raw["skipped_files"])
    assert all(f"src/{kind}.py" in skipped_files for kind in SECRETS)
    haystacks = [
        str(v)
        for asset in ("training_configs", "raw_corpus", "expanded_corpus")
        for v in p.metadata(asset, "0").values()
    ]
    haystacks += [str(entry) for entry in p.instance.all_logs(p.instance.get_runs()[0].run_id)]
    blobs = [f.read_bytes() for f in p.out.rglob("*") if f.is_file()]
    for kind, value in SECRET_VALUES.items():
        assert not any(value in h for h in haystacks), kind
        assert not any(value.encode() in b for b in blobs), kind


def test_scanner_builds_in_a_fresh_interpreter():
    """Every chosen plugin's patterns combine into one re2 pattern (no plugin update broke it)."""
    code = "from dlm_pipeline.core.secrets import secret_scanner; secret_scanner(True); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_build_raw_corpus_counts_secret_reason_always(tree):
    root = tree({"a.py": "x = 1\n"})
    from dlm_pipeline.core.tree import scan_tree

    result = build_raw_corpus(scan_tree(root), [])
    assert result.skips.get("secret", 0) == 0


def test_secret_entropy_setting_is_parsed_in_settings(monkeypatch):
    from dlm_pipeline import settings
    from dlm_pipeline.defs.resources import SourceTree

    monkeypatch.setenv("DLM_SECRET_ENTROPY", "1")
    assert settings.secret_entropy() is True and SourceTree.from_env().secret_entropy is True
    monkeypatch.setenv("DLM_SECRET_ENTROPY", "0")
    assert settings.secret_entropy() is False
    monkeypatch.setenv("DLM_SECRET_ENTROPY", "maybe")
    with pytest.raises(settings.SettingsError, match="DLM_SECRET_ENTROPY must be 1 or 0"):
        settings.secret_entropy()

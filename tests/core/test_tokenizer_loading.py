"""Loading tokenizers from hostile or odd places: huge files, devices, hub ids, a tokenizer's own
truncation and padding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dlm_pipeline.core.tokenize import MAX_TOKENIZER_BYTES, TokenizerError, is_hub_id, load_tokenizer

HUGE_FILE = """
import resource, sys
from dlm_pipeline.core.tokenize import TokenizerError, load_tokenizer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_tokenizer(sys.argv[1])
except TokenizerError as exc:
    print(exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_huge_tokenizer_file_is_refused_without_reading_it(tmp_path):
    huge = tmp_path / "tokenizer.json"
    with open(huge, "wb") as fh:
        fh.truncate(2 * 1024**3)  # sparse: 2 GiB that take no disk
    done = subprocess.run([sys.executable, "-c", HUGE_FILE, str(huge)], capture_output=True, text=True, check=True)
    message, growth_kib = done.stdout.strip().splitlines()
    assert "over the" in message and f"{MAX_TOKENIZER_BYTES:,}-byte cap" in message
    assert int(growth_kib) < 64 * 1024  # the old code read all 2 GiB


def test_a_device_is_not_a_tokenizer_file():
    with pytest.raises(TokenizerError, match="is not a regular file") as error:
        load_tokenizer("/dev/zero")
    assert "does not exist" not in str(error.value)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "tokenizer.json"
    os.mkfifo(fifo)
    with pytest.raises(TokenizerError, match="is not a regular file"):
        load_tokenizer(str(fifo))
    with pytest.raises(TokenizerError, match="is not a regular file"):
        load_tokenizer(str(tmp_path))  # the directory form reads the same file


def test_hub_ids_are_told_apart_from_paths(tmp_path, monkeypatch):
    assert is_hub_id("gpt2") and is_hub_id("org/name") and is_hub_id("Org-1/name_2.v3")
    for path in ["/org/name", "./org/name", "~/org", "a/b/c", "org/name.json", "org/", "../x"]:
        assert not is_hub_id(path), path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text("{}")
    assert not is_hub_id("org/name")  # an existing path is a path
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("./missing/tokenizer.json")


def test_an_offline_hub_failure_is_one_clear_line():
    code = (
        "from dlm_pipeline.core.tokenize import TokenizerError, load_tokenizer\n"
        "try:\n    load_tokenizer('some-org/some-model')\nexcept TokenizerError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert "'some-org/some-model'" in lines[0] and "hub" in lines[0] and "DLM_TOKENIZER" in lines[0]
    assert "does not exist" not in lines[0]


@pytest.mark.parametrize(
    "setting",
    [
        {"truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}},
        {
            "padding": {
                "strategy": {"Fixed": 512},
                "direction": "Right",
                "pad_to_multiple_of": None,
                "pad_id": 0,
                "pad_type_id": 0,
                "pad_token": "[UNK]",
            }
        },
    ],
)
def test_a_tokenizer_s_own_truncation_or_padding_is_turned_off(tmp_path, setting):
    plain = load_tokenizer()
    spec = {**json.loads(plain.tokenizer.to_str()), **setting}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    loaded = load_tokenizer(str(path), max_seq_len=8)
    assert (loaded.truncation_disabled, loaded.padding_disabled) == ("truncation" in setting, "padding" in setting)
    again = load_tokenizer(str(path), max_seq_len=8)  # parsed once per process: the same answer the second time
    assert (again.truncation_disabled, again.padding_disabled, again.fingerprint) == (
        loaded.truncation_disabled,
        loaded.padding_disabled,
        loaded.fingerprint,
    )
    path.write_text(json.dumps({**spec, "truncation": None, "padding": None}))  # an edited file is parsed again
    assert (load_tokenizer(str(path)).truncation_disabled, load_tokenizer(str(path)).padding_disabled) == (False, False)
    assert loaded.tokenizer.truncation is None and loaded.tokenizer.padding is None
    assert loaded.fingerprint == plain.fingerprint  # the same ids, so the same store namespace
    text = "def f(x):\n    return x + 1  # a line long enough for more than four tokens\n"
    encoded = loaded.encode([text, "x"])
    assert encoded["input_ids"].to_pylist() == [
        plain.tokenizer.encode(t, add_special_tokens=False).ids for t in [text, "x"]
    ]
    assert encoded["n_tokens"].to_pylist()[0] > 8 and encoded["n_tokens"].to_pylist()[1] < 4


def test_encode_calls_hold_a_bounded_number_of_characters(monkeypatch):
    """The tokenizer's per-token objects live until each call's ids are copied out: calls are cut by characters."""
    from dlm_pipeline.core import tokenize

    loaded = tokenize.load_tokenizer()
    texts = ["hello world " * (i * 37 % 500) for i in range(600)]
    whole = loaded.encode(texts)
    monkeypatch.setattr(tokenize, "ENCODE_BATCH_CHARS", 10_000)
    calls = []
    assert loaded.encode(texts, lambda done, total: calls.append(done)).equals(whole)
    assert calls[-1] == len(texts) and len(calls) > sum(map(len, texts)) // 10_000 // 2

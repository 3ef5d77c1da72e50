"""Every config rule of SPEC §1: canonical tags, strict fields, weights bounds, precise locations."""

from __future__ import annotations

import pytest

from dlm_pipeline.core.config import ConfigInvalid, parse_ignore_file, parse_training_config

PATH = "sub/.dlm/training.yaml"


def issues(text: str, **kwargs) -> list[str]:
    with pytest.raises(ConfigInvalid) as caught:
        parse_training_config(text, PATH, **kwargs)
    return [str(i) for i in caught.value.issues]


def test_minimal_config_has_defaults():
    config = parse_training_config("dlm_training_version: 1\n", PATH)
    assert config.include is None
    assert config.exclude == ()
    assert config.exclude_defaults is None
    assert config.metadata == {} and config.weights == {}


def test_full_config_round_trip():
    text = """\
dlm_training_version: 1
include: ["**/*.py", "docs/**"]
exclude: ["**/test_*.py"]
exclude_defaults: false
metadata: {lang: python, generated: "false"}
weights: {lang: {python: 1.5, md: 0.5}, generated: {"true": 0.1}}
"""
    config = parse_training_config(text, PATH)
    assert config.include == ("**/*.py", "docs/**")
    assert config.exclude_defaults is False
    assert config.metadata == {"lang": "python", "generated": "false"}
    assert config.weights == {"lang": {"python": 1.5, "md": 0.5}, "generated": {"true": 0.1}}


@pytest.mark.parametrize(
    "yaml_text, expected_metadata, expected_weights",
    [
        (
            "metadata: {generated: true}\nweights: {generated: {true: 0.1}}",
            {"generated": "true"},
            {"generated": {"true": 0.1}},
        ),
        (
            "metadata: {generated: false}\nweights: {generated: {false: 2}}",
            {"generated": "false"},
            {"generated": {"false": 2.0}},
        ),
        ("metadata: {tier: 1}\nweights: {tier: {1: 3}}", {"tier": "1"}, {"tier": {"1": 3.0}}),
        ("metadata: {1: x}\nweights: {1: {x: 0}}", {"1": "x"}, {"1": {"x": 0.0}}),
        ("metadata: {True: yes_str}", {"true": "yes_str"}, {}),
    ],
)
def test_yaml_scalars_become_canonical_tag_strings(yaml_text, expected_metadata, expected_weights):
    config = parse_training_config("dlm_training_version: 1\n" + yaml_text + "\n", PATH)
    assert config.metadata == expected_metadata
    assert config.weights == expected_weights


def test_bool_and_string_spellings_are_the_same_tag():
    a = parse_training_config("dlm_training_version: 1\nmetadata: {generated: true}\n", PATH)
    b = parse_training_config('dlm_training_version: 1\nmetadata: {generated: "true"}\n', PATH)
    assert a.metadata == b.metadata == {"generated": "true"}


@pytest.mark.parametrize(
    "weight, fragment",
    [
        (".nan", "must be finite"),
        (".inf", "must be finite"),
        ("-.inf", "must be finite"),
        ("-0.5", "must be >= 0"),
        ("true", "must be a number, got bool"),
        ("false", "must be a number, got bool"),
        ("'2'", "must be a number, got str"),
        ("null", "must be a number, got NoneType"),
        ("[1]", "must be a number, got list"),
        ("100.5", "above max_weight 100"),
    ],
)
def test_bad_weights_name_file_line_and_field(weight, fragment):
    text = f"dlm_training_version: 1\nweights:\n  lang:\n    python: {weight}\n"
    (issue,) = issues(text)
    assert issue.startswith(f"{PATH}:4: weights.lang.python: ")
    assert fragment in issue


def test_max_weight_is_configurable():
    text = "dlm_training_version: 1\nweights: {a: {b: 150}}\n"
    assert parse_training_config(text, PATH, max_weight=200).weights == {"a": {"b": 150.0}}
    assert "above max_weight 100" in issues(text)[0]


def test_zero_and_integer_weights_are_valid():
    config = parse_training_config("dlm_training_version: 1\nweights: {a: {b: 0, c: 3}}\n", PATH)
    assert config.weights == {"a": {"b": 0.0, "c": 3.0}}


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ("{a: null}", "null is not a tag"),
        ("{a: ~}", "null is not a tag"),
        ("{a: [1, 2]}", "got a list"),
        ("{a: {b: c}}", "got a dict"),
        ("{a: 1.5}", "is a float; quote it"),
    ],
)
def test_bad_tag_values(metadata, fragment):
    (issue,) = issues(f"dlm_training_version: 1\nmetadata: {metadata}\n")
    assert issue.startswith(f"{PATH}:2: metadata.a: ")
    assert fragment in issue


def test_null_tag_key_is_an_error():
    assert any("null is not a tag" in i for i in issues("dlm_training_version: 1\nmetadata: {~: x}\n"))


def test_unknown_field_is_an_error_with_its_line():
    (issue,) = issues("dlm_training_version: 1\n\nweight: {a: {b: 1}}\n")
    assert issue.startswith(f"{PATH}:3: weight: unknown field")
    assert "weights" in issue  # lists the known fields


def test_weights_scope_is_not_a_config_field():
    assert "unknown field" in issues("dlm_training_version: 1\nweights_scope: global\n")[0]


@pytest.mark.parametrize("version", ["2", "0", "'1'", "true", "1.5"])
def test_version_mismatch(version):
    (issue,) = issues(f"dlm_training_version: {version}\n")
    assert issue.startswith(f"{PATH}:1: dlm_training_version: only version 1 is known")


def test_missing_version():
    (issue,) = issues("metadata: {a: b}\n")
    assert "dlm_training_version: required field is missing" in issue


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n"])
def test_empty_file(text):
    (issue,) = issues(text)
    assert "file is empty" in issue


def test_malformed_yaml_reports_the_line():
    (issue,) = issues("dlm_training_version: 1\nmetadata: {a: b\nweights: {}\n")
    assert issue.startswith(f"{PATH}:")
    assert "malformed YAML" in issue


def test_tabs_and_bad_indentation_are_malformed():
    assert "malformed YAML" in issues("dlm_training_version: 1\nmetadata:\n\t a: b\n")[0]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text):
    assert "top level must be a mapping" in issues(text)[0]


def test_globs_must_be_a_list_of_strings():
    found = issues("dlm_training_version: 1\ninclude: '*.py'\nexclude: [1]\n")
    assert any(i.startswith(f"{PATH}:2: include: expected a list of glob strings") for i in found)
    assert any(i.startswith(f"{PATH}:3: exclude.0: ") for i in found)


def test_exclude_defaults_must_be_a_bool():
    assert issues("dlm_training_version: 1\nexclude_defaults: 'no'\n")[0].startswith(f"{PATH}:2: exclude_defaults:")


def test_duplicate_keys_are_errors():
    found = issues("dlm_training_version: 1\nmetadata:\n  a: x\n  a: y\n")
    assert found == [f"{PATH}:4: metadata.a: key appears twice; keep one"]


def test_keys_colliding_after_canonicalisation_are_errors():
    found = issues("dlm_training_version: 1\nweights: {g: {true: 1, 'true': 2}}\n")
    assert any("weights.g.true: key appears twice" in i for i in found)


def test_every_problem_is_reported_not_just_the_first():
    found = issues("dlm_training_version: 3\nfoo: 1\nweights: {a: {b: -1, c: .nan}}\n")
    assert len(found) == 4


def test_unsafe_yaml_tags_are_refused():
    assert "malformed YAML" in issues("dlm_training_version: !!python/object/apply:os.system ['true']\n")[0]


def test_ignore_file_keeps_patterns_and_negations():
    assert parse_ignore_file("# comment\n*.log\n!keep.log\n\nbuild/\n", "x/.dlm/ignore") == (
        "# comment",
        "*.log",
        "!keep.log",
        "",
        "build/",
    )


def test_alias_bombs_fail_fast_with_short_messages():
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, 9):  # 10**9 leaves if expanded
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    text = "\n".join(lines) + "\ndlm_training_version: 1\nweights: {k: {v: *a8}}\ninclude: *a8\n"
    found = issues(text)
    assert any("weights.k.v: weight must be a number, got list" in i for i in found)
    assert all(len(i) < 400 for i in found)


def test_metadata_keys_are_capped_with_the_line_of_the_field():
    from dlm_pipeline.core.config import MAX_METADATA_KEYS

    keys = ", ".join(f"k{i}: v" for i in range(MAX_METADATA_KEYS + 1))
    found = issues(f"dlm_training_version: 1\n\nmetadata: {{{keys}}}\n")
    assert found == [
        f"{PATH}:3: metadata: {MAX_METADATA_KEYS + 1} tags; at most {MAX_METADATA_KEYS} per config are allowed"
    ]
    ok = ", ".join(f"k{i}: v" for i in range(MAX_METADATA_KEYS))
    assert (
        len(parse_training_config(f"dlm_training_version: 1\nmetadata: {{{ok}}}\n", PATH).metadata) == MAX_METADATA_KEYS
    )


@pytest.mark.parametrize("where", ["key", "value", "weight"])
def test_long_tags_are_refused_with_file_line_field(where):
    from dlm_pipeline.core.config import MAX_TAG_CHARS

    long = "x" * (MAX_TAG_CHARS + 1)
    text = {
        "key": f"dlm_training_version: 1\nmetadata:\n  ok: v\n  {long}: v\n",
        "value": f"dlm_training_version: 1\nmetadata:\n  ok: v\n  lang: {long}\n",
        "weight": f"dlm_training_version: 1\nweights:\n  lang:\n    {long}: 2\n",
    }[where]
    (found,) = issues(text)
    assert found.startswith(f"{PATH}:4: ") and f"at most {MAX_TAG_CHARS} are allowed" in found


def test_many_keys_on_many_files_stay_bounded(tree):
    """Memory grows with files x keys: the cap bounds the keys, so tags cost at most files x cap."""
    from dlm_pipeline.core.config import MAX_METADATA_KEYS
    from dlm_pipeline.core.config_records import load_configs, records_table
    from dlm_pipeline.core.tree import scan_tree

    keys = ", ".join(f"k{i}: v" for i in range(2000))
    root = tree({".dlm/training.yaml": f"dlm_training_version: 1\nmetadata: {{{keys}}}\n", "a.py": "1\n"})
    (record,) = [r for r in load_configs(scan_tree(root)) if r.kind == "training.yaml"]
    assert record.status == "error" and f"at most {MAX_METADATA_KEYS}" in record.error
    assert records_table([record]).num_rows == 1


def test_scan_secrets_is_a_strict_optional_bool():
    assert parse_training_config("dlm_training_version: 1\nscan_secrets: false\n", PATH).scan_secrets is False
    assert parse_training_config("dlm_training_version: 1\n", PATH).scan_secrets is None
    assert issues("dlm_training_version: 1\n\nscan_secrets: 'no'\n") == [
        f"{PATH}:3: scan_secrets: input should be a valid boolean, got str 'no'"
    ]


def test_yaml_1_1_scalars_keep_the_safe_loaders_meaning_canonicalised():
    """What YAML 1.1 (PyYAML's safe loader, as any reader of these files) makes of an unquoted scalar
    is kept and canonicalised as SPEC §1 says: refusing `yes` or `017` made valid configs errors that
    block every seed."""
    text = "dlm_training_version: 1\nmetadata: {zip: 01234, t: 1:30, c: NO, f: on}\nexclude_defaults: yes\n"
    config = parse_training_config(text, PATH)
    assert config.metadata == {"zip": "668", "t": "90", "c": "false", "f": "true"}
    assert config.exclude_defaults is True


def test_plain_and_quoted_spellings_keep_their_meaning():
    text = 'dlm_training_version: 1\nmetadata: {a: "017", b: 12, c: -3, d: True, e: "NO", f: 0}\nweights: {b: {"12": 2.5}}\n'
    config = parse_training_config(text, PATH)
    assert config.metadata == {"a": "017", "b": "12", "c": "-3", "d": "true", "e": "NO", "f": "0"}
    assert config.weights == {"b": {"12": 2.5}}


@pytest.mark.parametrize("version", ["1.0", "+1.0"])
def test_a_version_that_is_not_a_whole_number_is_refused(version):
    assert issues(f"dlm_training_version: {version}\n") == [
        f"{PATH}:1: dlm_training_version: only version 1 is known, got 1.0"
    ]


@pytest.mark.parametrize("separator", ["\u2028", "\x0c", "\x1c", "\x85", "\r"])
def test_ignore_lines_end_at_newlines_only_as_in_git(separator):
    """str.splitlines split `a<U+2028>*.py` into a second pattern `*.py`, which ignored every Python file."""
    assert parse_ignore_file(f"a{separator}*.py\r\n!keep\n", ".dlm/ignore") == (f"a{separator}*.py", "!keep")


# Built at run time, so no scanner flags this file: a GitHub token, an AWS key id, a URL with a password.
GITHUB_TOKEN = "ghp_" + "Ab1" * 12
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
URL_PASSWORD = "postgres://app:" + "hunter2@db.internal/prod"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"metadata: {{lang: python, token: {GITHUB_TOKEN}}}",
            f"{PATH}:2: metadata.token: the value holds a credential (GitHub Token)",
        ),
        (
            f"metadata:\n  lang: python\n  {AWS_KEY_ID}: x",
            f"{PATH}:4: metadata: a key holds a credential (AWS Access Key)",
        ),
        (
            f'weights: {{db: {{"{URL_PASSWORD}": 2}}}}',
            f"{PATH}:2: weights.db: a key holds a credential (Basic Auth Credentials)",
        ),
        (
            f'include: ["src/**", "{URL_PASSWORD}"]',
            f"{PATH}:2: include[1]: the value holds a credential (Basic Auth Credentials)",
        ),
        (
            f"notes: {GITHUB_TOKEN}",
            f"{PATH}:2: notes: the value holds a credential (GitHub Token)",
        ),  # unknown field too
    ],
)
def test_a_credential_in_a_config_string_is_an_error_that_never_shows_it(text, expected):
    found = issues("dlm_training_version: 1\n" + text + "\n")
    assert len(found) == 1 and found[0].startswith(expected), found
    for secret in (GITHUB_TOKEN, AWS_KEY_ID, URL_PASSWORD, "hunter2", GITHUB_TOKEN[:12], AWS_KEY_ID[:8]):
        assert secret not in found[0]


def test_a_credential_is_reported_alone_as_other_messages_quote_values():
    # A too-long tag quotes the start of its value: with a credential in it, only the credential is reported.
    long_tag = GITHUB_TOKEN + "x" * 300
    found = issues(f"dlm_training_version: 1\nmetadata: {{token: {long_tag}, bogus: [1]}}\n")
    assert found == [
        f"{PATH}:2: metadata.token: the value holds a credential (GitHub Token), which would be "
        "copied into the outputs; remove it"
    ]


def test_an_aliased_credential_is_found_and_an_alias_bomb_stays_fast():
    found = issues(f"dlm_training_version: 1\nx: &t {GITHUB_TOKEN}\nmetadata: {{a: *t}}\n")
    assert [f.split(": the")[0] for f in found] == [f"{PATH}:2: x", f"{PATH}:3: metadata.a"]
    bomb = (
        "dlm_training_version: 1\na: &a ["
        + GITHUB_TOKEN
        + "]\n"
        + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        )
    )
    assert len(issues(bomb)) == 1  # each shared list visited once, not 9**8 times


@pytest.mark.parametrize(
    "value",
    [
        "python",
        "md",
        "true",
        "1",
        "src/lib/foo.py",
        "docs/**",
        "1.2.3",
        "v2.0.1-rc1",
        "a1b2c3d",
        "da39a3ee5e6b4b0d3255bfef95601890afd80709",
        "550e8400-e29b-41d4-a716-446655440000",
        "en_US.UTF-8",
        "https://github.com/org/repo",
        "Apache-2.0",
        "owner@example.com",
        "x86_64-linux-gnu",
    ],
)
def test_ordinary_tag_values_keys_and_globs_are_not_credentials(value):
    config = parse_training_config(
        f'dlm_training_version: 1\ninclude: ["{value}"]\nmetadata: {{"{value}": "{value}"}}\n'
        f'weights: {{"{value}": {{"{value}": 2}}}}\n',
        PATH,
    )
    assert config.metadata == {value: value}

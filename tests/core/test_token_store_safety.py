"""The token store never reaches outside itself, survives broken shards and malformed manifests,
follows the umask, and refuses an unusable root with one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import dlm, without_permission_override

from dlm_pipeline.core.corpus import content_key
from dlm_pipeline.core.parquet_io import write_parquet_atomic
from dlm_pipeline.core.token_store import MANIFEST, TokenStore, TokenStoreError
from dlm_pipeline.core.tokenize import chunk_bounds, ids_table, load_tokenizer

TEXTS = [f"value_{i} = {i} * {i}\n" * (1 + i % 3) for i in range(40)]
KEYS = [content_key(t) for t in TEXTS]


def populated(root):
    loaded = load_tokenizer()
    store = TokenStore(root)
    first = store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    return store, loaded, first


def add_entries(store: TokenStore, entries: dict) -> None:
    manifest = json.loads((store.root / MANIFEST).read_text())
    manifest["shards"].update(entries)
    (store.root / MANIFEST).write_text(json.dumps(manifest))


def prune(store: TokenStore) -> dict:
    """What `dlm-pipeline cache prune --max-bytes 0` does."""
    report = store.repair(stale_after=0)
    store.compact(at_shards=1)
    store.evict(max_bytes=0)
    return report


def test_manifest_keys_outside_the_store_are_ignored_and_reported(tmp_path):
    victim = tmp_path / "v" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    store, loaded, _ = populated(tmp_path / "a" / "b" / "cache")
    relative, absolute = "../../../v/victim.txt", str(victim)
    sneaky = f"{loaded.cache_namespace}/../../../v/victim.txt"
    entry = {"rows": 1, "bytes": 1000, "sha256": "0" * 64, "last_used": 0}
    add_entries(store, {relative: entry, absolute: entry, sneaky: entry})
    again = store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    assert again.hits == len(KEYS) and len(again.ignored) == 3
    store.max_bytes = 0
    store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    report = prune(store)
    store.clear()
    assert victim.read_text() == "keep me"
    assert {repr(relative), repr(absolute), repr(sneaky)} <= set(report["ignored"])
    assert set(store.stats()["ignored"]) == {repr(relative), repr(absolute), repr(sneaky)}


def test_a_symlink_at_a_shard_name_is_never_followed_or_deleted(tmp_path):
    victim = tmp_path / "victim.parquet"
    store, loaded, _ = populated(tmp_path / "cache")
    write_parquet_atomic(store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode).table, victim)
    before = victim.read_bytes()
    link = store.root / loaded.cache_namespace / f"shard-{'e' * 32}.parquet"
    link.symlink_to(victim)
    add_entries(
        store,
        {
            f"{loaded.cache_namespace}/{link.name}": {
                "rows": 40,
                "bytes": len(before),
                "sha256": "0" * 64,
                "last_used": 0,
            }
        },
    )
    assert store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode).hits == len(KEYS)
    prune(store)
    store.clear()
    assert victim.read_bytes() == before and link.is_symlink()


@pytest.mark.parametrize("name", ["x", "0123456789abcdef0123456789abcdef"])
def test_symlinked_folders_in_the_store_are_never_followed(tmp_path, name):
    outside = tmp_path / "some" / "dir"
    outside.mkdir(parents=True)
    shard = outside / f"shard-{'f' * 32}.parquet"
    shard.write_bytes(b"not yours")
    temp = outside / f".shard-{'f' * 32}.parquet.abcdef.tmp"
    temp.write_bytes(b"not yours either")
    os.utime(temp, (0, 0))
    store, loaded, _ = populated(tmp_path / "cache")
    (store.root / name).symlink_to(outside)
    report = prune(store)
    store.clear()
    assert shard.read_bytes() == b"not yours" and temp.read_bytes() == b"not yours either"
    assert f"{name!r} (not a namespace folder)" in report["ignored"]
    with pytest.raises(TokenStoreError, match="never follows|not a token store namespace"):
        store.get_or_compute(name, KEYS[:1], TEXTS[:1], loaded.encode)
    assert sorted(p.name for p in outside.iterdir()) == sorted([shard.name, temp.name])


def test_a_lock_symlink_creates_nothing_at_its_target(tmp_path):
    store, loaded, _ = populated(tmp_path / "cache")
    victim = tmp_path / "victim-lock"
    (store.root / ".lock").unlink()
    (store.root / ".lock").symlink_to(victim)
    with pytest.raises(TokenStoreError, match=r"\.lock is a symlink"):
        store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    with pytest.raises(TokenStoreError, match=r"\.lock is a symlink"):
        TokenStore(store.root)
    assert not victim.exists()


def test_a_truncated_shard_is_deleted_and_re_tokenized(tmp_path):
    store, loaded, first = populated(tmp_path / "cache")
    (shard,) = (store.root / loaded.cache_namespace).glob("shard-*.parquet")
    with open(shard, "r+b") as fh:
        fh.truncate(100)
    again = store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    assert again.repaired == [f"{loaded.cache_namespace}/{shard.name}"] and again.misses == len(KEYS)
    assert again.table.equals(first.table)
    assert not shard.exists()


def test_a_shard_with_changed_bytes_fails_its_checksum(tmp_path):
    store, loaded, first = populated(tmp_path / "cache")
    (shard,) = (store.root / loaded.cache_namespace).glob("shard-*.parquet")
    data = bytearray(shard.read_bytes())
    ids = first.table["input_ids"][3].values.to_numpy().astype("<i4").tobytes()  # stored plain: a short text
    data[data.index(ids) + len(ids) // 2] ^= 0x55  # a byte a lookup of every text reads
    shard.write_bytes(bytes(data))
    assert store.repair()["corrupt"] == []  # same size: found when it is read
    again = store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    assert len(again.repaired) == 1 and again.table.equals(first.table)
    manifest = json.loads((store.root / MANIFEST).read_text())["shards"]
    assert all(pq.read_table(store.root / name).num_rows == info["rows"] for name, info in manifest.items())


def test_a_truncated_shard_is_found_by_prune(tmp_path):
    store, loaded, _ = populated(tmp_path / "cache")
    (shard,) = (store.root / loaded.cache_namespace).glob("shard-*.parquet")
    with open(shard, "r+b") as fh:
        fh.truncate(10)
    assert prune(store)["corrupt"] == [f"{loaded.cache_namespace}/{shard.name}"]
    assert store.stats()["shards"] == 0


def test_malformed_manifest_entries_never_break_stats_prune_or_lookups(tmp_path):
    store, loaded, first = populated(tmp_path / "cache")
    ns = loaded.cache_namespace

    def shard(c):
        return f"{ns}/shard-{c * 32}.parquet"

    bad = {
        shard("1"): {"x": 5},
        shard("2"): {"rows": 1, "bytes": "12", "sha256": "0" * 64, "last_used": 0},
        shard("3"): "not a dict",
        shard("4"): {"rows": 10**30, "bytes": 10**30, "sha256": "0" * 64, "last_used": 1e308},
        shard("5"): {"rows": 1, "bytes": 1, "sha256": "0" * 64, "last_used": float("inf")},
        shard("6"): {"rows": True, "bytes": 1, "sha256": "0" * 64, "last_used": 0},
        shard("7"): [1, 2],
    }
    add_entries(store, bad)
    stats = store.stats()
    assert stats["shards"] == 1 and stats["rows"] == len(KEYS) and len(stats["ignored"]) == len(bad)
    assert store.get_or_compute(ns, KEYS, TEXTS, loaded.encode).table.equals(first.table)
    assert len(prune(store)["ignored"]) == len(bad)
    (store.root / MANIFEST).write_text('{"version": 2, "shards": {"a": ' + "9" * 5000 + "}}")  # int too long to parse
    assert store.stats()["shards"] == 0
    assert store.get_or_compute(ns, KEYS, TEXTS, loaded.encode).misses == len(KEYS)
    (store.root / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert store.stats()["shards"] == 0 and store.repair()["adopted"] >= 1


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_and_the_store_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store, loaded, first = populated(tmp_path / "cache")
        out = write_parquet_atomic(first.table, tmp_path / "out" / "0.parquet")
    finally:
        os.umask(old)
    files = [out, store.root / MANIFEST, store.root / ".lock", *(store.root / loaded.cache_namespace).glob("shard-*")]
    assert len(files) == 5  # the output, manifest, lock, one shard and its key index
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((store.root / loaded.cache_namespace).stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("kind", ["file", "devnull", "below_a_file", "fifo", "dangling_symlink", "symlink_loop"])
def test_an_unusable_root_is_one_clear_error(tmp_path, kind):
    (tmp_path / "plain").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "cache")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    root = {
        "file": tmp_path / "plain",
        "devnull": "/dev/null",
        "below_a_file": tmp_path / "plain" / "cache",
        "fifo": tmp_path / "fifo",
        "dangling_symlink": tmp_path / "dangling",
        "symlink_loop": tmp_path / "loop",
    }[kind]
    with pytest.raises(TokenStoreError) as error:
        TokenStore(root)
    message = str(error.value)
    assert str(root) in message and "DLM_CACHE_DIR" in message and "\n" not in message
    assert "File exists" not in message  # what a dangling symlink or a loop said


def test_an_unwritable_root_is_one_clear_error(tmp_path):
    """Root writes everywhere, so as root the store runs without the permission-bypass capabilities."""
    without_override = without_permission_override()
    root = tmp_path / "ro"
    root.mkdir(mode=0o500)
    code = "import sys; from dlm_pipeline.core.token_store import TokenStore; TokenStore(sys.argv[1])"
    done = subprocess.run(
        [*without_override, sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("dlm_pipeline.core.token_store.TokenStoreError:")
        and str(root) in last
        and "DLM_CACHE_DIR" in last
    )


def test_list_offsets_stay_below_the_int32_limit():
    """The boundary logic of encode, with a small limit instead of 2^31-1 ids."""
    import numpy as np

    assert chunk_bounds(np.array([3, 3, 3, 10, 1]), 6) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert chunk_bounds(np.array([], dtype=np.int64), 6) == [(0, 0)]
    assert chunk_bounds(np.array([6, 6]), 6) == [(0, 1), (1, 2)]
    rows = [np.arange(n, dtype=np.int32) for n in [3, 3, 3, 10, 1, 0]]
    table = ids_table(rows, limit=6)
    assert table["input_ids"].num_chunks == 4
    assert all(len(chunk.values) <= 6 or len(chunk) == 1 for chunk in table["input_ids"].chunks)
    assert table["input_ids"].to_pylist() == [r.tolist() for r in rows]
    assert table["n_tokens"].to_pylist() == [3, 3, 3, 10, 1, 0]


def cache_cli(action: list[str], root, tmp_path) -> subprocess.CompletedProcess:
    """`dlm-pipeline cache ...` on the store at `root`, in a subprocess, as a user runs it."""
    return dlm(["cache", *action], tmp_path / "home", DLM_CACHE_DIR=str(root))


def test_a_folder_at_the_manifest_name_is_one_clear_line_for_every_cache_command(tmp_path):
    """It could never be replaced: every write of the manifest failed, with errno text and a temp name."""
    store, loaded, _ = populated(tmp_path / "cache")
    (store.root / MANIFEST).unlink()
    (store.root / MANIFEST).mkdir()
    for action in (["stats"], ["prune"], ["clear"]):
        done = cache_cli(action, store.root, tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip() == (
            f"dlm-pipeline: token cache {store.root} (DLM_CACHE_DIR): {store.root / MANIFEST} is a folder, "
            "not the token store's manifest: remove it"
        )
    assert len(list((store.root / loaded.cache_namespace).glob("shard-*.parquet"))) == 1  # nothing touched


def test_cache_prune_names_a_few_foreign_entries_in_name_order_not_all_of_them(tmp_path):
    store, loaded, _ = populated(tmp_path / "cache")
    for i in range(300):
        (store.root / loaded.cache_namespace / f"junk{i:03d}").write_text("not ours")
    done = cache_cli(["prune"], store.root, tmp_path)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert len(line) < 1000 and "300 foreign entr(y/ies) left alone" in line and "and 295 more" in line
    assert line.index("junk000") < line.index("junk004") and "junk005" not in line
    assert len(list((store.root / loaded.cache_namespace).glob("junk*"))) == 300


def test_a_large_file_at_a_shard_name_is_adopted_or_deleted_in_bounded_memory(tmp_path):
    """A shard the manifest lost is hashed a block at a time (it was read whole: up to 2 GiB)."""
    import tracemalloc

    store, loaded, _ = populated(tmp_path / "cache")
    (shard,) = (store.root / loaded.cache_namespace).glob("shard-*.parquet")
    tail = shard.read_bytes()
    big = shard.with_name(f"shard-{'b' * 32}.parquet")
    with open(big, "wb") as fh:  # 512 MiB of zeros (sparse), then a footer of ours: looks like a shard
        fh.truncate(512 * 2**20)
        fh.seek(512 * 2**20)
        fh.write(tail)
    tracemalloc.start()
    try:
        report = store.repair()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20 and report["adopted"] == 1
    entry = json.loads((store.root / MANIFEST).read_text())["shards"][f"{loaded.cache_namespace}/{big.name}"]
    assert entry["bytes"] == big.stat().st_size


def test_cache_commands_in_a_hostile_folder_finish_and_touch_nothing_outside(tmp_path):
    """Through the CLI, as a user runs it: the manifest a symlink to a file outside, FIFOs at an index
    name, a temp-file name and a namespace name, a shard that is a symlink out: every command ends
    (nothing is opened blocking), and nothing outside the store changes."""
    store, loaded, _ = populated(tmp_path / "cache")
    folder = store.root / loaded.cache_namespace
    victim = tmp_path / "victim.json"
    victim.write_text('{"version": 2, "shards": {}}')
    (store.root / MANIFEST).unlink()
    (store.root / MANIFEST).symlink_to(victim)
    os.mkfifo(folder / f"shard-{'c' * 32}.keys")
    os.mkfifo(folder / f".shard-{'d' * 32}.parquet.abc.tmp")
    os.mkfifo(store.root / ("f" * 32))
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"PAR1 not yours PAR1")
    (folder / f"shard-{'e' * 32}.parquet").symlink_to(outside)
    for action in (["stats"], ["prune", "--max-bytes", "0"], ["clear"]):
        done = cache_cli(action, store.root, tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (action, done.stderr)
    assert victim.read_text() == '{"version": 2, "shards": {}}' and outside.read_bytes() == b"PAR1 not yours PAR1"
    assert stat.S_ISFIFO((store.root / ("f" * 32)).lstat().st_mode)
    assert not list(folder.glob("shard-*.parquet")) or all(p.is_symlink() for p in folder.glob("shard-*.parquet"))


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def lock_held_by_another_process(store: TokenStore) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store.root / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_held_lock_fails_a_bounded_wait_naming_the_holder_and_leaves_unbounded_waits_as_they_were(tmp_path):
    store, loaded, _ = populated(tmp_path / "cache")
    before = sorted(p.name for p in store.root.rglob("*"))
    holder = lock_held_by_another_process(store)
    try:
        bounded = TokenStore(store.root, lock_wait=0.3)
        for action in (bounded.clear, bounded.repair, bounded.compact, bounded.evict):
            with pytest.raises(TokenStoreError) as caught:
                action()
            assert str(caught.value) == (
                f"{store.root / '.lock'} is still held after 0.3 s by process {holder.pid}: a run or a `cache` "
                "command is using the token store; retry when it ends, or stop it"
            )
        assert sorted(p.name for p in store.root.rglob("*")) == before  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    TokenStore(store.root, lock_wait=0.3).clear()  # released: the same call now goes through
    assert not list(store.root.rglob("*.parquet"))


def test_without_a_bound_the_store_waits_for_the_lock_as_before(tmp_path):
    store, loaded, _ = populated(tmp_path / "cache")
    assert store.lock_wait is None  # what runs use
    holder = lock_held_by_another_process(store)
    threading.Timer(0.5, holder.kill).start()
    store.clear()  # blocks until the holder dies, then clears
    holder.wait()
    assert not list(store.root.rglob("*.parquet"))


def test_the_lock_holder_is_another_process_where_the_lock_table_does_not_say(tmp_path):
    from dlm_pipeline.core.token_store import lock_holder

    lock = tmp_path / ".lock"
    lock.write_text("")
    assert lock_holder(lock.stat(), str(tmp_path / "no-such-table")) == "another process"
    table = tmp_path / "locks"
    table.write_text(
        f"1: FLOCK  ADVISORY  WRITE 0 {os.major(lock.stat().st_dev):02x}:{os.minor(lock.stat().st_dev):02x}:{lock.stat().st_ino} 0 EOF\n"
    )
    assert lock_holder(lock.stat(), str(table)) == "another process"  # pid 0: in another pid namespace


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def forge_last_page_header(data: bytes, uncompressed: int) -> bytes:
    """A Parquet file whose last column chunk's first page header declares `uncompressed` bytes (Thrift
    compact: field 1 `type`, field 2 `uncompressed_page_size`, both i32 zigzag varints); the footer's
    compressed sizes of that chunk and row group grow with the header (nothing follows the chunk)."""
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    group = meta.row_group(meta.num_row_groups - 1)
    chunk = group.column(group.num_columns - 1)
    start = chunk.data_page_offset
    size_at = start + 1 + data[start + 1 :].index(b"\x15") + 1  # after field 1's varint, field 2's header
    size_end = size_at + next(i for i, b in enumerate(data[size_at:]) if b < 0x80) + 1
    header = _varint(uncompressed << 1)
    grown = len(header) - (size_end - size_at)
    body = data[:size_at] + header + data[size_end:-8]
    footer_length = int.from_bytes(data[-8:-4], "little")
    footer = body[len(body) - footer_length :]
    for old in {
        chunk.total_compressed_size,
        sum(group.column(c).total_compressed_size for c in range(group.num_columns)),
    }:
        footer = footer.replace(b"\x16" + _varint(old << 1), b"\x16" + _varint((old + grown) << 1))
    return body[: len(body) - footer_length] + footer + len(footer).to_bytes(4, "little") + b"PAR1"


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_page_header_declaring_2_gib_is_a_corrupt_shard_in_bounded_memory(tmp_path):
    """pyarrow sizes a compressed page's buffer by its header (its pool's peak reaches 2 GiB) but touches
    only what decompresses, then fails the page: the shard is deleted and its texts tokenized again.
    (The footer's sizes are not what pyarrow trusts, so checking them bounds nothing.)"""
    store, loaded, _ = populated(tmp_path / "cache")
    manifest = json.loads((store.root / MANIFEST).read_text())
    ((name, info),) = manifest["shards"].items()
    shard = store.root / name
    data = forge_last_page_header(shard.read_bytes(), 2**31 - 1)
    last = pq.ParquetFile(pa.BufferReader(data)).metadata
    assert last.num_rows == len(KEYS)  # still a readable footer: only the page header lies
    shard.write_bytes(data)
    shard.with_suffix(".keys").unlink()  # the index is rebuilt from the whole shard: every page is decoded
    manifest["shards"][name] = {**info, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (store.root / MANIFEST).write_text(json.dumps(manifest))
    before = rss_bytes()
    again = TokenStore(store.root).get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    assert again.repaired == [name] and again.table.num_rows == len(KEYS)
    assert rss_bytes() - before < 256 * 2**20

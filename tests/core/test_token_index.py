"""The token store's key index: a lookup reads only the row groups holding the wanted keys, and an
index file that lies (garbage, truncated, another shard's, a symlink, rows pointing elsewhere)
never breaks a lookup, never makes it read outside the store, and is rebuilt."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from dlm_pipeline.core import token_index
from dlm_pipeline.core.corpus import content_key
from dlm_pipeline.core.token_store import NOT_IN_STORE, SHARD_CORRUPT, TokenStore
from dlm_pipeline.core.tokenize import load_tokenizer

TEXTS = [f"x_{i} = {i}\n" for i in range(3000)]
KEYS = [content_key(t) for t in TEXTS]


@pytest.fixture(scope="module")
def loaded():
    return load_tokenizer()


@pytest.fixture
def old_layout(monkeypatch):
    """Shards written as before each text's ids were packed on their own (a compressed list column):
    every lookup reads whole row groups."""
    from dlm_pipeline.core import token_store
    from dlm_pipeline.core.parquet_io import PARQUET_OPTIONS

    monkeypatch.setattr(token_store, "SHARD_WRITE_OPTIONS", {**PARQUET_OPTIONS, "write_statistics": False})
    monkeypatch.setattr(token_store, "_as_stored", lambda table, _lengths: table)
    return monkeypatch


def index_header(data: bytes) -> tuple[dict, int]:
    """(the header of an index file, where its arrays start)."""
    import json

    length = int.from_bytes(data[8:16], "little")
    return json.loads(data[16 : 16 + length]), 16 + length + (-(16 + length) % 8)


def two_shards(root, loaded):
    """A store with the first 2,000 texts in one shard (8 row groups) and the next 500 in another."""
    store = TokenStore(root)
    store.get_or_compute(loaded.cache_namespace, KEYS[:2000], TEXTS[:2000], loaded.encode)
    store.get_or_compute(loaded.cache_namespace, KEYS[2000:2500], TEXTS[2000:2500], loaded.encode)
    folder = store.root / loaded.cache_namespace
    big, small = sorted(folder.glob("shard-*.parquet"), key=lambda p: -p.stat().st_size)
    return store, folder, big, small


def test_a_lookup_reads_only_the_row_groups_holding_the_keys(tmp_path, loaded):
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    assert len(list(folder.glob("shard-*.keys"))) == 2
    one = store.get_or_compute(loaded.cache_namespace, [KEYS[1500]], [TEXTS[1500]], loaded.encode)
    assert (one.hits, one.misses) == (1, 0) and one.table["content_key"].to_pylist() == [KEYS[1500]]
    assert {name.split("/")[1] for name in one.shards_used} == {big.name}
    assert 0 < one.shard_bytes_read < big.stat().st_size / 4  # the footer and one row group of eight
    spread = [0, 700, 2100]  # two row groups of the big shard, one of the small
    lookup = store.get_or_compute(loaded.cache_namespace, [KEYS[i] for i in spread], ["?"] * 3, loaded.encode)
    assert lookup.hits == 3 and lookup.table["content_key"].to_pylist() == [KEYS[i] for i in spread]
    assert lookup.shard_bytes_read < big.stat().st_size / 2 + small.stat().st_size
    direct = loaded.encode([TEXTS[i] for i in spread])
    assert lookup.table["input_ids"].to_pylist() == direct["input_ids"].to_pylist()
    everything = store.get_or_compute(loaded.cache_namespace, KEYS[:2500], TEXTS[:2500], loaded.encode)
    assert everything.hits == 2500 and everything.shard_bytes_read <= big.stat().st_size + small.stat().st_size


def test_keys_not_in_the_store_read_no_shard_and_say_why_they_were_tokenized(tmp_path, loaded):
    store, *_ = two_shards(tmp_path / "cache", loaded)
    lookup = store.get_or_compute(loaded.cache_namespace, KEYS[2500:2510], TEXTS[2500:2510], loaded.encode)
    assert lookup.misses == 10 and lookup.shard_bytes_read == 0 and not lookup.repaired
    assert lookup.reasons == dict.fromkeys(KEYS[2500:2510], NOT_IN_STORE)


@pytest.mark.parametrize(
    "damage",
    ["garbage", "empty", "truncated", "other_shard", "rows_elsewhere", "huge_header", "unsorted"],
)
def test_a_lying_index_is_rebuilt_and_lookups_stay_right(tmp_path, loaded, damage):
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    index = big.with_suffix(".keys")
    good = index.read_bytes()
    other = small.with_suffix(".keys").read_bytes()
    start = len(good) - 12 * 2000  # the key prefixes, then the rows
    bad = {
        "garbage": os.urandom(5000),
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "other_shard": other,
        "rows_elsewhere": good[: start + 8 * 2000]
        + np.roll(np.frombuffer(good[start + 8 * 2000 :], "<u4"), 1).tobytes(),
        "huge_header": token_index.MAGIC + (2**62).to_bytes(8, "little") + good[16:],
        "unsorted": good[:start] + good[start : start + 8 * 2000][::-1] + good[start + 8 * 2000 :],
    }[damage]
    index.write_bytes(bad)
    wanted = list(range(0, 2500, 7))
    lookup = store.get_or_compute(
        loaded.cache_namespace, [KEYS[i] for i in wanted], [TEXTS[i] for i in wanted], loaded.encode
    )
    assert lookup.table["content_key"].to_pylist() == [KEYS[i] for i in wanted]
    assert lookup.table["input_ids"].to_pylist() == loaded.encode([TEXTS[i] for i in wanted])["input_ids"].to_pylist()
    assert not lookup.repaired
    if damage != "unsorted":  # a sorted-looking lie is caught; a reordered one only costs misses (re-tokenized)
        assert lookup.misses == 0 and index.read_bytes() == good


def test_an_index_symlink_is_never_followed_and_an_orphan_index_is_removed(tmp_path, loaded):
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    outside = tmp_path / "outside.keys"
    outside.write_bytes(big.with_suffix(".keys").read_bytes())
    big.with_suffix(".keys").unlink()
    big.with_suffix(".keys").symlink_to(outside)
    lookup = store.get_or_compute(loaded.cache_namespace, KEYS[:10], TEXTS[:10], loaded.encode)
    assert lookup.hits == 10 and outside.read_bytes() and not big.with_suffix(".keys").is_symlink()
    orphan = folder / ("shard-" + "a" * 32 + ".keys")
    orphan.write_bytes(b"left by a killed run")
    report = store.repair()
    assert not orphan.exists() and not report["ignored"]
    store.clear()
    assert not list(folder.glob("*")) if folder.exists() else True
    assert outside.exists()


def test_a_corrupt_row_group_deletes_the_shard_and_names_the_reason(tmp_path, loaded, old_layout):
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    data = bytearray(small.read_bytes())
    data[len(data) // 3] ^= 0x55  # same size: found by the row group's checksum
    small.write_bytes(bytes(data))
    lookup = store.get_or_compute(loaded.cache_namespace, KEYS[2100:2105], TEXTS[2100:2105], loaded.encode)
    assert len(lookup.repaired) == 1 and lookup.misses == 5 and not small.exists()
    assert not small.with_suffix(".keys").exists()
    assert lookup.reasons == dict.fromkeys(KEYS[2100:2105], SHARD_CORRUPT)
    assert lookup.table["input_ids"].to_pylist() == loaded.encode(TEXTS[2100:2105])["input_ids"].to_pylist()


def test_key_prefixes_are_vectorised_and_refuse_what_is_not_hex():
    keys = pa.array([KEYS[0], "ABCDEF" + KEYS[0][6:], "short", None, KEYS[1]])
    values, valid = token_index.key_prefixes(keys)
    assert valid.tolist() == [True, False, False, False, True]
    assert int(values[0]) == int(KEYS[0][:16], 16) and int(values[4]) == int(KEYS[1][:16], 16)


def test_row_group_checksums_ending_in_zero_bytes_verify(tmp_path, loaded, monkeypatch):
    """numpy's bytes type drops trailing NULs; a checksum read that way fails one group in 256."""
    import hashlib

    from dlm_pipeline.core import token_store

    monkeypatch.setattr(token_store, "GROUP_MAX_ROWS", 4)
    store = TokenStore(tmp_path / "cache")
    store.get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    (shard,) = (store.root / loaded.cache_namespace).glob("shard-*.parquet")
    data = shard.read_bytes()
    info = store.stats()
    index = token_index.KeyIndex.parse(
        shard.with_suffix(".keys").read_bytes(),
        store._entries(store._read_manifest())[0][f"{loaded.cache_namespace}/{shard.name}"],
    )
    digests = [
        hashlib.sha256(data[s : s + n]).digest() for s, n in zip(index.group_starts, index.group_lengths, strict=True)
    ]
    assert len(digests) == 750 and any(d.endswith(b"\0") for d in digests) and info["shards"] == 1
    again = store.get_or_compute(loaded.cache_namespace, KEYS[::-1], TEXTS[::-1], loaded.encode)
    assert again.hits == len(KEYS) and not again.repaired


def test_a_shard_written_before_the_index_gets_one_on_first_use(tmp_path, loaded):
    """An old shard (one large row group, no key index), adopted by repair, hits and gets an index."""
    import pyarrow.parquet as pq

    from dlm_pipeline.core.token_store import STORE_SCHEMA

    encoded = loaded.encode(TEXTS[:500])
    table = pa.table(
        {"content_key": KEYS[:500], "input_ids": encoded["input_ids"], "n_tokens": encoded["n_tokens"]},
        schema=STORE_SCHEMA,
    )
    folder = tmp_path / "cache" / loaded.cache_namespace
    folder.mkdir(parents=True)
    old = folder / ("shard-" + "b" * 32 + ".parquet")
    pq.write_table(table, old, use_dictionary=["content_key"], compression="zstd")
    store = TokenStore(tmp_path / "cache")
    lookup = store.get_or_compute(loaded.cache_namespace, KEYS[100:110], TEXTS[100:110], loaded.encode)
    assert lookup.hits == 10 and old.with_suffix(".keys").exists()
    assert lookup.table["input_ids"].to_pylist() == table["input_ids"].to_pylist()[100:110]


@pytest.mark.parametrize("damage", ["group_checksum", "footer_checksum", "group_start", "group_start_negative"])
def test_an_index_with_wrong_checksums_or_ranges_is_rebuilt_and_never_deletes_its_good_shard(
    tmp_path, loaded, damage, old_layout
):
    """Row groups that fail the checksums of their index prove nothing about the shard: the index is
    rebuilt from the whole shard (verified), and the shard keeps its texts (it was deleted before).
    (Row groups read whole: shards with compressed ids; the per-text ranges are tested below.)"""
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    index = big.with_suffix(".keys")
    good = index.read_bytes()
    data = bytearray(good)
    header, start = index_header(good)
    if damage == "group_checksum":
        data[start + 32 * header["groups"]] ^= 1
    elif damage == "footer_checksum":
        at = data.index(header["footer"][2].encode())
        data[at : at + 1] = b"0" if data[at : at + 1] != b"0" else b"1"
    elif damage == "group_start":
        data[start] ^= 1
    else:
        data[start : start + 8] = (2**64 - 1).to_bytes(8, "little")
    index.write_bytes(bytes(data))
    lookup = store.get_or_compute(loaded.cache_namespace, KEYS[:5], TEXTS[:5], loaded.encode)
    assert (lookup.hits, lookup.misses, lookup.repaired) == (5, 0, [])
    assert big.exists() and index.read_bytes() == good


def test_a_folder_or_fifo_at_an_index_name_never_fails_a_lookup(tmp_path, loaded):
    """The rebuilt index could not be saved over a folder (IsADirectoryError ended the lookup); it is
    used unsaved, and a FIFO there is replaced without ever being opened blocking."""
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    big.with_suffix(".keys").unlink()
    big.with_suffix(".keys").mkdir()
    small.with_suffix(".keys").unlink()
    os.mkfifo(small.with_suffix(".keys"))
    lookup = store.get_or_compute(loaded.cache_namespace, KEYS[:2500:50], TEXTS[:2500:50], loaded.encode)
    assert (lookup.hits, lookup.misses, lookup.repaired) == (50, 0, [])
    assert big.with_suffix(".keys").is_dir() and small.with_suffix(".keys").is_file()


def parsed_index(store, shard):
    entry = store._entries(store._read_manifest())[0][f"{shard.parent.name}/{shard.name}"]
    return token_index.KeyIndex.parse(shard.with_suffix(".keys").read_bytes(), entry)


def value_range(index, row):
    """(start, length) of a row's packed ids in its shard, from its index."""
    group = int(index.group_of(np.array([row]))[0])
    before = int(index.stored_before[row]) - int(index.stored_before[index.group_first_rows[group]])
    length = int(index.stored_before[row + 1]) - int(index.stored_before[row]) - 4
    return int(index.packed_starts[group]) + before + 4, length


def test_a_lookup_reads_only_the_ids_of_the_texts_it_asks_for(tmp_path, loaded):
    """Scattered keys read each text's own packed ids (a byte range checked with its key), not its row
    group: bytes read = the packed sizes of the texts asked for, whatever the shard holds besides."""
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    for shard in (big, small):
        assert (parsed_index(store, shard).packed_starts != 0).all()  # every group's values can be read alone
    spread = [0, 700, 1500, 2100]  # three row groups of the big shard, one of the small
    n_ids = loaded.encode([TEXTS[i] for i in spread])["n_tokens"].to_numpy()
    sizes = [value_range(parsed_index(store, big if i < 2000 else small), i % 2000)[1] for i in spread]
    lookup = store.get_or_compute(loaded.cache_namespace, [KEYS[i] for i in spread], ["?"] * 4, loaded.encode)
    assert lookup.hits == 4 and lookup.shard_bytes_read == sum(sizes) <= 4 * int(n_ids.sum())
    assert lookup.table["input_ids"].to_pylist() == loaded.encode([TEXTS[i] for i in spread])["input_ids"].to_pylist()
    lengths = store.get_or_compute(
        loaded.cache_namespace, [KEYS[i] for i in spread], ["?"] * 4, loaded.encode, lengths_only=True
    )
    assert lengths.table.column_names == ["content_key", "n_tokens"]
    assert lengths.table["n_tokens"].to_numpy().tolist() == n_ids.tolist()
    assert lengths.shard_bytes_read == sum(sizes)  # the ids are still read, to be checked
    everything = store.get_or_compute(loaded.cache_namespace, KEYS[:2500], TEXTS[:2500], loaded.encode)
    assert everything.hits == 2500 and everything.shard_bytes_read < big.stat().st_size + small.stat().st_size
    assert everything.table["input_ids"].to_pylist() == loaded.encode(TEXTS[:2500])["input_ids"].to_pylist()


def test_a_flipped_bit_in_a_texts_ids_is_never_returned(tmp_path, loaded):
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    start, length = value_range(parsed_index(store, small), 102)
    data = bytearray(small.read_bytes())
    data[start + length - 1] ^= 0x01  # the last byte of KEYS[2102]'s ids: same size, its range still in place
    small.write_bytes(bytes(data))
    lookup = store.get_or_compute(loaded.cache_namespace, KEYS[2100:2105], TEXTS[2100:2105], loaded.encode)
    assert lookup.repaired == [f"{loaded.cache_namespace}/{small.name}"] and lookup.misses == 5
    assert not small.exists() and not small.with_suffix(".keys").exists()
    assert lookup.reasons == dict.fromkeys(KEYS[2100:2105], SHARD_CORRUPT)
    assert lookup.table["input_ids"].to_pylist() == loaded.encode(TEXTS[2100:2105])["input_ids"].to_pylist()


@pytest.mark.parametrize("damage", ["packed_start", "stored_before", "count", "row_checksum", "packed_start_outside"])
def test_a_lie_in_the_per_text_ranges_is_rebuilt_and_never_deletes_its_good_shard(tmp_path, loaded, damage):
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    index = big.with_suffix(".keys")
    good = index.read_bytes()
    data = bytearray(good)
    header, start = index_header(good)
    groups, rows = header["groups"], header["rows"]
    before = start + 64 * groups
    if damage == "packed_start":
        data[start + 24 * groups] ^= 4  # group 0's values start four bytes off: still inside the group
    elif damage == "stored_before":
        data[before + 4 * 3] ^= 1  # row 3's value begins a byte later
    elif damage == "count":
        data[before + 4 * (rows + 1) + 4 * 3] ^= 1  # row 3 holds one id more or less
    elif damage == "row_checksum":
        data[before + 8 * rows + 8 + 16 * 3] ^= 1
    else:
        data[start + 24 * groups : start + 24 * groups + 8] = (2**63).to_bytes(8, "little")
    index.write_bytes(bytes(data))
    lookup = store.get_or_compute(loaded.cache_namespace, KEYS[:5], TEXTS[:5], loaded.encode)
    assert (lookup.hits, lookup.misses, lookup.repaired) == (5, 0, [])
    assert lookup.table["input_ids"].to_pylist() == loaded.encode(TEXTS[:5])["input_ids"].to_pylist()
    assert big.exists() and index.read_bytes() == good


def test_two_keys_sharing_the_searched_prefix_never_pass_for_each_other(tmp_path, loaded):
    """The index searches 64-bit key prefixes; a row read by its range is checked with the full key."""
    store = TokenStore(tmp_path / "cache")
    keys = ["0123456789abcdef" + "0" * 48, "0123456789abcdef" + "1" * 48]
    store.get_or_compute(loaded.cache_namespace, keys, ["first = 1\n", "second = 2\n"], loaded.encode)
    for key, text in zip(keys, ["first = 1\n", "second = 2\n"], strict=True):
        lookup = store.get_or_compute(loaded.cache_namespace, [key], ["?"], loaded.encode)
        assert (lookup.hits, lookup.repaired) == (1, [])
        assert lookup.table["input_ids"].to_pylist() == loaded.encode([text])["input_ids"].to_pylist()


def v1_index(today: bytes) -> bytes:
    """The key index as the store wrote it before the per-text ranges (DLMKEYS1), from today's:
    the same header, the row groups' start, length and first row and checksums, then the keys."""
    header, start = index_header(today)
    groups, keys = header["groups"], header["keys"]
    row_groups = today[start : start + 24 * groups] + today[start + 32 * groups : start + 64 * groups]
    return b"DLMKEYS1" + today[8:start] + row_groups + today[len(today) - 12 * keys :]


def test_a_shard_and_index_of_the_previous_layout_still_answer(tmp_path, loaded, old_layout):
    """A shard with compressed ids and its DLMKEYS1 index: the index is rebuilt once (ranges of no
    group: its ids are not plain) and lookups read whole row groups, checked, as before."""
    store, folder, big, small = two_shards(tmp_path / "cache", loaded)
    old_layout.undo()
    for shard in (big, small):
        shard.with_suffix(".keys").write_bytes(v1_index(shard.with_suffix(".keys").read_bytes()))
    store = TokenStore(tmp_path / "cache")
    spread = [0, 700, 2100]
    for _ in range(2):
        lookup = store.get_or_compute(loaded.cache_namespace, [KEYS[i] for i in spread], ["?"] * 3, loaded.encode)
        assert (lookup.hits, lookup.repaired) == (3, [])
        assert (
            lookup.table["input_ids"].to_pylist() == loaded.encode([TEXTS[i] for i in spread])["input_ids"].to_pylist()
        )
        index = parsed_index(store, big)
        assert not index.packed_starts.any() and big.with_suffix(".keys").read_bytes()[:8] == token_index.MAGIC
    assert lookup.shard_bytes_read >= index.group_lengths[index.group_of(np.array([0, 700]))].sum()  # whole groups


LONG_TEXTS = [f"value_{i} = {i} * {i}\n" * 40 for i in range(30)]  # ~400 ids each: stored as zstd frames
LONG_KEYS = [content_key(t) for t in LONG_TEXTS]
HUGE = 2**31 - 1  # an id count a forger writes: 8 GiB of int32 were it ever sized by


def peak_bytes(run):
    """(what `run()` returns, the most memory Python and numpy held meanwhile): an allocation sized by a
    forged count shows here even where the OS would hand out untouched pages."""
    import tracemalloc

    tracemalloc.start()
    try:
        return run(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def long_store(root, loaded, store=None):
    store = store or TokenStore(root)
    first = store.get_or_compute(loaded.cache_namespace, LONG_KEYS, LONG_TEXTS, loaded.encode)
    (shard,) = (store.root / loaded.cache_namespace).glob("shard-*.parquet")
    return store, first, shard


def forge_shard(store, shard, change) -> None:
    """Rewrite a shard as the store writes one, with `change(table)` applied to its rows as stored, then
    its key index and its manifest entry to match: every checksum agrees with the forged bytes."""
    import hashlib
    import io
    import json

    import pyarrow.parquet as pq

    from dlm_pipeline.core.token_store import GROUP_MAX_ROWS, MANIFEST, SHARD_WRITE_OPTIONS

    table = change(pq.read_table(shard))
    sink = io.BytesIO()
    pq.write_table(table, sink, use_dictionary=False, row_group_size=GROUP_MAX_ROWS, **SHARD_WRITE_OPTIONS)
    data = sink.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    shard.write_bytes(data)
    shard.with_suffix(".keys").write_bytes(token_index.build(data, table, digest))
    manifest = json.loads((store.root / MANIFEST).read_text())
    manifest["shards"][f"{shard.parent.name}/{shard.name}"].update(rows=table.num_rows, bytes=len(data), sha256=digest)
    (store.root / MANIFEST).write_text(json.dumps(manifest))


def with_count(row: int, count: int):
    def change(table):
        counts = table["n_tokens"].to_pylist()
        counts[row] = count
        return table.set_column(table.column_names.index("n_tokens"), "n_tokens", pa.array(counts, pa.int32()))

    return change


@pytest.mark.parametrize("lengths_only", [False, True])
def test_a_forged_shard_index_and_manifest_agreeing_on_a_huge_id_count_are_repaired_in_bounded_memory(
    tmp_path, loaded, lengths_only
):
    """Shard, index and manifest all say a text holds 2^31-1 ids (every checksum matches): the count is
    over what any text may have, so the shard is corrupt: deleted, its texts tokenized again; nothing is
    ever sized by the count, and no lookup answers with it."""
    store, first, shard = long_store(tmp_path / "cache", loaded)
    forge_shard(store, shard, with_count(3, HUGE))
    lookup, peak = peak_bytes(
        lambda: store.get_or_compute(
            loaded.cache_namespace, LONG_KEYS, LONG_TEXTS, loaded.encode, lengths_only=lengths_only
        )
    )
    assert peak < 64 * 2**20
    assert lookup.repaired == [f"{loaded.cache_namespace}/{shard.name}"] and not shard.exists()
    assert lookup.table["n_tokens"].equals(first.table["n_tokens"])
    if not lengths_only:
        assert lookup.table["input_ids"].equals(first.table["input_ids"])


def test_a_huge_id_count_forged_in_the_index_alone_never_sizes_a_read(tmp_path, loaded):
    """Only the index lies (its row checksum recomputed for the forged count): the good shard answers,
    read the checked way, and the index is rebuilt."""
    store, first, shard = long_store(tmp_path / "cache", loaded)
    good = shard.with_suffix(".keys").read_bytes()
    data = bytearray(good)
    header, start = index_header(good)
    rows, at = header["rows"], start + 64 * header["groups"]
    row = 3
    index = parsed_index(store, shard)
    value_start, length = value_range(index, row)
    value = shard.read_bytes()[value_start : value_start + length]
    assert len(value) < 4 * int(index.counts[row])  # a zstd frame: what a forged count would size
    data[at + 4 * (rows + 1) + 4 * row : at + 4 * (rows + 1) + 4 * row + 4] = HUGE.to_bytes(4, "little")
    digests = at + 8 * rows + 8 + token_index.ROW_DIGEST_BYTES * row
    data[digests : digests + token_index.ROW_DIGEST_BYTES] = token_index.row_digest(
        LONG_KEYS[row].encode(), HUGE, value
    )
    shard.with_suffix(".keys").write_bytes(bytes(data))
    lookup, peak = peak_bytes(
        lambda: store.get_or_compute(loaded.cache_namespace, LONG_KEYS, LONG_TEXTS, loaded.encode)
    )
    assert peak < 64 * 2**20
    assert (lookup.hits, lookup.repaired) == (30, []) and lookup.table.equals(first.table)
    assert shard.with_suffix(".keys").read_bytes() == good


def test_a_text_with_more_ids_than_a_text_may_have_is_returned_but_never_stored(tmp_path, loaded):
    """A store for texts of at most 10 bytes holds at most 4 * 10 + 4096 ids per text: a longer one
    is tokenized every time (what it holds could not be told from a forged count)."""
    store = TokenStore(tmp_path / "cache", max_text_bytes=10)
    assert store.max_text_ids == 4 * 10 + token_index.EXTRA_TEXT_IDS
    texts = ["short = 1\n", "x " * 5000]
    keys = [content_key(t) for t in texts]
    expected = loaded.encode(texts)
    assert expected["n_tokens"][1].as_py() > store.max_text_ids
    for _ in range(2):
        lookup = store.get_or_compute(loaded.cache_namespace, keys, texts, loaded.encode)
        assert lookup.table["input_ids"].equals(expected["input_ids"]) and not lookup.repaired
    assert (lookup.hits, lookup.misses, store.stats()["rows"]) == (1, 1, 1)


def test_compaction_never_sizes_a_merge_by_a_forged_count(tmp_path, loaded):
    store, first, shard = long_store(tmp_path / "cache", loaded)
    forge_shard(store, shard, with_count(3, HUGE))
    store.get_or_compute(loaded.cache_namespace, KEYS[:10], TEXTS[:10], loaded.encode)  # a second, good shard
    merged, peak = peak_bytes(lambda: store.compact(at_shards=1))
    assert peak < 64 * 2**20 and merged == 0 and not shard.exists()
    again = store.get_or_compute(loaded.cache_namespace, KEYS[:10], TEXTS[:10], loaded.encode)
    assert again.hits == 10


def test_a_forged_row_count_in_manifest_and_index_never_sizes_the_index_arrays(tmp_path, loaded):
    """Manifest and index claim 2^31 rows in 2^24 row groups (the index a sparse file of that size):
    over the row groups any Parquet footer can list, so the index is not used; rebuilt from the shard,
    it does not match the manifest, so the entry is corrupt and its texts are tokenized again."""
    import json

    from dlm_pipeline.core.token_store import MANIFEST

    store, first, shard = long_store(tmp_path / "cache", loaded)
    name = f"{loaded.cache_namespace}/{shard.name}"
    manifest = json.loads((store.root / MANIFEST).read_text())
    manifest["shards"][name]["rows"] = rows = 2**31
    (store.root / MANIFEST).write_text(json.dumps(manifest))
    good = shard.with_suffix(".keys").read_bytes()
    header, _ = index_header(good)
    header.update(rows=rows, groups=2**24, keys=0)
    encoded = json.dumps(header, sort_keys=True).encode()
    head = token_index.MAGIC + len(encoded).to_bytes(8, "little") + encoded
    head += b"\0" * (-len(head) % 8)
    with open(shard.with_suffix(".keys"), "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + 64 * 2**24 + (8 + token_index.ROW_DIGEST_BYTES) * rows + 8)
    lookup, peak = peak_bytes(
        lambda: store.get_or_compute(loaded.cache_namespace, LONG_KEYS, LONG_TEXTS, loaded.encode)
    )
    assert peak < 64 * 2**20
    assert lookup.repaired == [name] and lookup.misses == 30 and lookup.table.equals(first.table)


def test_many_texts_each_claiming_ids_within_the_store_bound_are_bounded_by_their_own_size(tmp_path, loaded):
    """Every row of a forged shard is a real zstd frame of 2^20 ids (4 MiB, a few hundred bytes stored),
    under the store's per-text bound but far over what a text of ~640 bytes can have: no lookup decodes
    them (it decoded 30 x 4 MiB, and a lookup of many keys any multiple of that)."""
    frame = pa.Codec("zstd").compress(bytes(4 * 2**20), asbytes=True)

    def bombs(table):
        n = table.num_rows
        table = table.set_column(table.column_names.index("n_tokens"), "n_tokens", pa.array([2**20] * n, pa.int32()))
        return table.set_column(
            table.column_names.index(token_index.PACKED), token_index.PACKED, pa.array([frame] * n, pa.binary())
        )

    store, first, shard = long_store(tmp_path / "cache", loaded)
    assert 2**20 < store.max_text_ids and len(frame) < 4096
    forge_shard(store, shard, bombs)
    lookup, peak = peak_bytes(
        lambda: store.get_or_compute(loaded.cache_namespace, LONG_KEYS, LONG_TEXTS, loaded.encode)
    )
    assert peak < 64 * 2**20
    assert lookup.repaired == [f"{loaded.cache_namespace}/{shard.name}"] and lookup.table.equals(first.table)


def test_a_shard_grown_past_its_manifest_size_is_never_read_whole(tmp_path, loaded):
    """Compaction (no repair before it) met a shard replaced by a 512 MiB sparse file: it read it
    whole before comparing sizes."""
    store, first, shard = long_store(tmp_path / "cache", loaded)
    store.get_or_compute(loaded.cache_namespace, KEYS[:10], TEXTS[:10], loaded.encode)  # a second shard
    with open(shard, "r+b") as fh:
        fh.truncate(512 * 2**20)
    merged, peak = peak_bytes(lambda: store.compact(at_shards=1))
    assert peak < 64 * 2**20 and merged == 0 and not shard.exists()

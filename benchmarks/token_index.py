"""Token store lookups through the key index vs a plain scan of every shard, on a large namespace.

    python benchmarks/token_index.py [--entries 10000000] [--shard-entries 1000000] [--lookup 10000]

Builds one namespace of --entries entries through `TokenStore.get_or_compute` (random content keys,
1-8 ids each, so the store stays a few hundred MB; the tokenizer is not involved), then times
lookups of --lookup keys:
- `clustered`: keys written together (what a seed's re-run, a new seed or a weights edit asks for);
- `random`: keys drawn uniformly from the whole namespace (a separate read per key);
- `absent`: keys the store does not hold (a cold run's question);
- `index only`: finding where the random keys are (the key indexes alone, no shard read).
Baseline, in the same run: the plain scan the store did before the index (read every shard of the
namespace whole, check its sha256, find the keys with `pyarrow.compute.index_in`). Times are wall
clock and, beside them, this process's CPU time (user + system: less disturbed by other jobs on a
loaded machine; the reads come from the page cache).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlm_pipeline.core import token_index
from dlm_pipeline.core.token_store import TokenStore

NAMESPACE = hashlib.sha256(b"benchmark").hexdigest()[:32]
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def random_keys(rng: np.random.Generator, n: int) -> pa.Array:
    """n random 64-digit lowercase hex strings, built without Python strings."""
    nibbles = rng.integers(0, 16, size=(n, 64), dtype=np.uint8)
    offsets = np.arange(0, 64 * (n + 1), 64, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(HEX[nibbles].tobytes()))


def fake_ids(rng: np.random.Generator, n: int) -> pa.Table:
    lengths = rng.integers(1, 9, size=n).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(0, 8192, size=int(offsets[-1])).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table({"input_ids": ids, "n_tokens": pa.array(lengths)})


def build(store: TokenStore, entries: int, per_shard: int, lookup: int, rng: np.random.Generator):
    """Fill the namespace; returns (a clustered sample, a random sample) of stored keys."""
    wanted = np.sort(rng.choice(entries, size=lookup, replace=False))
    sampled, clustered = [], None
    for start in range(0, entries, per_shard):
        n = min(per_shard, entries - start)
        keys = random_keys(rng, n)
        encoded = fake_ids(rng, n)
        lookup_result = store.get_or_compute(
            NAMESPACE, keys.to_pylist(), [""] * n, lambda _texts, encoded=encoded: encoded
        )
        assert lookup_result.misses == n
        inside = wanted[(wanted >= start) & (wanted < start + n)] - start
        sampled.extend(keys.take(pa.array(inside)).to_pylist())
        if clustered is None:
            clustered = keys.slice(n // 3, lookup).to_pylist()
        print(f"  {start + n:,} entries", flush=True)
    return clustered, sampled


def plain_scan(store: TokenStore, keys: list[str]) -> int:
    """The lookup before the index: every shard read whole, verified, searched."""
    manifest = store._read_manifest()["shards"]
    wanted = pa.array(keys, pa.string())
    found = 0
    for name, info in sorted(manifest.items()):
        if name.startswith(NAMESPACE + "/"):
            data = (store.root / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == info["sha256"]
            shard = pq.read_table(pa.BufferReader(data))
            found += int(pc.sum(pc.is_in(wanted, value_set=shard["content_key"])).as_py() or 0)
    return found


def index_only(store: TokenStore, keys: list[str]) -> int:
    manifest = store._read_manifest()["shards"]
    prefixes, _ = token_index.key_prefixes(pa.array(keys, pa.string()))
    found = 0
    for name, info in sorted(manifest.items()):
        if name.startswith(NAMESPACE + "/"):
            with store._namespace_fd(NAMESPACE) as fd:
                index = token_index.KeyIndex.open(fd, name.split("/")[1].replace(".parquet", ".keys"), info)
            found += len(index.candidates(prefixes)[0])
    return found


def timed(run, repeat: int):
    """(median wall seconds, median CPU seconds, the last result)."""
    times, cpu, result = [], [], None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = run()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), statistics.median(cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10_000_000)
    parser.add_argument("--shard-entries", type=int, default=1_000_000)
    parser.add_argument("--lookup", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def refuse(_texts):
        raise AssertionError("a stored key was tokenized")

    with tempfile.TemporaryDirectory() as tmp:
        store = TokenStore(tmp, max_bytes=10**12)
        print(f"building {args.entries:,} entries in shards of {args.shard_entries:,}")
        start = time.perf_counter()
        clustered, scattered = build(store, args.entries, args.shard_entries, args.lookup, rng)
        stats = store.stats()
        print(
            f"built in {time.perf_counter() - start:.1f} s: {stats['shards']} shards, {stats['bytes'] / 2**20:,.0f} MiB"
            f" (+ {sum(p.stat().st_size for p in store.root.rglob('*.keys')) / 2**20:,.0f} MiB key indexes)"
        )
        absent = random_keys(rng, args.lookup).to_pylist()
        print(f"\nlookup of {args.lookup:,} keys (median of {args.repeat})")
        print(
            f"{'what':<12}{'indexed s':>11}{'cpu s':>8}{'shard MiB read':>16}{'shards':>8}{'plain scan s':>14}{'ratio':>8}"
        )
        for label, keys in (("clustered", clustered), ("random", scattered), ("absent", absent)):
            expect_hits = label != "absent"
            encode = refuse if expect_hits else (lambda texts: fake_ids(rng, len(texts)))
            seconds, cpu, lookup = timed(
                lambda keys=keys, encode=encode: store.get_or_compute(NAMESPACE, keys, [""] * len(keys), encode),
                args.repeat if expect_hits else 1,
            )
            plain, _, found = timed(lambda keys=keys: plain_scan(store, keys), 1)
            assert found == (len(keys) if expect_hits else 0) or not expect_hits
            print(
                f"{label:<12}{seconds:>11.3f}{cpu:>8.3f}{lookup.shard_bytes_read / 2**20:>16.1f}{len(lookup.shards_used):>8}"
                f"{plain:>14.2f}{plain / seconds:>7.0f}x"
            )
        seconds, cpu, found = timed(lambda: index_only(store, scattered), args.repeat)
        assert found >= len(scattered)
        print(f"{'index only':<12}{seconds:>11.3f}{cpu:>8.3f}{0:>16.1f}{'-':>8}{'':>14}{'':>8}")


if __name__ == "__main__":
    main()

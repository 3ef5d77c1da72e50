"""training_dataset's core vs a plain baseline, on the 5,000-file corpus of benchmarks/tokenization.py.

    python benchmarks/dataset.py [--files 5000] [--min-mb 20] [--seq-len 2048] [--repeat 3] [--store DIR]

Both start from the same warm token store and the same rows (the split and order are computed
once, outside the timings). Baseline: read the full ids from the store, append EOS to each
document's ids, `numpy.concatenate` them and reshape into `seq_len` rows (the remainder padded),
in memory. Ours: the asset's core: split and order, read the store, and write both splits'
Parquet, `.bin`, `.idx` and dataset.json (streamed, zstd, sha256 of every file, atomic swap).
Peak memory is the resident high-water mark during our run, above what was resident before it
(the inputs), against the size of the output token stream as int32; the part spent packing and
writing (above the ids read from the store) is shown apart. Allocator pools kept from earlier
runs make these numbers vary from run to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dlm_pipeline.core.corpus import rows_table, section_id
from dlm_pipeline.core.dataset import (
    DatasetSettings,
    RowTexts,
    full_token_ids,
    plan_dataset,
    resolve_eos_id,
    write_dataset,
)
from dlm_pipeline.core.expansion import expand_rows
from dlm_pipeline.core.token_store import TokenStore
from dlm_pipeline.core.tokenize import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenization import corpus_files, timed  # noqa: E402  (the same corpus, generated the same way)


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--min-mb", type=float, default=20.0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--store", default="", help="keep the token store here between runs (default: a temp folder)")
    args = parser.parse_args()

    files = corpus_files(args.files, int(args.min_mb * 1e6))
    paths = sorted(files, key=str.encode)
    raw = rows_table(
        [section_id(p, files[p]) for p in paths],
        paths,
        [files[p] for p in paths],
        [{"pkg": p.split("/")[0]} for p in paths],
    )
    del files
    weights_map = {"pkg": {f"pkg{i:02d}": 0.5 + (i % 4) * 0.5 for i in range(50)}}
    expanded, expansion = expand_rows(
        raw, np.zeros(raw.num_rows, np.int32), [(weights_map,)], 0
    )  # one chain of one map
    expanded = expanded.select(["section_id", "copy"])
    loaded = dataclasses.replace(load_tokenizer(), max_seq_len=args.seq_len)
    eos = resolve_eos_id(loaded)
    settings = DatasetSettings(
        0, 0, 0.1, args.seq_len, "bernoulli", loaded.fingerprint, eos, loaded.tokenizer.get_vocab_size()
    )

    def plan():
        return plan_dataset(raw, expanded, expansion.weights, seed=0, split_seed=0, val_fraction=0.1)

    with tempfile.TemporaryDirectory() as tmp:
        store = TokenStore(args.store or Path(tmp) / "store")
        fixed = plan()
        texts = RowTexts(raw["text"], fixed.unique_rows)
        _, cold = timed(lambda: full_token_ids(store, loaded, fixed.unique_keys, texts))
        rows_before = store.stats()["rows"]
        other_length = dataclasses.replace(loaded, max_seq_len=args.seq_len // 2)
        full_token_ids(store, other_length, fixed.unique_keys, texts)
        retokenized = store.stats()["rows"] - rows_before

        def baseline() -> np.ndarray:
            ids = full_token_ids(store, loaded, fixed.unique_keys, texts)
            offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
            eos_array = np.array([eos], np.int32)
            parts = []
            for split in ("train", "validation"):
                for text in fixed.documents(split).tolist():
                    parts += [values[offsets[text] : offsets[text + 1]], eos_array]
            stream = np.concatenate(parts)
            padded = np.zeros(-(-len(stream) // args.seq_len) * args.seq_len, np.int32)
            padded[: len(stream)] = stream
            return padded.reshape(-1, args.seq_len)

        def ours(marks: dict):
            current = plan()
            ids = full_token_ids(store, loaded, current.unique_keys, RowTexts(raw["text"], current.unique_rows))
            marks["read_peak"], marks["before_write"] = rss_mib("VmHWM"), rss_mib("VmRSS")
            reset_peak()
            written = write_dataset(Path(tmp) / "out" / "0", current, ids, settings)
            marks["write_peak"] = rss_mib("VmHWM")
            return written

        base_times, our_times, peaks, write_peaks = [], [], [], []
        for _ in range(args.repeat):
            sequences, seconds = timed(baseline)
            base_times.append(seconds)
            del sequences
            before, marks = rss_mib("VmRSS"), {}
            reset_peak()
            (manifest, summaries), seconds = timed(lambda marks=marks: ours(marks))
            our_times.append(seconds)
            peaks.append(max(marks["read_peak"], marks["write_peak"]) - before)
            write_peaks.append(marks["write_peak"] - marks["before_write"])
        out_bytes = sum(p.stat().st_size for p in (Path(tmp) / "out" / "0").iterdir())

    tokens = sum(s.tokens for s in summaries.values())
    stream_mib = tokens * 4 / 2**20
    base, our = min(base_times), min(our_times)
    print(
        f"corpus            {raw.num_rows:,} files, {expanded.num_rows:,} expanded rows; {tokens:,} output tokens "
        f"({summaries['train'].documents:,} train / {summaries['validation'].documents:,} validation documents)"
    )
    print(f"store first read  {cold:6.2f}s  (tokenizes every unique text when the store is new)")
    print(f"max_seq_len change: {retokenized} texts tokenized")
    print(f"baseline          {base:6.2f}s  (min of {args.repeat}: {', '.join(f'{t:.2f}' for t in base_times)})")
    print(
        f"training_dataset  {our:6.2f}s  (min of {args.repeat}: {', '.join(f'{t:.2f}' for t in our_times)})  "
        f"= {our / base:.2f}x baseline (target <= 1.5x)"
    )
    print(
        f"peak memory       {max(peaks):6.0f} MiB above the inputs vs output stream {stream_mib:,.0f} MiB (int32) "
        f"= {max(peaks) / stream_mib:.2f}x (target < 2x); files on disk {out_bytes / 2**20:,.0f} MiB"
    )
    print(
        f"  of which        {max(write_peaks):6.0f} MiB while packing and writing, above the ids read from the store "
        f"({max(write_peaks) / stream_mib:.2f}x the stream)"
    )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total             {time.perf_counter() - start:6.1f}s")

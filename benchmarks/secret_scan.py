"""Cost of the credential scan vs a cold run, on the tokenization benchmark's corpus.

    python benchmarks/secret_scan.py [--files 5000] [--min-mb 20] [--entropy]

(Not `secrets.py`: a file of that name here would shadow the standard library's `secrets`.)

Writes the corpus of benchmarks/tokenization.py (real Python source) to a temporary tree, then in
one process times: the raw corpus built with the scan off (`scan_secrets: false` at the root) and
on, the scan alone over the same texts, and a cold tokenization of those texts (the bundled
tokenizer's `encode_batch`). The scan must stay under 10 % of a cold run (ingest + tokenization).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tokenization import corpus_files

from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
from dlm_pipeline.core.corpus import build_raw_corpus
from dlm_pipeline.core.secrets import secret_scanner
from dlm_pipeline.core.tokenize import load_tokenizer
from dlm_pipeline.core.tree import scan_tree


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def ingest(root: Path, scan_secrets: bool, entropy: bool):
    (root / ".dlm" / "training.yaml").write_text(
        f"dlm_training_version: 1\nscan_secrets: {str(scan_secrets).lower()}\n"
    )
    scan = scan_tree(root)
    anchors = anchors_from_table(records_table(load_configs(scan)))
    return build_raw_corpus(scan, anchors, secret_entropy=entropy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--min-mb", type=float, default=20)
    parser.add_argument("--entropy", action="store_true", help="also the high-entropy plugins (DLM_SECRET_ENTROPY=1)")
    args = parser.parse_args()
    files = corpus_files(args.files, int(args.min_mb * 1e6))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text, encoding="utf-8")
        (root / ".dlm").mkdir()
        ingest(root, False, args.entropy)  # warm the page cache and imports: both runs read the same files
        plain, ingest_off = timed(lambda: ingest(root, False, args.entropy))
        scanned, ingest_on = timed(lambda: ingest(root, True, args.entropy))
    texts = plain.table["text"].to_pylist()
    scanner = secret_scanner(args.entropy)
    flagged, scan_only = timed(lambda: sum(1 for text in texts if scanner.findings(text)))
    candidates = sum(len(scanner.candidate_lines(text)) for text in texts)
    tokenizer = load_tokenizer().tokenizer
    encoded, tokenize = timed(lambda: tokenizer.encode_batch(texts, add_special_tokens=False))
    cold = ingest_off + tokenize
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus             {len(texts):>9,} files  {mb:,.1f} MB  {sum(len(e.ids) for e in encoded):,} tokens")
    print(f"ingest, scan off   {ingest_off:>9.2f}s")
    print(f"ingest, scan on    {ingest_on:>9.2f}s  ({scanned.skips['secret']:,} files skipped as secret)")
    print(
        f"scan alone         {scan_only:>9.2f}s  ({candidates:,} candidate lines for the plugins, {flagged:,} files flagged)"
    )
    print(f"cold tokenization  {tokenize:>9.2f}s  (encode_batch)")
    print(f"cold run           {cold:>9.2f}s  (ingest without scan + tokenization)")
    print(f"scan / cold run    {scan_only / cold:>9.1%}  (limit 10 %)")


if __name__ == "__main__":
    main()

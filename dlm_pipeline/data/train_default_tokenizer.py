"""Rebuild the bundled default tokenizer (`dlm-bpe-8k.json`) from this machine's CPython stdlib.

    python -m dlm_pipeline.data.train_default_tokenizer [--out PATH]

A byte-level BPE with 8,192 ids trained with HF `tokenizers` on the standard library's `.py`
sources (PSF licence), so the default works offline and ships with the repository. It is a
real tokenizer for code and prose, small enough to commit; point DLM_TOKENIZER at your
model's own tokenizer.json for training runs.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 8192
END_OF_TEXT = "<|endoftext|>"
MAX_TRAINING_BYTES = 12_000_000


def training_files() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        total += path.stat().st_size
        if total > MAX_TRAINING_BYTES:
            break
        files.append(str(path))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).with_name("dlm-bpe-8k.json")))
    args = parser.parse_args()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(training_files(), trainer)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} ids")


if __name__ == "__main__":
    main()

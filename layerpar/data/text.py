"""Text for the language models, offline: a byte-level tokenizer and a corpus split by file.

    tok = ByteTokenizer()
    files = split_files(list_text_files())          # Python's own stdlib .py files, by file
    tokens = encode_files(files.train, tok)         # (N,) int16: BOS bytes EOS per file
    for w in windows(tokens, batch=8, context=128, seed=0, epoch=0):
        x, y = w[:, :-1], w[:, 1:]                  # w (B, T+1)

Tokenizer: ids 0..255 are the bytes themselves, then BOS = 256, EOS = 257, PAD = 258 (vocab 259).
It works on bytes, so any input, valid UTF-8 or not, round-trips exactly through `encode` and
`decode_bytes`; `decode` (to str) drops special tokens and replaces invalid UTF-8 by U+FFFD. A str
given to `encode` is encoded as UTF-8 (lone surrogates via 'surrogatepass').

Corpus: by default the .py source files of the running Python's standard library
(`sysconfig.get_paths()["stdlib"]`, site-/dist-packages and __pycache__ left out), any directory of
text files through `root`. Nothing is downloaded. The file list is sorted, then shuffled by a seeded
`random.Random` and cut into train/val/test, so no file's text is in two splits.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from layerpar.data.base import DataError

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class ByteTokenizer:
    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> list[int]:
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        return ([self.BOS] if bos else []) + list(data) + ([self.EOS] if eos else [])

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of ids, special tokens dropped; an id outside the vocabulary is an error."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise DataError(f"token id {i} is outside the byte vocabulary (0..{self.vocab_size - 1})")
            if i < 256:
                out.append(i)
        return bytes(out)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", "replace")


@dataclass(frozen=True)
class FileSplits:
    train: list[Path]
    val: list[Path]
    test: list[Path]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_text_files(root: str | Path | None = None, suffixes: Sequence[str] | None = None) -> list[Path]:
    """Sorted files under root (default: the stdlib, .py only) with one of `suffixes` (None with a
    root: every file). DataError when there are none."""
    if root is None:
        root, suffixes = stdlib_root(), (".py",) if suffixes is None else suffixes
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"text corpus root {str(base)!r} is not a directory")
    files = sorted(p for p in base.rglob("*")
                   if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(base).parts)
                   and (suffixes is None or p.suffix in suffixes))
    if not files:
        raise DataError(f"no text files under {str(base)!r}")
    return files


def split_files(files: Sequence[Path], *, seed: int = 0,
                fractions: tuple[float, float] = (0.05, 0.05)) -> FileSplits:
    """Train/val/test by file: sorted, shuffled with `seed`, val and test take `fractions` of the
    files (at least one each); needs at least 3 files."""
    files = sorted(files)
    if len(files) < 3:
        raise DataError(f"a train/val/test split by file needs at least 3 files, got {len(files)}")
    random.Random(seed).shuffle(files)
    n_val, n_test = (max(1, round(f * len(files))) for f in fractions)
    if n_val + n_test >= len(files):
        raise DataError(f"val and test fractions {fractions} leave no training file of {len(files)}")
    return FileSplits(train=sorted(files[n_val + n_test:]), val=sorted(files[:n_val]),
                      test=sorted(files[n_val:n_val + n_test]))


def encode_files(files: Sequence[Path], tok: ByteTokenizer | None = None) -> torch.Tensor:
    """One (N,) int16 stream (a quarter of int64's memory: the stdlib's train split is ~28M tokens):
    BOS, the file's bytes, EOS, for each file in order."""
    tok = tok or ByteTokenizer()
    parts = []
    for p in files:
        raw = bytearray(p.read_bytes())  # frombuffer refuses an empty buffer (empty __init__.py)
        data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        parts += [torch.tensor([tok.BOS], dtype=torch.int16), data.to(torch.int16),
                  torch.tensor([tok.EOS], dtype=torch.int16)]
    if not parts:
        raise DataError("no files to encode")
    return torch.cat(parts)


def num_windows(tokens: torch.Tensor, context: int) -> int:
    return (tokens.numel() - 1) // context


def windows(tokens: torch.Tensor, *, batch: int, context: int, seed: int = 0,
            epoch: int = 0) -> Iterator[torch.Tensor]:
    """(B, T+1) int64 windows of the stream (inputs w[:, :-1], targets w[:, 1:]): the non-overlapping
    windows starting at multiples of T, in an order fixed by (seed, epoch); the last partial batch
    is dropped. DataError when the stream holds no full batch."""
    n = num_windows(tokens, context)
    if n < batch:
        raise DataError(f"{tokens.numel()} tokens make {n} windows of {context}, fewer than one "
                        f"batch of {batch}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    offsets = torch.arange(context + 1)
    for i in range(n // batch):
        starts = order[i * batch:(i + 1) * batch] * context  # (B,)
        yield tokens[starts[:, None] + offsets].long()  # (B, T+1) int64

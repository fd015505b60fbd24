"""Text for the language models, offline: a byte-level tokenizer and a corpus split by file.

    tok = ByteTokenizer()
    files = split_files(list_text_files())          # Python's own stdlib .py files, by file
    tokens = encode_files(files.train, tok)         # (N,) int16: BOS bytes EOS per file
    for w in windows(tokens, batch=8, context=128, seed=0, epoch=0):
        x, y = w[:, :-1], w[:, 1:]                  # w (B, T+1)
    splits = load_text(cfg)                         # data.name=text: the training loop's Splits of
    x, y = splits.train.take(idx)                   # TextSplit windows, x, y (B, model.context) int64

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

import os
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
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"text corpus root {str(base)!r} is not a directory")
    files = []
    for folder, dirs, names in os.walk(base):  # the skipped directories are never entered
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [Path(folder) / n for n in names if suffixes is None or Path(n).suffix in suffixes]
    files = sorted(p for p in files if p.is_file())
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
    if not files:
        raise DataError("no files to encode")
    raw = [p.read_bytes() for p in files]
    sizes = torch.tensor([len(r) + 2 for r in raw])  # BOS + bytes + EOS per file
    ends = sizes.cumsum(0)  # one past each file's EOS
    out = torch.empty(int(ends[-1]), dtype=torch.int16)
    special = torch.zeros(len(out), dtype=torch.bool)
    special[ends - sizes] = special[ends - 1] = True
    out[ends - sizes], out[ends - 1] = tok.BOS, tok.EOS
    body = bytearray(b"".join(raw))
    if body:  # frombuffer refuses an empty buffer (only empty files)
        out[~special] = torch.frombuffer(body, dtype=torch.uint8).to(torch.int16)
    return out


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


# ----------------------------------------------------------------------------- the training loop's splits


@dataclass(frozen=True)
class TextSplit:
    """Windows of `context + 1` tokens of one split's stream, as the training loop's data.batches and
    the LM evaluator take them: `take(index)` -> (x (B, T) int64 inputs, y (B, T) int64 targets,
    the inputs shifted by one). Windows start at multiples of T and do not overlap."""

    tokens: torch.Tensor
    """(N,) int16: the split's files, BOS bytes EOS each (encode_files)."""
    starts: torch.Tensor
    """(n,) int64: where each window of this split starts in `tokens`."""
    context: int

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def y(self) -> torch.Tensor:
        """One entry per window (the loop counts windows as `len(split.y)`)."""
        return self.starts

    def take(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.tokens[self.starts[index][:, None] + torch.arange(self.context + 1)].long()  # (B, T+1)
        return w[:, :-1], w[:, 1:]


def window_starts(tokens: torch.Tensor, context: int, *, keep: int = 0, spread: bool = False,
                  seed: int = 0) -> torch.Tensor:
    """Starts of the non-overlapping windows of `context + 1` tokens; keep > 0 keeps that many:
    evenly spaced (spread) or a seeded random subset, in stream order."""
    n = num_windows(tokens, context)
    starts = torch.arange(n, dtype=torch.long) * context
    if 0 < keep < n:
        pick = torch.linspace(0, n - 1, keep).round().long().unique() if spread else \
            torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values
        starts = starts[pick]
    return starts


def load_text(cfg):
    """data.name=text as the training loop's Splits: the corpus (data.root, or the stdlib's .py
    files) split by file with data.seed (val and test each take data.val_fraction of the files),
    encoded with the byte tokenizer, cut into windows of model.context + 1 tokens. data.limit_train
    keeps a seeded sample of the training windows, data.eval_windows an evenly spaced one of val's
    and test's. A DataError when a split holds no window."""
    from layerpar.data.base import Splits

    d, context = cfg.data, cfg.model.context
    frac = d.val_fraction if d.val_fraction > 0 else 0.05
    files = split_files(list_text_files(d.root), seed=d.seed, fractions=(frac, frac))
    out = {}
    for name in ("train", "val", "test"):
        tokens = encode_files(getattr(files, name))
        keep = d.limit_train if name == "train" else d.eval_windows
        starts = window_starts(tokens, context, keep=keep, spread=name != "train", seed=d.seed)
        if not len(starts):
            raise DataError(f"the {name} split of the text corpus ({len(getattr(files, name))} files, "
                            f"{tokens.numel()} tokens) holds no window of model.context + 1 = "
                            f"{context + 1} tokens; lower model.context or add text")
        out[name] = TextSplit(tokens, starts, context)
    return Splits(out["train"], out["val"], out["test"], classes=[], image_shape=(context,))

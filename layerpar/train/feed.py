"""Where a rank's batches come from: the seam between the training loop (rank_loop) and the data.

    feed.batches_per_epoch()                         # the same on every rank of the mesh
    for x, y, share in feed.train_batches(epoch, skip):
        shard.train_step(x, y, share=share)          # share None: the whole batch (the shard cuts)
    for x, y in feed.eval_batches("val", 256): ...   # this rank's rows of val / test, in order
    feed.shared_eval                                 # True: each replica evaluates its share only

MemoryFeed (data.streaming: false, the default): every rank holds the decoded splits and draws the
same seeded batches and augmentation (data.base.batches, data.augment); a replica's share is cut by
BranchShard.train_step, and every replica evaluates the whole val / test split.

StreamingFeed (data.streaming: true): replica r's share of each batch is read by Ray Data
(data.streaming.StreamingSource(replica=r, replicas=R)) on ONE rank of its branch group, the leader
(branch rank 0), and broadcast to the group's other ranks once (comm.broadcast_batch): the decoding is
done once per replica group, not W times, and only the leader opens a Ray Data stream. Val and test
are split across replicas the same way (contiguous shares), and the replicas' counts summed
(evaluate.evaluate_feed). Same seed, same order: batch k of epoch e is the same rows and draws
whoever reads it, and `train_batches(e, k)` resumes exactly there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from layerpar.data import batches, batches_per_epoch
from layerpar.data.augment import augment


class MemoryFeed:
    """The in-memory splits (layerpar.data.load_dataset), on every rank."""

    shared_eval = False

    def __init__(self, cfg, splits) -> None:
        self.cfg, self.splits = cfg, splits

    def batches_per_epoch(self) -> int:
        return batches_per_epoch(len(self.splits.train), self.cfg.train.batch_size)

    def train_batches(self, epoch: int, skip: int = 0
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]]:
        d = self.cfg.data
        for i, (x, y) in enumerate(batches(self.splits.train, self.cfg.train.batch_size, seed=d.seed,
                                           epoch=epoch, skip=skip), start=skip):
            yield augment(x, kind=d.augment, seed=d.seed, epoch=epoch, index=i), y, None

    def split(self, name: str):
        return getattr(self.splits, name)

    def close(self) -> None:
        return None


def share_of(rows: int, replicas: int, replica: int) -> tuple[int, int]:
    """(rows, first row) of replica `replica`'s torch.tensor_split share of `rows` rows."""
    base, extra = divmod(rows, replicas)
    return base + (1 if replica < extra else 0), replica * base + min(replica, extra)


class StreamingFeed:
    """Ray Data batches, read by the branch group's leader and broadcast to its other ranks.

    rows: the number of rows of each split ({"train", "val", "test"}: the driver's check_dataset);
    catalog and stats: the driver's Catalog and (mean, std), needed by the leader only."""

    shared_eval = True

    def __init__(self, cfg, comm, *, rows: dict[str, int], catalog=None, stats=None) -> None:
        self.cfg, self.comm, self.rows = cfg, comm, rows
        self.leader = comm.rank == 0
        self.replica, self.replicas = comm.replica, comm.replicas
        self._catalog, self._stats, self._sources = catalog, stats, {}
        if self.leader:  # the decode workers import their modules while the model is built
            threading.Thread(target=self._warm_up, daemon=True, name="stream-warm-up").start()

    def _warm_up(self) -> None:
        """Read one test batch and drop it: Ray Data's first execution (workers importing torch and
        Pillow: seconds) happens beside the rank's start-up, not inside the first epoch's data time."""
        try:
            next(iter(self._source("test", self.cfg.train.batch_size).batches(0)), None)
        except Exception:  # noqa: BLE001 - a bad file is reported by the read that needs it
            pass

    def _source(self, split: str, batch_size: int):
        """The leader's StreamingSource of a split (made once; Ray Data is touched only here)."""
        from layerpar.data.streaming import StreamingSource

        key = (split, batch_size)
        if key not in self._sources:
            cfg = self.cfg.replace(train={"batch_size": batch_size})
            self._sources[key] = StreamingSource(cfg, split, self.replica, self.replicas,
                                                 catalog=self._catalog, stats=self._stats)
        return self._sources[key]

    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.rows["train"], self.cfg.train.batch_size)

    def train_batches(self, epoch: int, skip: int = 0
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        b, n = self.cfg.train.batch_size, self.rows["train"]
        stream = self._source("train", b).batches(epoch, skip) if self.leader else None
        try:
            for k in range(skip, self.batches_per_epoch()):
                x, y = next(stream) if stream is not None else (None, None)
                x, y = self.comm.broadcast_batch(x, y)
                _, start = share_of(min(b, n - k * b), self.replicas, self.replica)
                yield x, y, (min(b, n - k * b), start)
        finally:  # stopped early (the time budget): the leader's Ray Data execution stops now
            if stream is not None:
                stream.close()

    def eval_batches(self, name: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This replica's contiguous share of val / test, in order, in batches of batch_size."""
        mine, _ = share_of(self.rows[name], self.replicas, self.replica)
        stream = self._source(name, batch_size).batches(0) if self.leader and mine else None
        try:
            for _ in range(-(-mine // batch_size)):
                x, y = next(stream) if stream is not None else (None, None)
                yield self.comm.broadcast_batch(x, y)
        finally:
            if stream is not None:
                stream.close()

    def close(self) -> None:
        self._sources.clear()


def check_stream(cfg) -> dict:
    """The driver's look at a streamed dataset before anything is written or any rank starts:
    data.streaming.check_dataset (it exists, its classes fit the model, every split holds a batch or a
    row per replica; no pixel decoded) and the normalisation constants (channel_stats over at most
    data.stats_images images: an unreadable one among them fails here). Returns {"catalog", "stats",
    "rows"}; raises DataError (one sentence)."""
    from layerpar.data.streaming_catalog import channel_stats, check_dataset

    catalog = check_dataset(cfg, max(1, cfg.parallel.replicas) if cfg.parallel.workers >= 1 else 1)
    stats = channel_stats(catalog, cfg.data.stats_images)
    return {"catalog": catalog, "stats": stats, "rows": {k: len(v) for k, v in catalog.rows.items()}}

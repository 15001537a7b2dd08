"""A rank's training samples read and decoded in worker processes, each reading only its own shards.

A rank's stream is a sequence of visits (`ShardStream.visits`: the part of one shard read in one
epoch). Worker w of W takes visits w, w + W, w + 2W, ...: it fetches each of its shards once and
decodes the visit's samples, handing them over in chunks through its own bounded queue. The
consumer takes visit 0's chunks from worker 0's queue, then visit 1's from worker 1's, and so on:
the samples arrive in the stream's order whatever W (a run may resume with another
`loader_workers`), each shard is fetched by one worker instead of all W (a torch DataLoader over the
stream would have every worker read every shard and keep its share of the batches), and a worker
holds one shard and `prefetch` decoded chunks ahead of the consumer, never more.

A worker that fails hands its error over in its turn (a `ShardError`; a `DamagedShard` for a
shard whose bytes are bad); one that dies (OOM, SIGKILL) is reported as soon as its turn comes,
never waited on forever.
"""

from __future__ import annotations

import itertools
import logging
import queue
from collections.abc import Iterator
from typing import Any

import torch.multiprocessing as mp

from pipeline.errors import ShardError, one_line

log = logging.getLogger(__name__)

_CHUNK, _END, _ERROR = "chunk", "end", "error"


def _work(stream, position: int, worker: int, workers: int, out, chunk: int) -> None:
    """Worker `worker`'s loop: its visits of the stream from `position`, decoded, into `out`."""
    try:
        for number, visit in enumerate(stream.visits(position)):
            if number % workers != worker:
                continue
            decoded: list[Any] = []
            for sample in stream.visit_samples(visit):
                decoded.append(stream.decode(sample))
                if len(decoded) == chunk:
                    out.put((_CHUNK, decoded))
                    decoded = []
            out.put((_END, decoded))
    except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it in its turn
        out.put((_ERROR, err if isinstance(err, ShardError) else ShardError(one_line(err))))


class DecodeWorkers:
    """`workers` processes decoding `stream` from `position`; `samples()` yields them in order."""

    def __init__(self, stream, workers: int, position: int, *, chunk: int, prefetch: int = 4):
        context = mp.get_context("fork")  # as torch's DataLoader: the stream and its decode need no pickling
        self.queues = [context.Queue(maxsize=prefetch) for _ in range(workers)]
        self.processes = [
            context.Process(target=_work, args=(stream, position, w, workers, self.queues[w], chunk), daemon=True)
            for w in range(workers)
        ]
        for process in self.processes:
            process.start()

    def samples(self) -> Iterator[Any]:
        """The decoded samples of the stream, in order, forever (the workers stop when this does)."""
        try:
            for number in itertools.count():
                worker = number % len(self.processes)
                while True:
                    kind, payload = self._next(worker)
                    if kind == _ERROR:
                        raise payload  # the worker's ShardError (a DamagedShard stays one)
                    yield from payload
                    if kind == _END:
                        break
        finally:
            self.close()

    def _next(self, worker: int) -> tuple[str, Any]:
        while True:
            try:
                return self.queues[worker].get(timeout=1.0)
            except queue.Empty:
                process = self.processes[worker]
                if not process.is_alive():
                    try:  # what it put just before it ended
                        return self.queues[worker].get_nowait()
                    except queue.Empty:
                        raise ShardError(
                            f"loader worker {worker} stopped (exit code {process.exitcode}) before handing over its "
                            "next shard; see the worker's log (out of memory?)"
                        ) from None

    def close(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=5)
        for q in self.queues:
            q.cancel_join_thread()  # a terminated worker's unread items must not block our exit
            q.close()

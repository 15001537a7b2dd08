"""ingest: URL lists → raw webdataset shards (`jpg`, `txt`, `json`) + per-shard parquet + stats.

img2dataset does the downloading: each shard task runs img2dataset's `Downloader` on one shard
of the normalised URL list (the same unit img2dataset's own Ray distributor schedules), writing
into the shard's attempt folder; the engine then moves the tar, parquet and stats to their final
names and commits the shard in our ledger. That ledger replaces img2dataset's incremental mode, which trusts
any `_stats.json` it finds, including those of half-written shards.

Planning normalises the URL lists once into `_input/<shard>.parquet`, with Ray tasks (their own
ledger, `_input/`): one per CSV list, one per million rows of a parquet list, each streaming its
rows into shards. So a resumed run downloads exactly the rows the first run planned, and neither
the driver nor a task holds a list. A list's shards are numbered from its position times
`LIST_STRIDE`, so each task names its shards alone and keys stay in list order. The synthetic set, small by design,
is planned on the driver.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.config.data import IngestSection
from pipeline.data.fetch_policy import (
    REASONS,
    AddressPolicy,
    FetchGuard,
    HeaderCheck,
    guarded_urllib,
    scheme_refusal,
)
from pipeline.data.url_lists import inspect_url_lists, iter_url_list, shard_table
from pipeline.engine.ledger import Attempt, Ledger, ShardResult
from pipeline.engine.schemas import RAW_MANIFEST, validate_table
from pipeline.engine.tasks import ShardTask
from pipeline.errors import InputError
from pipeline.stages.base import RunContext, Stage

log = logging.getLogger(__name__)

# Ingest failure reasons: every URL-list row is a success or exactly one of these. The refusals
# of `fetch_policy` (schemes, addresses, bytes, time, formats, pixels) come first; `disallowed` is
# X-Robots-Tag.
FAILURES = (*REASONS, "http_4xx", "http_5xx", "connection_error", "timeout", "decode_error", "disallowed", "other")


def classify_error(message: str | None) -> str:
    """Maps an img2dataset error message to one of FAILURES."""
    m = (message or "").lower()
    refusal = next((reason for reason in REASONS if reason in m), None)
    if refusal is not None:
        return refusal
    if "cv_io_max_image_pixels" in m:  # OpenCV's own cap (`fetch_policy.OPENCV_ENV`), behind the header check
        return "too_many_pixels"
    if m.startswith("unknown url type"):  # urllib's word for a URL without a scheme
        return "disallowed_scheme"
    if m.startswith("http error 4"):
        return "http_4xx"
    if m.startswith("http error 5"):
        return "http_5xx"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "refused" in m or "urlopen error" in m or "connection" in m or "name or service" in m:
        return "connection_error"
    if "decod" in m or "cannot identify" in m or "truncated" in m:
        return "decode_error"
    if "disallowed" in m:
        return "disallowed"
    return "other"


LIST_STRIDE = 100_000
"""Shard numbers per URL list: list i's shards are i * LIST_STRIDE + 0, 1, ..."""


def shard_name(shard_id: int, digits: int) -> str:
    return f"{shard_id:0{digits}d}"


def list_digits(lists: int) -> int:
    """Digits of a shard name when `lists` lists are planned (5 for one, as img2dataset's default)."""
    return len(str(lists * LIST_STRIDE - 1))


LIST_ROWS_PER_TASK = 1_000_000
"""URL-list rows one planning task reads (a parquet list is split by row ranges; a CSV is one task)."""


@dataclass(frozen=True)
class ListTask(ShardTask):
    """Planning: rows [start, stop) of one URL list into its input shards `_input/<shard>.parquet`."""

    url: str
    index: int
    """The list's position in `ingest.url_lists`."""
    digits: int
    start: int = 0
    stop: int | None = None
    """None: to the end of the list."""


def list_tasks(url: str, index: int, rows: int | None, shard_size: int, digits: int) -> list[ListTask]:
    """The planning tasks of one list: row ranges of whole shards for a parquet list of `rows`, one
    task for a CSV (rows unknown)."""
    if rows is not None and -(-rows // shard_size) > LIST_STRIDE:
        raise InputError(
            f"ingest.url_lists: {url}: {rows} rows make more than {LIST_STRIDE} shards of {shard_size}; "
            "split the list or raise ingest.shard_size"
        )
    if rows is None:
        return [ListTask(f"{index:05d}-0000", url, index, digits)]
    step = max(1, LIST_ROWS_PER_TASK // shard_size) * shard_size
    return [
        ListTask(f"{index:05d}-{k:04d}", url, index, digits, start, min(start + step, rows))
        for k, start in enumerate(range(0, rows, step))
    ]


def split_list(cfg: IngestSection, task: ListTask, attempt: Attempt) -> ShardResult:
    """Streams rows [start, stop) of one URL list (in this task, never on the driver) into input
    shards of `shard_size` rows; memory stays one shard whatever the list's size."""
    shard = task.index * LIST_STRIDE + task.start // cfg.shard_size
    pending: list[pa.Table] = []
    rows = 0

    def flush(table: pa.Table) -> None:
        nonlocal shard
        if shard >= (task.index + 1) * LIST_STRIDE:
            raise InputError(f"ingest.url_lists: {task.url}: more than {LIST_STRIDE} shards; split the list")
        storage.write_parquet(attempt.path(f"{shard_name(shard, task.digits)}.parquet"), table)
        shard += 1

    refused = 0
    for batch in iter_url_list(task.url, cfg.url_col, cfg.caption_col, cfg.extra_cols, task.start, task.stop):
        pending.append(batch)
        rows += batch.num_rows
        refused += sum(scheme_refusal(url or "") is not None for url in batch["url"].to_pylist())
        buffered = sum(t.num_rows for t in pending)
        while buffered >= cfg.shard_size:
            table = pa.concat_tables(pending)
            flush(table.slice(0, cfg.shard_size))
            pending, buffered = [table.slice(cfg.shard_size)], buffered - cfg.shard_size
    if sum(t.num_rows for t in pending):
        flush(pa.concat_tables(pending))
    return ShardResult(samples_in=rows, samples_out=rows, counts={"disallowed_scheme": refused})


def _downloader(cfg: IngestSection, output_folder: str, columns: list[str], digits: int):
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    resizer = Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=cfg.encode_quality,
        encode_format="jpg",
    )
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=HeaderCheck(resizer, cfg.max_pixels),
        thread_count=cfg.threads,
        save_caption=True,
        extract_exif=True,
        output_folder=output_folder,
        column_list=columns,
        timeout=cfg.timeout_s,
        number_sample_per_shard=cfg.shard_size,
        oom_shard_count=digits,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=cfg.retries,
        user_agent_token=None,
        disallowed_header_directives={"noai", "noimageai", "noindex", "noimageindex"},
    )


@dataclass(frozen=True)
class IngestTask(ShardTask):
    """Download one shard of the normalised URL list."""

    shard_id: int
    """img2dataset's shard number (the shard's name is it with `digits` digits)."""
    digits: int
    input: str
    """The shard's rows: `_input/<shard>.parquet`."""
    policy: AddressPolicy = AddressPolicy()
    """The addresses its downloads may connect to."""


def download_shard(cfg: IngestSection, task: IngestTask, attempt: Attempt) -> ShardResult:
    """Runs img2dataset's downloader on one shard of the URL list into the attempt, and checks
    that every row is accounted for (a success or exactly one failure reason)."""
    name = task.shard
    storage.makedirs(attempt.folder)
    table = storage.read_parquet(task.input)
    feather = storage.join(attempt.folder, "input.feather")
    fs, feather_path = storage.get_fs(feather)
    with fs.open(feather_path, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    downloader = _downloader(cfg, attempt.folder, table.column_names, task.digits)
    with guarded_urllib(FetchGuard(task.policy, cfg.max_bytes, deadline_s=cfg.download_deadline_s)):
        downloader.download_shard((task.shard_id, feather))
    attempt.adopt(f"{name}.tar", f"{name}.parquet", f"{name}_stats.json")

    manifest = storage.read_parquet(storage.join(attempt.folder, f"{name}.parquet"))
    validate_table(manifest, RAW_MANIFEST, f"ingest shard {name} parquet")
    counts = {reason: 0 for reason in FAILURES}
    successes = 0
    for status, error in zip(manifest["status"].to_pylist(), manifest["error_message"].to_pylist()):
        if status == "success":
            successes += 1
        else:
            counts[classify_error(error)] += 1
    if manifest.num_rows != table.num_rows or successes + sum(counts.values()) != table.num_rows:
        raise RuntimeError(f"ingest shard {name}: {table.num_rows} rows in, {manifest.num_rows} accounted for")
    return ShardResult(samples_in=table.num_rows, samples_out=successes, counts=counts)


class IngestStage(Stage):
    name = "ingest"
    config_key = "ingest"
    # every row that did not download, refusals included: a list refused wholesale (an internal
    # mirror without `allow_networks`) is as much a stage gone wrong as a network that is down
    failure_reasons = FAILURES

    def inspect_inputs(self) -> dict[str, Any]:
        cfg: IngestSection = self.cfg
        if cfg.synthetic is None:
            recorded = storage.read_json_or_none(self._input_url("_lists.json"))
            self._lists = inspect_url_lists(cfg.url_lists, cfg.url_col, cfg.caption_col, cfg.extra_cols, recorded)
            return {"url_lists": {url: ident["sha256"] for url, ident in self._lists.items()}}
        return {}

    def _input_url(self, *parts: str) -> str:
        return storage.join(self.url, "_input", *parts)

    def _write_input(self, table: pa.Table, extra: dict[str, Any]) -> dict[str, Any]:
        """Writes the synthetic set's rows as one parquet per shard; `_input/_plan.json` last."""
        shards = shard_table(table, self.cfg.shard_size)
        digits = list_digits(1)
        names = [shard_name(i, digits) for i in range(len(shards))]
        for name, part in zip(names, shards):
            storage.write_parquet(self._input_url(f"{name}.parquet"), part)
        info = {"shards": names, "rows": table.num_rows, "digits": digits, **extra}
        storage.write_json(self._input_url("_plan.json"), info)
        return info

    def _plan_lists(self, ctx: RunContext) -> dict[str, Any]:
        """One planning task per URL list; `_input/_plan.json` (the shard names) last."""
        cfg: IngestSection = self.cfg
        if getattr(self, "_lists", None) is None:
            self.inspect_inputs()
        storage.write_json(self._input_url("_lists.json"), self._lists)
        digits = list_digits(len(cfg.url_lists))
        rows = [self._lists[storage.absolute(url)]["rows"] for url in cfg.url_lists]
        tasks = [t for i, url in enumerate(cfg.url_lists) for t in list_tasks(url, i, rows[i], cfg.shard_size, digits)]
        records = self.run_shards(ctx, tasks, ledger=Ledger(self._input_url()), label="ingest (plan)")
        names = [f.removesuffix(".parquet") for t in tasks for f in sorted(records[t.shard].files)]
        info = {
            "shards": names,
            "rows": sum(r.samples_in for r in records.values()),
            "digits": digits,
            "refused_schemes": sum(r.counts.get("disallowed_scheme", 0) for r in records.values()),
        }
        storage.write_json(self._input_url("_plan.json"), info)
        return info

    @contextlib.contextmanager
    def _source(self, ctx: RunContext):
        """The normalised input's plan; for the synthetic set, with its server running."""
        info = storage.read_json_or_none(self._input_url("_plan.json"))
        synthetic = self.cfg.synthetic
        if synthetic is None:
            yield info or self._plan_lists(ctx)
            return
        from pipeline.synthetic.dataset import generate, url_list_rows
        from pipeline.synthetic.server import LOOPBACK, LoopbackServer, dead_endpoint, dead_url

        dataset = generate(synthetic)
        port = info["port"] if info else synthetic.port
        try:
            server = LoopbackServer(dataset.files, port=port, latency_s=synthetic.latency_ms / 1000)
            server.start()
        except OSError as err:
            raise InputError(
                f"ingest.synthetic: cannot serve on 127.0.0.1:{port} ({err}); free the port or use --force ingest"
            ) from None
        try:
            if info is None:
                rows = url_list_rows(dataset, server.url, dead_url())
                table = pa.Table.from_pylist(
                    [{"url": r["url"], "caption": r["caption"], "truth": r["truth"]} for r in rows]
                )
                extra = {"port": server.port, "expect": [r["expect"] for r in rows], "kind": [r["kind"] for r in rows]}
                info = self._write_input(table, extra)
            # the synthetic crawl's own loopback hosts, by address and port; the check stays on
            yield {**info, "endpoints": [[LOOPBACK, info["port"]], [*dead_endpoint()]]}
        finally:
            server.stop()

    def process(self, task: IngestTask | ListTask, attempt: Attempt) -> ShardResult:
        if isinstance(task, ListTask):
            return split_list(self.cfg, task, attempt)
        return download_shard(self.cfg, task, attempt)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg: IngestSection = self.cfg
        with self._source(ctx) as info:
            self.write_plan(len(info["shards"]), rows=info["rows"])
            if info.get("refused_schemes"):
                log.warning(
                    "ingest: %d URL-list rows are not http(s) URLs: refused, not fetched", info["refused_schemes"]
                )
            policy = AddressPolicy(
                allow_private=cfg.allow_private_addresses,
                allow_networks=cfg.allow_networks,
                allow_endpoints=tuple((host, port) for host, port in info.get("endpoints", ())),
            )
            tasks = [
                IngestTask(name, int(name), info["digits"], self._input_url(f"{name}.parquet"), policy)
                for name in info["shards"]
            ]
            records = self.run_shards(ctx, tasks, retries=self.cfg.max_task_retries)
        counts = {reason: sum(r.counts.get(reason, 0) for r in records.values()) for reason in FAILURES}
        samples_in = sum(r.samples_in for r in records.values())
        samples_out = sum(r.samples_out for r in records.values())
        assert samples_out + sum(counts.values()) == samples_in == info["rows"], "ingest lost rows"
        return {"shards": len(records), "samples_in": samples_in, "samples_out": samples_out, "counts": counts}

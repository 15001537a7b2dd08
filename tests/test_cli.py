"""The CLI on bad inputs: one line naming the field or file, exit code 2, nothing written; and a
real URL list (tsv with LAION-style column names) through ingest and filter."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import ENV, ROOT, compare_stage, dalle, free_port, small_recipe

from pipeline.cli import parse_args
from pipeline.config.data import SyntheticConfig
from pipeline.data.shards import iter_samples
from pipeline.synthetic.dataset import generate, url_list_rows
from pipeline.synthetic.server import LoopbackServer, dead_url


def recipe_for(tmp_path, url_lists, **ingest):
    data = {
        "name": "t",
        "output_dir": str(tmp_path / "out"),
        "ray": {"num_cpus": 2},
        # the loopback server is allowed by name: the address check stays on for everything else
        "ingest": {
            "url_lists": [str(u) for u in url_lists],
            "image_size": 64,
            "shard_size": 50,
            "allow_networks": ["127.0.0.0/8"],
            **ingest,
        },
        "filter": {"min_image_size": 32, "shard_size": 50},
        "text_tokenizer": {"vocab_size": 400, "text_len": 32},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dalle: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_empty_url_list(tmp_path):
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n")
    result = dalle("run", str(recipe_for(tmp_path, [urls])))
    assert_user_error(result, str(urls), "no rows")
    assert not (tmp_path / "out").exists()


def test_url_list_without_the_caption_column(tmp_path):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "text": ["a red circle"]}), urls)
    result = dalle("run", str(recipe_for(tmp_path, [urls])))
    assert_user_error(result, str(urls), "no column 'caption'", "ingest.caption_col", "columns: url, text")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_by_default_a_url_list_on_loopback_is_refused_and_nothing_is_fetched(tmp_path):
    """The address check with no opt-in: every row of a list on the loopback server is refused
    (`disallowed_address`), a file: row as `disallowed_scheme`, and the server sees no request."""
    dataset = generate(SyntheticConfig(count=20, seed=7, defect_fraction=0.0))
    with LoopbackServer(dataset.files) as server:
        rows = [{"url": server.url + r["path"], "caption": r["caption"]} for r in dataset.rows]
        rows.append({"url": "file:///etc/hostname", "caption": "a local file"})
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), urls)
        result = dalle(
            "run", str(recipe_for(tmp_path, [urls], allow_networks=[])), "--until", "ingest", "--no-progress"
        )
        served = list(server.served)
    assert result.returncode == 0, result.stderr
    assert "1 URL-list rows are not http(s) URLs: refused, not fetched" in result.stderr
    done = json.loads((tmp_path / "out" / "ingest" / "_done.json").read_text())
    assert done["samples_out"] == 0 and served == []
    assert {k: v for k, v in done["counts"].items() if v} == {
        "disallowed_address": len(rows) - 1,
        "disallowed_scheme": 1,
    }


def test_missing_url_list_file(tmp_path):
    result = dalle("run", str(recipe_for(tmp_path, [tmp_path / "nope.tsv"])))
    assert_user_error(result, "nope.tsv", "file not found")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: t\noutput_dir: OUT\ningest: {synthetic: {}}\nfliter: {}\n", "field 'fliter': unknown key"),
        ("name: t\noutput_dir: OUT\ningest: {synthetic: {count: -5}}\n", "field 'ingest.synthetic.count'"),
        ("name: t\noutput_dir: OUT\ningest: {synthetic: {}\n", "not valid YAML"),
    ],
)
def test_malformed_recipe(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("OUT", str(tmp_path / "out")))
    for command in ("run", "status"):
        assert_user_error(dalle(command, str(path)), str(path), fragment)
    assert not (tmp_path / "out").exists()


def test_bad_override_and_unknown_stage(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\noutput_dir: {tmp_path / 'out'}\ningest: {{synthetic: {{}}}}\n")
    assert_user_error(dalle("run", str(path), "filter.shard_size=zero"), "field 'filter.shard_size'")
    assert_user_error(dalle("run", str(path), "--until", "encdoe"), "unknown stage 'encdoe'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command, options",
    [
        ("run", ["--until", "filter", "--force", "ingest", "--no-progress"]),
        ("submit", ["--until", "encode", "--address", "http://127.0.0.1:8265", "--env", "A=1"]),
        ("status", ["--json"]),
        ("report", []),
        ("dashboard", ["--port", "0", "--host", "127.0.0.1"]),
        ("plan", ["--gpus", "8", "--gpu-mem", "80"]),
    ],
)
def test_options_and_overrides_in_any_order(command, options):
    overrides = ["filter.shard_size=500", "output_dir=runs/x"]
    first = parse_args([command, "jobs/demo.yaml", *options, *overrides])
    last = parse_args([command, "jobs/demo.yaml", *overrides, *options])
    mixed = parse_args([command, "jobs/demo.yaml", overrides[0], *options, overrides[1]])
    assert vars(first) == vars(last) == vars(mixed)
    assert first.recipe == "jobs/demo.yaml" and first.overrides == overrides


@pytest.mark.slow
def test_run_with_overrides_after_or_before_the_options_gives_the_same_output(tmp_path):
    recipe = small_recipe(tmp_path / "r.yaml", tmp_path / "unused")
    port = f"ingest.synthetic.port={free_port()}"  # the same URLs in both runs
    after = dalle("run", str(recipe), "--until", "filter", "--no-progress", f"output_dir={tmp_path / 'a'}", port)
    before = dalle("run", str(recipe), f"output_dir={tmp_path / 'b'}", port, "--until", "filter", "--no-progress")
    assert after.returncode == 0 and before.returncode == 0, after.stderr[-2000:] + before.stderr[-2000:]

    def counts(result):  # each stage's summary line without its seconds
        return [re.sub(r" in [0-9.]+ s$", "", line) for line in result.stdout.splitlines()]

    assert counts(after) == counts(before) and len(counts(after)) == 2
    for stage in ("ingest", "filter"):
        same = compare_stage(tmp_path / "b" / stage, tmp_path / "a" / stage)
        assert same["samples"] > 0 and (same["missing"], same["extra"], same["different"]) == (0, 0, 0), same
    for run in ("a", "b"):
        assert not (tmp_path / run / "text-tokenizer").exists() and not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_a_real_url_list_with_laion_column_names(tmp_path):
    dataset = generate(SyntheticConfig(count=80, seed=3))
    with LoopbackServer(dataset.files) as server:
        rows = url_list_rows(dataset, server.url, dead_url())
        urls = tmp_path / "laion.tsv"
        table = pa.table(
            {"URL": [r["url"] for r in rows], "TEXT": [r["caption"] for r in rows], "LICENSE": ["cc-by"] * len(rows)}
        )
        pacsv.write_csv(table, urls, pacsv.WriteOptions(delimiter="\t"))
        recipe = recipe_for(tmp_path, [urls], url_col="URL", caption_col="TEXT", extra_cols=["LICENSE"])
        result = dalle("run", str(recipe), "--until", "filter", "--no-progress")
    assert result.returncode == 0, result.stderr
    ingest = json.loads((tmp_path / "out" / "ingest" / "_done.json").read_text())
    assert ingest["samples_in"] == len(rows)
    assert ingest["samples_out"] + sum(ingest["counts"].values()) == len(rows)
    lost = ("connection_error", "http_4xx", "http_5xx", "unsupported_format", "decode_error", "truncated")
    failures = sum(1 for r in rows if r["expect"] in lost)
    assert sum(ingest["counts"].values()) == failures
    manifest = pq.read_table(tmp_path / "out" / "filter" / "00000.parquet")
    assert manifest.num_rows > 0
    meta = json.loads(next(iter_samples(str(tmp_path / "out" / "filter" / "00000.tar")))["json"])
    assert meta["LICENSE"] == "cc-by" and meta["caption"] in {r["caption"] for r in rows}
    assert not (tmp_path / "out" / "text-tokenizer").exists()


@pytest.mark.slow
def test_several_url_lists_are_planned_one_task_each_and_a_changed_list_is_refused(tmp_path):
    dataset = generate(SyntheticConfig(count=90, seed=4))
    with LoopbackServer(dataset.files) as server:
        rows = [{"url": r["url"], "caption": r["caption"]} for r in url_list_rows(dataset, server.url, dead_url())]
        lists = [tmp_path / "a.parquet", tmp_path / "b.csv", tmp_path / "c.tsv"]
        pq.write_table(pa.Table.from_pylist(rows[:60]), lists[0])  # two shards of 50
        pacsv.write_csv(pa.Table.from_pylist(rows[60:75]), lists[1])
        pacsv.write_csv(pa.Table.from_pylist(rows[75:]), lists[2], pacsv.WriteOptions(delimiter="\t"))
        recipe = recipe_for(tmp_path, lists)
        result = dalle("run", str(recipe), "--until", "ingest", "--no-progress")
        assert result.returncode == 0, result.stderr
        out = tmp_path / "out" / "ingest"
        assert len(list((out / "_input" / "_ledger").glob("*.json"))) == 3  # one planning task per list
        plan = json.loads((out / "_input" / "_plan.json").read_text())
        assert plan["shards"] == ["000000", "000001", "100000", "200000"] and plan["rows"] == len(rows)
        done = json.loads((out / "_done.json").read_text())
        assert done["samples_in"] == len(rows) and done["samples_out"] + sum(done["counts"].values()) == len(rows)
        keys = sorted(m for p in out.glob("*.parquet") for m in pq.read_table(p)["key"].to_pylist())
        assert keys[0].startswith("000000") and keys[-1].startswith("200000")

        rerun = dalle("run", str(recipe), "--until", "ingest", "--no-progress")  # unchanged: nothing to do
        assert rerun.returncode == 0, rerun.stderr
        pacsv.write_csv(pa.Table.from_pylist(rows[60:74]), lists[1])  # one row fewer
        refused = dalle("run", str(recipe), "--until", "ingest", "--no-progress")
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and "stage 'ingest'" in line and "b.csv" in line


@pytest.mark.slow
def test_an_ingest_of_mostly_dead_links_warns_fails_when_asked_and_resumes_with_a_relaxed_limit(tmp_path):
    """48 of 60 rows on a closed port: over `ingest.max_failed_share` the run exits 1 in one line and
    `dalle status` says why; raising the limit finishes the stage from its committed shards."""
    dataset = generate(SyntheticConfig(count=12, seed=5, defect_fraction=0.0))
    with LoopbackServer(dataset.files) as server:
        rows = [
            {"url": server.url + r["path"], "caption": r["caption"]} if i % 5 == 0 else {"url": f"{dead_url()}/{i}.jpg"}
            for i, r in enumerate(r for r in dataset.rows for _ in range(5))
        ]
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.Table.from_pylist([{"caption": f"row {i}", **r} for i, r in enumerate(rows)]), urls)
        recipe = str(recipe_for(tmp_path, [urls], shard_size=20))
        failed = dalle("run", recipe, "--until", "ingest", "--no-progress", "ingest.max_failed_share=0.5")
        fetched = list(server.served)
        status = dalle("status", recipe, "--json", "ingest.max_failed_share=0.5")
        done = dalle("run", recipe, "--until", "ingest", "--no-progress", "ingest.max_failed_share=0.9")
        refetched = server.served[len(fetched) :]
    share = "80.0% of 60 rows failed (connection_error 48)"
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.strip() == (
        f"dalle: stage 'ingest': {share}, above ingest.max_failed_share 0.5; its 3 shards stay committed: fix the "
        "cause and rerun, or raise ingest.max_failed_share (null: never fail) and rerun to finish without fetching "
        "them again"
    )
    assert sorted(fetched) == sorted(r["path"] for r in dataset.rows)
    ingest = json.loads(status.stdout)[0]
    assert (ingest["stage"], ingest["state"], ingest["shards_done"], ingest["failures"]) == ("ingest", "failed", 3, 0)
    assert ingest["warning"] == f"ingest: {share}, above ingest.max_failed_share 0.5"
    assert done.returncode == 0, done.stderr
    assert f"WARNING pipeline.stages.base: ingest: {share}, above ingest.warn_failed_share 0.3" in done.stderr
    assert refetched == []  # the committed shards were not downloaded again
    stats = json.loads((tmp_path / "out" / "ingest" / "_done.json").read_text())
    assert (stats["samples_in"], stats["samples_out"]) == (60, 12)


def test_plan_for_the_12b_recipe_on_64_and_512_gpus():
    for gpus in (64, 512):
        result = dalle("plan", "jobs/laion-250m-12b.yaml", "--gpus", str(gpus), "--gpu-mem", "80", "--json")
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert 12.0e9 < plan["params"] < 12.5e9 and plan["gpus"] == gpus
        assert plan["recipe"]["zero_stage"] == 3 and plan["recipe"]["fits"]
        for key in ("gpu_peak_gb", "host_peak_gb_per_node", "step_seconds", "comm_gb_per_step"):
            assert plan[key] > 0, key
        assert plan["recipe"]["hpz_copy_gb"] > 0  # the recipe follows the ZeRO++ advice
        # where each stage runs is the recipe's: encode and train ask for GPUs, the models are given
        assert plan["stages"] == {
            "dvae": "given weights",
            "clip": "given weights",
            "encode": "64 actors x 1 GPU",
            "train": "512 workers x 1 GPU",
        }
        zero0 = [r for r in plan["model_states"] if r["zero_stage"] == 0][0]
        assert not zero0["fits"]  # 16 bytes x 12.3B parameters on one 80 GB GPU
    text = dalle("plan", "jobs/laion-250m-12b.yaml", "--gpus", "8", "--gpu-mem", "24")
    assert text.returncode == 0 and "12,293,824,256" in text.stdout
    assert "DOES NOT FIT" in text.stdout and "hint" in text.stdout  # 8 x 24 GB: states alone exceed it
    assert "stages       dvae: given weights; clip: given weights; encode: 64 actors x 1 GPU;" in text.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--gpus", "12", "--gpu-mem", "80"], "do not split into nodes of 8"),
        (["--gpus", "0", "--gpu-mem", "80"], "expected a whole number >= 1"),
        (["--gpus", "8", "--gpu-mem", "lots"], "expected a number > 0"),
    ],
)
def test_plan_refuses_an_impossible_cluster_with_one_line(args, fragment):
    result = dalle("plan", "jobs/laion-250m-12b.yaml", *args)
    assert result.returncode == 2 and fragment in result.stderr


def test_status_watch_redraws_until_interrupted(tmp_path):
    recipe = recipe_for(tmp_path, [tmp_path / "none.tsv"])
    cmd = [sys.executable, "-m", "pipeline.cli", "status", str(recipe), "--watch", "--interval", "0.2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tables = 0
    try:
        for line in proc.stdout:  # not on a terminal: the table again at each redraw
            tables += "ingest" in line
            if tables == 3:
                break
    finally:
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C (SIGINT is ignored when a shell runs the tests in the background)
        _, err = proc.communicate(timeout=60)
    assert tables == 3 and proc.returncode == 0 and err == "", err

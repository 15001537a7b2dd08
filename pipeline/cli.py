"""`dalle`: the command line.

    dalle run RECIPE [key=value ...] [--force STAGE] [--until STAGE] [--address ADDR]
    dalle status RECIPE [key=value ...] [--json | --watch]
    dalle dashboard RECIPE [key=value ...] [--port 8266] [--address RAY_DASHBOARD_URL]
    dalle validate STAGE_DIR [--json] [--drop-damaged]
    dalle export CKPT OUT [--weights ema|model]
    dalle plan RECIPE [key=value ...] --gpus N --gpu-mem GB [--gpus-per-node 8] [--host-mem GB] [--net-gbps 400]
               [--gpu-tflops 312] [--mfu 0.45] [--json]
    dalle sample MODEL "a red cube to the left of a blue sphere" [--n 64] [--top 8] [--out grid.png]
    dalle report RECIPE [key=value ...]
    dalle submit RECIPE [key=value ...] [--address URL] [--follow] [--force STAGE] [--until STAGE]
    dalle jobs [--address URL] [--json]
    dalle logs ID [--address URL] [--follow]
    dalle stop ID [--address URL]

The cluster commands take the dashboard address from --address, else RAY_ADDRESS, and the cluster
token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

User mistakes (bad recipe, bad input, output written by another recipe) print one line and exit
with code 2; a stage whose shards failed exits with 1 (rerun to retry them), as does `validate`
when it finds problems.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import signal
import sys

from pipeline import storage
from pipeline.config.recipe import load_recipe
from pipeline.errors import InputError, RunError, UserError, one_line


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    p = argparse.ArgumentParser(prog="dalle", description="DALL·E training pipeline on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages, resuming from their ledgers")
    run.add_argument("recipe", help="recipe YAML (jobs/*.yaml)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. filter.shard_size=500")
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="redo STAGE and everything downstream of it (repeatable)",
    )
    run.add_argument("--until", metavar="STAGE", help="stop after STAGE")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")

    status = sub.add_parser("status", help="each stage's state, shards and counts")
    status.add_argument("recipe")
    status.add_argument("overrides", nargs="*")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", action="store_true", help="redraw the table every --interval seconds (Ctrl-C ends)")
    status.add_argument("--interval", type=_positive_float, default=2.0, help="seconds between redraws (default 2)")

    validate = sub.add_parser("validate", help="check a stage's shards (ingest, filter, encode) against schemas/")
    validate.add_argument("path", help="a stage folder, e.g. runs/demo/encode")
    validate.add_argument("--json", action="store_true", help="print JSON")
    validate.add_argument(
        "--drop-damaged",
        action="store_true",
        help="take the damaged shards out of the ledger, so that the next `dalle run` makes them again",
    )

    export = sub.add_parser("export", help="consolidated model weights from a training checkpoint")
    export.add_argument("checkpoint", help="a checkpoint_* folder, or a train stage folder (its newest checkpoint)")
    export.add_argument("out", help="output folder (safetensors weights + config.json)")
    export.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="the EMA weights (when kept) or the engine's"
    )

    plan = sub.add_parser("plan", help="will the recipe's transformer training fit a cluster? (memory per GPU)")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--gpus", type=_positive_int, required=True, help="GPUs in total (data-parallel workers)")
    plan.add_argument("--gpu-mem", type=_positive_float, required=True, metavar="GB", help="memory per GPU")
    plan.add_argument("--gpus-per-node", type=_positive_int, default=8, help="GPUs per node (default 8)")
    plan.add_argument("--host-mem", type=_positive_float, metavar="GB", help="host memory per node (checked if given)")
    plan.add_argument("--net-gbps", type=_positive_float, default=400.0, help="network per node (default 400)")
    plan.add_argument("--gpu-tflops", type=_positive_float, default=312.0, help="dense bf16 peak (default 312, A100)")
    plan.add_argument(
        "--mfu", type=_positive_float, default=0.45, help="assumed model FLOPs utilisation (default 0.45)"
    )
    plan.add_argument("--json", action="store_true", help="print JSON")

    sample = sub.add_parser("sample", help="images for a prompt, reranked by CLIP, as a PNG grid")
    sample.add_argument("model", help="a trained transformer folder, e.g. runs/demo/train")
    sample.add_argument("prompt")
    sample.add_argument("--n", type=_positive_int, default=64, help="candidates to draw (default 64)")
    sample.add_argument("--top", type=_positive_int, default=8, help="best candidates kept (default 8)")
    sample.add_argument("--out", default="grid.png", help="grid PNG; single images go to <stem>/ (default grid.png)")
    sample.add_argument("--temperature", type=_positive_float, default=1.0)
    sample.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k likeliest tokens")
    sample.add_argument("--top-p", type=_positive_float, default=None, help="nucleus sampling mass in (0, 1]")
    sample.add_argument(
        "--guidance",
        type=_float_above(0, inclusive=True),
        default=1.0,
        help="classifier-free guidance scale (default 1: unguided; the model needs null_caption_prob > 0)",
    )
    sample.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="candidates drawn together (default: as many as the device's free memory fits; same images)",
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--columns", type=_positive_int, default=8, help="grid columns")
    sample.add_argument("--complete", metavar="IMAGE", help="image completion: keep the top rows of IMAGE")
    sample.add_argument("--rows", type=int, metavar="R", help="token rows of IMAGE to keep (with --complete)")
    for name in ("dvae", "clip", "tokenizer"):
        sample.add_argument(f"--{name}", help=f"the {name} (default: the one in MODEL/models.json)")
    sample.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    sample.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")

    dashboard = sub.add_parser("dashboard", help="serve a live web page of a run: stages, curves, samples, links")
    dashboard.add_argument("recipe")
    dashboard.add_argument("overrides", nargs="*")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8266, help="port (default 8266; 0 picks a free one)")
    dashboard.add_argument("--address", help="the Ray dashboard to link to (default: RAY_ADDRESS when it is a URL)")

    report = sub.add_parser("report", help="write report.html under the recipe's output directory")
    report.add_argument("recipe")
    report.add_argument("overrides", nargs="*")

    address_help = "the Ray dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS)"
    submit = sub.add_parser("submit", help="run a recipe as a Ray job on a cluster (resumes from its ledgers)")
    submit.add_argument("recipe")
    submit.add_argument("overrides", nargs="*")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument("--force", action="append", default=[], metavar="STAGE", help="as for `dalle run`")
    submit.add_argument("--until", metavar="STAGE", help="as for `dalle run`")
    submit.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job (repeatable)"
    )
    submit.add_argument(
        "--no-resource-check", action="store_true", help="submit even if the cluster lacks the GPUs asked for now"
    )

    jobs = sub.add_parser("jobs", help="the cluster's jobs, newest first")
    jobs.add_argument("--address", help=address_help)
    jobs.add_argument("--json", action="store_true", help="print JSON")

    logs = sub.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument("--address", help=address_help)
    logs.add_argument("--follow", action="store_true", help="stream them until the job ends")

    stop = sub.add_parser("stop", help="stop a job; submitting its recipe again resumes it")
    stop.add_argument("job_id", metavar="ID")
    stop.add_argument("--address", help=address_help)
    return p, sub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with each command's options and its `key=value` overrides in any order
    (`dalle run R --until filter a=1` and `dalle run R a=1 --until filter` are the same)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = _parser()
    if argv and argv[0] in commands.choices:
        args = commands.choices[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # usage, --help and unknown commands


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _float_above(bound: float, inclusive: bool = False):
    """An argparse type: a float > `bound` (>= when `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value >= bound if inclusive else value > bound):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if inclusive else '>'} {bound:g}, got {text!r}")
        return value

    return parse


_positive_float = _float_above(0)


def _run(args: argparse.Namespace) -> int:
    from pipeline import workflow

    recipe = load_recipe(args.recipe, args.overrides)
    address = args.address or os.environ.get("RAY_ADDRESS")
    results = workflow.run(
        recipe,
        force=args.force,
        until=args.until,
        address=address,
        show_progress=not args.no_progress,
        worker_logs=args.verbose,
    )
    for name, stats in results.items():
        drops = ", ".join(f"{k} {v}" for k, v in stats.get("counts", {}).items() if v) or "none"
        print(
            f"{name}: {stats.get('samples_in')} in, {stats.get('samples_out')} out "
            f"({drops}) in {stats.get('seconds', 0):.1f} s"
        )
    if args.until is None:
        from pipeline.views.report import write_report

        print(f"report: {write_report(recipe)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipeline import workflow
    from pipeline.views.status import print_status, watch_status

    recipe = load_recipe(args.recipe, args.overrides)
    if args.json:
        print(json.dumps([row.to_dict() for row in workflow.status(recipe)], indent=2))
    elif args.watch:
        interruptible()
        watch_status(recipe, args.interval)
    else:
        print_status(workflow.status(recipe))
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from pipeline.views.dashboard import serve

    recipe = load_recipe(args.recipe, args.overrides)
    address = args.address or os.environ.get("RAY_ADDRESS")
    interruptible()
    serve(recipe, args.host, args.port, ray_dashboard=address if address and "://" in address else None)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pipeline.commands.validate import drop_damaged, validate

    report = validate(args.path)
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines(args.path)))
    if not args.drop_damaged or report.ok:
        return 0 if report.ok else 1
    dropped = drop_damaged(args.path, report)
    print(f"dropped {len(dropped)} damaged shards ({', '.join(dropped)}): rerun `dalle run` to make them again")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.commands.export import describe, export

    print(describe(export(args.checkpoint, args.out, args.weights)))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pipeline.cluster.client import stage_devices
    from pipeline.commands.plan import format_plan, plan, plan_inputs

    recipe = load_recipe(args.recipe, args.overrides)
    cluster = {"host_mem_gb": args.host_mem, "net_gbps": args.net_gbps, "gpu_tflops": args.gpu_tflops, "mfu": args.mfu}
    shape, request, runtime = plan_inputs(recipe, args.gpus, args.gpu_mem, args.gpus_per_node, **cluster)
    result = {**plan(shape, request, runtime), "stages": stage_devices(recipe)}
    where = "; ".join(f"{stage}: {device}" for stage, device in result["stages"].items())
    print(json.dumps(result, indent=2) if args.json else f"{format_plan(result)}\nstages       {where}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pipeline.commands.sample import describe, sample
    from pipeline.models.generator import SamplingConfig

    if args.top_p is not None and args.top_p > 1:
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.batch_size, args.seed, args.guidance)
    summary = sample(
        args.model,
        args.prompt,
        args.out,
        n=args.n,
        top=args.top,
        sampling=sampling,
        columns=args.columns,
        complete=args.complete,
        rows=args.rows,
        dvae=args.dvae,
        clip=args.clip,
        tokenizer=args.tokenizer,
        device=args.device,
        precision=args.precision,
    )
    print(describe(summary))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipeline.views.report import write_report

    print(write_report(load_recipe(args.recipe, args.overrides)))
    return 0


def _env_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--env {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def interruptible() -> None:
    """Ctrl-C and SIGTERM both end a long-running command quietly (KeyboardInterrupt), even when
    it was started in the background with SIGINT ignored."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)


def _job_exit(job_id: str, state: str) -> int:
    print(f"job {job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _submit(args: argparse.Namespace) -> int:
    from pipeline.cluster import jobs
    from pipeline.cluster.client import dashboard_address
    from pipeline.workflow import stage_name

    address = dashboard_address(args.address)
    for name in [*args.force, *([args.until] if args.until else [])]:
        stage_name(name)
    job_id = jobs.submit(
        address,
        args.recipe,
        args.overrides,
        force=args.force,
        until=args.until,
        env=_env_pairs(args.env),
        check_resources=not args.no_resource_check,
    )
    print(f"submitted {job_id}")
    print(f"dashboard: {jobs.job_url(address, job_id)}")
    if not args.follow:
        print(f"follow it: dalle logs {job_id} --follow --address {address}")
        return 0
    try:
        return _job_exit(job_id, jobs.logs(address, job_id, follow=True))
    except KeyboardInterrupt:
        print(f"detached; the job goes on (dalle logs {job_id} --follow, dalle stop {job_id})", file=sys.stderr)
        return 130


def _jobs(args: argparse.Namespace) -> int:
    from pipeline.cluster import jobs
    from pipeline.cluster.client import dashboard_address
    from pipeline.views.status import print_jobs

    rows = jobs.list_jobs(dashboard_address(args.address))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_jobs(rows)
    return 0


def _logs(args: argparse.Namespace) -> int:
    from pipeline.cluster import jobs
    from pipeline.cluster.client import dashboard_address

    address = dashboard_address(args.address)
    state = jobs.logs(address, args.job_id, follow=args.follow)
    return _job_exit(args.job_id, state) if args.follow else 0


def _stop(args: argparse.Namespace) -> int:
    from pipeline.cluster import jobs
    from pipeline.cluster.client import dashboard_address

    state = jobs.stop(dashboard_address(args.address), args.job_id)
    print(f"job {args.job_id}: {state}")
    return 0 if state in jobs.TERMINAL else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"dalle: error: {err}", file=sys.stderr)
        return err.exit_code
    except RunError as err:
        print(f"dalle: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("dalle: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        message = _environment_failure(err)
        if message is None:
            raise
        print(f"dalle: {message}; rerun the same command to resume", file=sys.stderr)
        return 1


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _environment_failure(err: Exception) -> str | None:
    """What a run that the machine stopped (a full disk, an object store that does not answer)
    tells the user in one line; None for any other error. What was committed stays."""
    down = storage.unreachable(err)
    if down is not None:
        return f"the object store does not answer ({one_line(down, typed=False)})"
    if isinstance(err, OSError) and err.errno in OUT_OF_SPACE:
        where = f" writing {err.filename}" if err.filename else ""
        return f"{os.strerror(err.errno).lower()}{where}: free some space"
    return None


COMMANDS = {
    "run": _run,
    "status": _status,
    "validate": _validate,
    "export": _export,
    "plan": _plan,
    "sample": _sample,
    "report": _report,
    "dashboard": _dashboard,
    "submit": _submit,
    "jobs": _jobs,
    "logs": _logs,
    "stop": _stop,
}

# Commands that hold nothing a teardown must release (no Ray, no W&B run, no files open for writing)
# end the process at once after their output is flushed: now and then (1 in 30 `dalle validate`s
# here) a native library's worker thread (pyarrow's pools) was still joinable when the interpreter
# tore down, and the C++ runtime aborted the process after it had printed its verdict, exit -6.
ENDS_AT_ONCE = {"validate", "status", "plan"}


def entry() -> None:
    """The `dalle` command."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv and argv[0] in ENDS_AT_ONCE:  # the command, as parse_args takes it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

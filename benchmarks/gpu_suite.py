"""The GPU paths in one command: the `gpu` tests, training steps, the train stage's own loop
through checkpoints, evaluation and a SIGKILL resume, encode, sampling and the shapes task, each a
benchmark of this folder run in its own process, gathered into one JSON with the targets they are
held to.

    benchmarks/gpu_wheels.sh wheels        # here; wheels/ is gitignored, carry it to the device call
    # on the GPU machine (no Ray needed):
    python3 -m pip install -q --no-deps --no-index wheels/*.whl
    python3 benchmarks/gpu_suite.py --out "$OUT"            # <= 9 minutes on one H100
    .venv/bin/python benchmarks/gpu_suite.py --tiny --out /tmp/suite   # every section on CPU

Writes DIR/gpu_suite.json (device, versions, each section's figures or its error, the targets)
and DIR/<section>.log (each section's whole output; pytest's is DIR/pytest.log). A section that
fails or runs out of time is recorded and the suite goes on; the exit status is 1 if any failed.
`--tiny` shrinks every section to CPU size (demo presets, a few steps), to prove the suite works
before it meets a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
BUDGET = 540
"""Seconds for the whole suite on a GPU: 9 of a lent device's 15 minutes, leaving a second call room."""
GPU_TESTS = [f"tests/test_{name}.py" for name in ("attention", "transformer", "generator", "gpu_paths")]


def sections(tiny: bool, out: Path) -> dict[str, tuple[list[str], int]]:
    """Each section's command (run from the repository root) and its time limit in seconds."""
    py = sys.executable
    shapes = [py, str(BENCH / "shapes.py"), "jobs/shapes-gpu.yaml", "--out", str(out / "shapes")]
    loop = [py, str(BENCH / "train_loop.py"), "--out", str(out / "loop")]
    if tiny:
        train = ["demo", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]
        sample = ["demo", "--candidates", "4", "--batch", "4", "--recompute-tokens", "2"]
        return {
            "pytest": ([py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_TESTS], 300),
            "train_small": ([py, str(BENCH / "train.py"), *train, "--compile", "both"], 300),
            "train_1.3b": ([py, str(BENCH / "train.py"), *train, "--checkpoint-activations"], 300),
            "train_loop": ([*loop, "--tiny", "--steps", "4"], 300),
            "encode": ([py, str(BENCH / "encode.py"), "--images", "16", "--batch", "8", "--repeats", "1"], 300),
            "sample_small": ([py, str(BENCH / "sample.py"), *sample], 300),
            "sample_1.3b": ([py, str(BENCH / "sample.py"), *sample], 300),
            "shapes": ([*shapes, "--tiny"], 300),
        }  # fmt: skip
    # the limits add up to the suite's budget (BUDGET): every section can use its whole limit and the
    # suite still ends in time; nothing JIT-builds (the train engine's AdamW is torch's fused one)
    return {
        "pytest": ([py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_TESTS], 110),
        "train_small": ([py, str(BENCH / "train.py"), "small", "--micro-batch", "16", "--compile", "both"], 60),
        "train_1.3b": (
            [py, str(BENCH / "train.py"), "1.3b", "--micro-batch", "8", "--compile", "both", "--steps", "6"],
            100,
        ),
        "train_loop": (loop, 90),
        "encode": ([py, str(BENCH / "encode.py"), "--preset", "full", "--images", "4096", "--batch", "512"], 40),
        "sample_small": ([py, str(BENCH / "sample.py"), "small", "--candidates", "512", "--batch", "256"], 35),
        "sample_1.3b": ([py, str(BENCH / "sample.py"), "1.3b", "--candidates", "512", "--batch", "128"], 55),
        "shapes": ([*shapes, "--scale", "0.05"], 50),
    }


def run_section(name: str, command: list[str], limit: float, out: Path) -> dict:
    """Runs one section; its figures (the last JSON object it printed) or its error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)}
    log = out / ("pytest.log" if name == "pytest" else f"{name}.log")
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as err:
        rc, stdout, stderr = None, _text(err.stdout), _text(err.stderr) + f"\nkilled after {limit:.0f} s"
    seconds = round(time.monotonic() - started, 1)
    log.write_text(f"$ {' '.join(command)}\n{stdout}\n--- stderr ---\n{stderr}")
    record: dict = {"ok": rc == 0, "rc": rc, "seconds": seconds, "log": log.name}
    if name == "pytest":
        record["summary"] = _last_line(stdout)
    elif rc == 0:
        record["figures"] = json.loads(stdout[stdout.index("{") :])
    if rc != 0:
        record["error"] = _last_line(stderr) or _last_line(stdout)
    return record


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def targets(results: dict, judged: bool = True) -> list[dict]:
    """Issue 18's targets against the figures ("met" None where a section gave none, or for a
    `--tiny` run, whose figures are not the targets' sizes)."""

    def figure(section: str, *path: str):
        value = results.get(section, {}).get("figures")
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    mfus = [r["mfu"] for r in (figure("train_1.3b", "results") or {}).values() if r.get("mfu") is not None]
    best_1_3b = max(mfus, default=None)
    flex = [figure(s, k) for s in ("train_small", "train_1.3b") for k in ("flex_over_sdpa", "flex_over_sdpa_compile")]
    flex = [f for f in flex if f is not None]
    checks = [
        ("1.3b training MFU (bf16, best of compiled/eager)", best_1_3b, ">=", 0.45),
        ("FlexAttention over dense masked SDPA (worst case)", min(flex) if flex else None, ">=", 1.3),
        ("encode images/s (dVAE + CLIP B/32, one pass)", figure("encode", "images_per_s", "encode_pass"), ">=", 5000),
        ("KV cache over recomputation (1.3b)", figure("sample_1.3b", "cached_vs_recompute", "speedup"), ">=", 10),
        ("512 candidates at 1.3b reranked, seconds", figure("sample_1.3b", "seconds", "total"), "<", 60),
    ]
    out = []
    for name, value, op, bound in checks:
        met = None if value is None or not judged else (value >= bound if op == ">=" else value < bound)
        out.append({"target": name, "value": value, "bound": f"{op} {bound}", "met": met})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_suite.json and the logs")
    p.add_argument("--tiny", action="store_true", help="every section at CPU size")
    p.add_argument("--only", nargs="*", help="run only these sections")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole suite (sections share it)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    started = time.monotonic()
    results: dict[str, dict] = {}
    for name, (command, limit) in sections(args.tiny, out).items():
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.monotonic() - started)
        if left < 5:
            results[name] = {"ok": False, "rc": None, "seconds": 0.0, "error": "not run: the suite's budget was spent"}
            continue
        results[name] = run_section(name, command, min(limit, left), out)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['seconds']} s", flush=True)
    report = {
        "benchmark": "gpu_suite",
        "tiny": args.tiny,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seconds": round(time.monotonic() - started, 1),
        "sections": results,
        "targets": targets(results, judged=not args.tiny),
    }
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("device", "torch", "seconds", "targets")}, indent=2))
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()

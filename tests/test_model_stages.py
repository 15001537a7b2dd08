"""dvae → clip → encode end to end at test size on the synthetic set (real Ray Train with 2 CPU
workers, real DeepSpeed, real Ray Data actors): encode resumes with 0 lost and 0 duplicated (the dVAE's
resume after a SIGKILL is tested on S3, in test_s3.py);
the encoded shards hold what the models say; `dalle validate` catches broken shards."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import TINY, compare_stage, dalle, free_port, kill_run_when, recipe_at

from pipeline.config.models import DVAESection
from pipeline.data.image_tensors import to_tensor
from pipeline.data.images import decode_rgb
from pipeline.data.shards import iter_samples, npy_load
from pipeline.engine.ledger import Attempt, Ledger
from pipeline.models.bpe import TextTokenizer
from pipeline.models.clip import load_clip
from pipeline.models.dvae import load_dvae
from pipeline.observe.tracking import read_metrics
from pipeline.stages.dvae_task import schedules
from pipeline.stages.encode_shard import Encoders, EncodeTask, encode_shard

pytestmark = pytest.mark.slow


def test_dvae_training_logs_its_schedules_and_measures_its_reconstructions(run):
    out, _ = run
    lines = [m for m in read_metrics(str(out / "dvae" / "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(5, 61, 5))
    cfg = DVAESection.model_validate(TINY["dvae"])
    for line in lines:  # each line averages the schedule over the steps of its window
        window = range(line["step"] - 5, line["step"])
        assert line["temperature"] == pytest.approx(np.mean([schedules(cfg, s)[0] for s in window]))
        assert line["kl_weight"] == pytest.approx(np.mean([schedules(cfg, s)[1] for s in window]))
    assert lines[-1]["temperature"] < 0.08 and lines[-1]["kl_weight"] == pytest.approx(6.6)
    assert lines[-1]["nll"] < lines[0]["nll"]
    scores = json.loads((out / "dvae" / "metrics.json").read_text())
    # measured on the 8 held-out images; at this size (60 updates) the dVAE does not yet beat
    # the held-out mean image; the demo's settings do (the test below)
    assert 0 < scores["recon_mse"] < 0.1 and 0 < scores["mean_image_mse"] < 0.1, scores
    assert (out / "dvae" / "reconstructions.png").stat().st_size > 0
    checkpoints = sorted(p.name for p in (out / "dvae" / "_train" / "run").glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_00000030", "checkpoint_00000060"]  # keep_checkpoints: 2
    assert list((out / "dvae" / "wandb").glob("offline-run-*"))


def test_clip_stage_trains_and_saves_a_loadable_hf_folder(run):
    out, _ = run
    clip = load_clip(str(out / "clip" / "model"))
    assert clip.image_size == 32
    scores = json.loads((out / "clip" / "metrics.json").read_text())
    assert set(scores) == {"retrieval_top1", "matched_cosine", "mismatched_cosine"}
    assert (out / "clip" / "model" / "config.json").exists()


def test_encoded_shards_hold_what_the_models_say(run):
    out, recipe = run
    data = yaml.safe_load(recipe.read_text())
    dvae = load_dvae(str(out / "dvae" / "dvae.pt"))
    clip = load_clip(str(out / "clip" / "model")).eval()
    text = TextTokenizer.load(str(out / "text-tokenizer" / "tokenizer.json"), data["text_tokenizer"]["text_len"])
    filtered = {}
    for record in Ledger(str(out / "filter")).done().values():
        for s in iter_samples(str(out / "filter" / record.files[0])):
            filtered[s["__key__"]] = s
    done = json.loads((out / "encode" / "_done.json").read_text())
    assert done["samples_in"] == len(filtered)
    assert done["samples_out"] == done["samples_in"] and done["counts"]["clip_similarity"] == 0  # no threshold
    seen = 0
    for _, record in sorted(Ledger(str(out / "encode")).done().items()):
        manifest = pq.read_table(out / "encode" / record.files[1]).to_pylist()
        samples = list(iter_samples(str(out / "encode" / record.files[0])))
        assert [m["key"] for m in manifest] == [s["__key__"] for s in samples]
        keys = [s["__key__"] for s in samples]
        images = np.stack([decode_rgb(filtered[k]["jpg"], 64) for k in keys])
        with torch.no_grad():
            want_tokens = dvae.tokens(to_tensor(images)).numpy()
            want_img = clip.image_embeddings(clip.preprocess(images)).numpy()
        for i, (sample, meta) in enumerate(zip(samples, manifest)):
            tokens = npy_load(sample["image_tokens.npy"])
            assert tokens.dtype == np.uint16 and tokens.shape == (64,)
            np.testing.assert_array_equal(tokens, want_tokens[i])  # aligned with its own key
            caption = filtered[sample["__key__"]]["txt"].decode()
            assert sample["txt"].decode() == caption == meta["caption"]
            np.testing.assert_array_equal(npy_load(sample["text_tokens.npy"]), text.encode(caption))
            img, txt = npy_load(sample["clip_image.npy"]), npy_load(sample["clip_text.npy"])
            assert img.dtype == txt.dtype == np.float16
            np.testing.assert_allclose(img.astype(np.float32), want_img[i], atol=2e-3)
            sim = float(img.astype(np.float32) @ txt.astype(np.float32))
            assert sim == pytest.approx(meta["clip_similarity"], abs=5e-3)
            assert json.loads(sample["json"])["clip_similarity"] == pytest.approx(meta["clip_similarity"], abs=1e-5)
        seen += len(samples)
    assert seen == done["samples_out"]


def test_clip_threshold_drops_exactly_the_pairs_below_it(tmp_path, run):
    out, recipe = run
    data = yaml.safe_load(recipe.read_text())
    shard, record = sorted(Ledger(str(out / "filter")).done().items())[0]
    reference = pq.read_table(out / "encode" / f"{shard}.parquet").to_pylist()
    sims = {r["key"]: r["clip_similarity"] for r in reference}
    threshold = float(np.median(list(sims.values())))
    models = Encoders.load(
        dvae=str(out / "dvae" / "dvae.pt"),
        clip=str(out / "clip" / "model"),
        tokenizer=str(out / "text-tokenizer" / "tokenizer.json"),
        text_len=data["text_tokenizer"]["text_len"],
        batch_size=32,
    )
    filtered = [str(out / "filter" / f) for f in record.files]
    task = EncodeTask(shard, url=filtered[0], manifest=filtered[1], count=record.samples_out)
    attempt = Attempt(Ledger(str(tmp_path / "encode")), shard, "test")
    result = attempt.commit(encode_shard(models, task, attempt, threshold))
    kept = pq.read_table(tmp_path / "encode" / f"{shard}.parquet").to_pylist()
    assert [r["key"] for r in kept] == [k for k, v in sims.items() if v >= threshold]
    below = sum(1 for v in sims.values() if v < threshold)
    assert below > 0 and result.counts == {"clip_similarity": below}
    assert result.samples_in == len(sims) and result.samples_out == len(kept)


def test_encode_resumes_after_sigkill_with_nothing_lost_or_duplicated(tmp_path, run):
    recipe, out = recipe_at(tmp_path, run, ["ingest", "filter", "text-tokenizer", "dvae", "clip"])
    ledger = out / "encode" / "_ledger"
    kill_run_when(
        ["run", str(recipe), "--until", "encode", "--no-progress"],
        lambda: ledger.exists() and len(list(ledger.glob("*.json"))) >= 1,
    )
    partial = len(list(ledger.glob("*.json")))
    total = len(Ledger(str(out / "filter")).done())
    assert 1 <= partial < total
    # resumed on a pool of another size (one actor instead of an autoscaling pool), as after a resize
    result = dalle("run", str(recipe), "encode.actors=1", "--until", "encode", "--no-progress", "-v", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 1 actors" in result.stderr
    diff = compare_stage(out / "encode", run[0] / "encode")
    assert diff["samples"] > 0
    assert {k: diff[k] for k in ("missing", "extra", "duplicate", "different")} == dict.fromkeys(
        ("missing", "extra", "duplicate", "different"), 0
    )


def _validate(path):
    return dalle("validate", str(path))


def test_validate_passes_every_stage_of_a_good_run(run):
    out, _ = run
    for stage in ("ingest", "filter", "encode"):
        result = _validate(out / stage)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith(": ok")


def test_validate_catches_a_truncated_tar_and_a_missing_member(tmp_path, run):
    out = tmp_path / "encode"
    shutil.copytree(run[0] / "encode", out)
    shards = sorted(Ledger(str(out)).done())
    truncated = out / f"{shards[0]}.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])

    # rewrite the second shard without one sample's CLIP text embedding
    victim = out / f"{shards[1]}.tar"
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = next(m.name for m, _ in members if m.name.endswith(".clip_text.npy"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, payload in members:
            if info.name != dropped:
                tar.addfile(info, io.BytesIO(payload))
    victim.write_bytes(buf.getvalue())

    result = _validate(out)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    key = dropped.split(".")[0]
    assert any(f"shard {shards[0]}" in ln and "unreadable" in ln and "truncated" in ln for ln in lines), lines
    assert any(f"shard {shards[1]}" in ln and f"key {key}: missing member clip_text.npy" in ln for ln in lines)
    assert lines[-1].startswith("encode:") and "problems in 2 shards" in lines[-1]


def test_validate_refuses_a_folder_that_is_not_a_shard_set(run, tmp_path):
    result = _validate(run[0] / "dvae")
    assert result.returncode == 2 and "stage 'dvae' has no shard set" in result.stderr
    result = _validate(tmp_path)
    assert result.returncode == 2 and "not a stage folder" in result.stderr


def test_dvae_stage_uses_openai_weights_instead_of_training(tmp_path, run):
    import dall_e

    recipe, out = recipe_at(tmp_path, run, ["ingest", "filter", "text-tokenizer"])
    torch.manual_seed(0)
    weights = tmp_path / "openai"
    weights.mkdir()
    encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(encoder, weights / "encoder.pkl")
    torch.save(dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512), weights / "decoder.pkl")
    args = ["dvae.image_size=256", "dvae.vocab_size=512"]

    result = dalle("run", str(recipe), *args, f"dvae.weights={tmp_path / 'nowhere'}", "--until", "dvae")
    assert result.returncode == 2 and "dvae.weights:" in result.stderr and "nowhere" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = dalle("run", str(recipe), *args, f"dvae.weights={weights}", "--until", "dvae", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    ours = load_dvae(str(out / "dvae" / "dvae.pt"))
    images = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        want = encoder(dall_e.map_pixels(images)).argmax(1).flatten(1)
    torch.testing.assert_close(ours.tokens(images), want)
    scores = json.loads((out / "dvae" / "metrics.json").read_text())
    assert scores["recon_mse"] > 0
    assert not (out / "dvae" / "_train").exists()  # checked, not trained


def test_the_demo_dvae_reconstructs_held_out_images_far_better_than_their_mean_image(tmp_path):
    """The demo recipe's dVAE settings (straight-through codes, usage reward, pixel MSE; 16x16
    tokens) for 250 of the demo's 2240 updates on 600 of its 2400 images, scored on 16 filtered images it
    never trained on (0.27x the mean image's error measured; 175 updates give 0.53x). The paper's loss
    at this length did not beat the mean image by much."""
    overrides = [f"output_dir={tmp_path / 'out'}", f"ingest.synthetic.port={free_port()}"]
    overrides += ["ingest.synthetic.count=600", "dvae.train.steps=250", "dvae.train.checkpoint_every=250"]
    result = dalle("run", "jobs/demo.yaml", *overrides, "--until", "dvae", "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((tmp_path / "out" / "dvae" / "metrics.json").read_text())
    assert scores["recon_mse"] < 0.5 * scores["mean_image_mse"], scores

"""Tests of the synthetic captioned-shapes dataset and of the loopback server that serves it."""

from __future__ import annotations

import collections
import io
import json
import random
import re
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from pipeline.config.data import DEFAULT_BOILERPLATE, SyntheticConfig
from pipeline.synthetic import dataset as synthetic
from pipeline.synthetic.server import LoopbackServer, dead_url

CFG = SyntheticConfig(count=400, seed=7)
OK_IMAGES = ("clean", "png", "webp")  # rows the filter must keep, so no two may be near duplicates


@pytest.fixture(scope="module")
def data() -> synthetic.SyntheticSet:
    return synthetic.generate(CFG)


def _of(data: synthetic.SyntheticSet, kind: str) -> list[dict]:
    return [r for r in data.rows if r["kind"] == kind]


def _truth(row: dict) -> dict:
    return json.loads(row["truth"])


def _image(data: synthetic.SyntheticSet, row: dict) -> Image.Image:
    return Image.open(io.BytesIO(data.files[row["path"]][0]))


_N = 64
_DCT = np.cos(np.pi * (2 * np.arange(_N)[None, :] + 1) * np.arange(_N)[:, None] / (2 * _N)) * np.sqrt(2 / _N)
_DCT[0] /= np.sqrt(2)


def _phash(image: Image.Image) -> np.ndarray:
    """64-bit DCT perceptual hash of the image resized to 64x64, as the near-duplicate filter uses."""
    grey = np.asarray(image.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    return low > np.median(low)


def test_same_config_gives_same_bytes_and_another_seed_does_not(data):
    again = synthetic.generate(CFG)
    assert again.rows == data.rows
    assert again.files == data.files
    assert again.heldout == data.heldout
    other = synthetic.generate(CFG.model_copy(update={"seed": 8}))
    assert other.files != data.files


def test_row_counts_and_fields(data):
    assert len(_of(data, "clean")) == 400
    assert len(data.rows) == 400 + round(400 * CFG.defect_fraction)
    two = [r for r in _of(data, "clean") if "relation" in _truth(r)]
    assert len(two) == round(400 * CFG.two_object_fraction)
    for row in data.rows:
        assert set(row) == {"path", "caption", "truth", "kind", "expect"}
        assert re.fullmatch(r"(/status/(404|500))?/img/\d{6}\.(jpg|png|webp)", row["path"])


def test_every_attribute_and_relation_occurs(data):
    objects = [o for r in _of(data, "clean") for o in _truth(r)["objects"]]
    assert {o["colour"] for o in objects} == set(synthetic.COLOURS)
    assert {o["shape"] for o in objects} == set(synthetic.SHAPES)
    assert {o["size"] for o in objects} == set(synthetic.SIZES)
    lone = [_truth(r)["objects"][0] for r in _of(data, "clean") if "relation" not in _truth(r)]
    assert {o["position"] for o in lone} == set(synthetic.POSITIONS)
    relations = {_truth(r).get("relation") for r in _of(data, "clean")}
    assert relations == set(synthetic.RELATIONS) | {None}
    assert len(synthetic.COLOURS) >= 6 and len(synthetic.SHAPES) >= 4


def test_heldout_pairs_never_shown(data):
    assert len(data.heldout) == CFG.heldout_pairs == len(set(data.heldout))
    shown = {(o["colour"], o["shape"]) for r in data.rows if r["truth"] != "null" for o in _truth(r)["objects"]}
    assert shown.isdisjoint(data.heldout)
    assert len(shown) == len(synthetic.COLOURS) * len(synthetic.SHAPES) - CFG.heldout_pairs
    many = synthetic.generate(SyntheticConfig(count=40, heldout_pairs=20, defect_fraction=0))
    assert len(set(many.heldout)) == 20
    assert {c for c, _ in many.heldout} == set(synthetic.COLOURS)  # spread, yet each colour still shown
    assert {o["colour"] for r in many.rows for o in _truth(r)["objects"]} == set(synthetic.COLOURS)


def test_every_defect_kind_is_present_with_its_label(data):
    seen = collections.defaultdict(set)
    for row in data.rows:
        seen[row["kind"]].add(row["expect"])
    assert seen.pop("clean") == {"ok"}
    assert seen == {kind: {expect} for kind, expect in synthetic.DEFECT_KINDS.items()}
    assert synthetic.DEFECT_KINDS["dead_host"] == "connection_error"
    assert synthetic.DEFECT_KINDS["truncated_jpeg"] == "truncated"
    assert synthetic.DEFECT_KINDS["png"] == synthetic.DEFECT_KINDS["webp"] == "ok"


def test_defects_that_fetch_nothing_or_no_image(data):
    for row in _of(data, "dead_host"):
        assert row["path"] not in data.files and row["truth"] == "null"
    for code in ("404", "500"):
        for row in _of(data, f"http_{code}"):
            assert row["path"].startswith(f"/status/{code}/") and row["path"] not in data.files
    for row in _of(data, "not_image"):
        body, content_type = data.files[row["path"]]
        assert content_type.startswith("text/html") and body.lstrip().startswith(b"<!doctype html>")
        with pytest.raises(OSError):
            Image.open(io.BytesIO(body))
    for row in _of(data, "truncated_jpeg"):
        body, content_type = data.files[row["path"]]
        assert content_type == "image/jpeg" and body[:2] == b"\xff\xd8" and not body.endswith(b"\xff\xd9")
        with pytest.raises(OSError):
            Image.open(io.BytesIO(body)).load()


def test_odd_images(data):
    for kind, fmt in (("png", "PNG"), ("webp", "WEBP")):
        for row in _of(data, kind):
            assert _image(data, row).format == fmt and data.files[row["path"]][1] == f"image/{kind}"
    for row in _of(data, "extreme_aspect"):
        w, h = _image(data, row).size
        assert (w / h >= 3 or h / w >= 3) and min(w, h) >= 64  # only the aspect rule applies
    for row in _of(data, "tiny"):
        assert _image(data, row).size == (16, 16)


def test_duplicates_copy_an_earlier_clean_row(data):
    order = {id(r): i for i, r in enumerate(data.rows)}
    clean = _of(data, "clean")
    for row in _of(data, "duplicate_url"):
        src = [c for c in clean if c["path"] == row["path"]]
        assert len(src) == 1 and src[0]["caption"] == row["caption"] and order[id(src[0])] < order[id(row)]
    for row in _of(data, "same_image_new_url"):
        body = data.files[row["path"]][0]
        src = [c for c in clean if data.files[c["path"]][0] == body]
        assert len(src) == 1 and src[0]["caption"] == row["caption"] and src[0]["path"] != row["path"]
        assert order[id(src[0])] < order[id(row)]
    for row in _of(data, "near_duplicate"):
        src = [c for c in clean if c["truth"] == row["truth"]]
        assert len(src) == 1 and order[id(src[0])] < order[id(row)]
        assert src[0]["caption"] != row["caption"] and data.files[src[0]["path"]][0] != data.files[row["path"]][0]
        assert (_phash(_image(data, src[0])) != _phash(_image(data, row))).sum() <= 4


def test_captions(data):
    identify = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    for row in data.rows:
        text, kind = row["caption"], row["kind"]
        if kind == "empty_caption":
            assert text == ""
            continue
        assert len(text.split()) >= 3
        lang, prob = identify.classify(text)
        assert (lang != "en" and prob >= 0.5) == (kind == "non_english"), text
        is_boilerplate = any(re.search(p, text, re.IGNORECASE) for p in DEFAULT_BOILERPLATE)
        assert is_boilerplate == (kind == "boilerplate"), text
        if row["truth"] != "null" and kind not in ("non_english", "boilerplate"):
            truth = _truth(row)
            for obj in truth["objects"]:
                assert f"{obj['colour']} {obj['shape']}" in text or f"{obj['shape']} in {obj['colour']}" in text
            if "relation" in truth:
                inverse = {
                    "to the left of": "to the right of",
                    "to the right of": "to the left of",
                    "above": "below",
                    "below": "above",
                }
                assert truth["relation"] in text or inverse[truth["relation"]] in text
    assert len({r["caption"] for r in _of(data, "clean")}) >= 350  # paraphrased, not one per attribute set


def test_geometry_matches_the_truth(data):
    widths = collections.defaultdict(list)
    for row in _of(data, "clean"):
        truth, image = _truth(row), _image(data, row).convert("RGB")
        side = image.width
        for obj in truth["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side
            widths[obj["shape"], obj["size"]].append(max(x1 - x0, y1 - y0))
            # The box centre lies inside the shape and is its palette colour, nearest by far.
            pixel = np.array(image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)), dtype=float)
            dist = {c: np.linalg.norm(pixel - rgb) for c, rgb in synthetic.COLOURS.items()}
            assert min(dist, key=dist.get) == obj["colour"] and dist[obj["colour"]] < 40
        if "relation" in truth:
            a, b = (o["box"] for o in truth["objects"])
            visible = {
                "to the left of": a[2] < b[0],
                "to the right of": b[2] < a[0],
                "above": a[3] < b[1],
                "below": b[3] < a[1],
            }
            assert visible[truth["relation"]], row
        else:
            obj = truth["objects"][0]
            x0, y0, x1, y1 = obj["box"]
            cx, cy = (x0 + x1) / 2 / side, (y0 + y1) / 2 / side
            where = {
                "left": cx < 0.4,
                "right": cx > 0.6,
                "top": cy < 0.4,
                "bottom": cy > 0.6,
                "centre": 0.35 < cx < 0.65 and 0.35 < cy < 0.65,
            }
            assert where[obj["position"]], row
    for shape in synthetic.SHAPES:
        assert min(widths[shape, "large"]) > 1.3 * max(widths[shape, "small"])


def test_renders_of_the_same_attributes_differ(data):
    ok_rows = [r for r in data.rows if r["kind"] in OK_IMAGES]
    hashes = np.array([_phash(_image(data, r)) for r in ok_rows])
    dist = (hashes[:, None, :] != hashes[None, :, :]).sum(-1)
    upper = np.triu_indices(len(ok_rows), 1)
    assert (dist[upper] <= 4).sum() == 0  # no kept row would be dropped as a near duplicate
    keys = [
        json.dumps([{k: o[k] for k in ("colour", "shape", "size", "position")} for o in _truth(r)["objects"]])
        for r in ok_rows
    ]
    same = [dist[i, j] for i, j in zip(*upper, strict=True) if keys[i] == keys[j]]
    assert len(same) >= 20 and np.mean(np.array(same) > 4) >= 0.95


def test_render_takes_a_width_and_height():
    objects = [{"colour": "red", "shape": "star", "size": "large", "position": "right"}]
    image, boxes = synthetic.render(objects, (200, 50), random.Random(1))
    assert image.size == (200, 50) and image.mode == "RGB"
    x0, y0, x1, y1 = boxes[0]
    assert x0 > 100 and 0 <= y0 < y1 <= 50
    again, _ = synthetic.render(objects, (200, 50), random.Random(1))
    assert again.tobytes() == image.tobytes()


def test_url_list_rows(data):
    rows = synthetic.url_list_rows(data, "http://127.0.0.1:8000/", "http://127.0.0.2:9")
    assert len(rows) == len(data.rows)
    for row, src in zip(rows, data.rows, strict=True):
        assert set(row) == {"url", "caption", "truth", "kind", "expect"}
        base = "http://127.0.0.2:9" if src["kind"] == "dead_host" else "http://127.0.0.1:8000"
        assert row["url"] == base + src["path"]
        assert (row["caption"], row["truth"], row["kind"], row["expect"]) == (
            src["caption"],
            src["truth"],
            src["kind"],
            src["expect"],
        )


def _get(url: str, method: str = "GET") -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def test_server_serves_the_files(data):
    with LoopbackServer(data.files) as server:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
        for path, (body, content_type) in data.files.items():
            status, got, headers = _get(server.url + path)
            assert (status, got, headers["Content-Type"]) == (200, body, content_type)
            assert int(headers["Content-Length"]) == len(body)
        path, (body, _) = next(iter(data.files.items()))
        status, got, headers = _get(server.url + path, method="HEAD")
        assert (status, got, int(headers["Content-Length"])) == (200, b"", len(body))
        assert _get(server.url + path + "?query=1")[1] == body
        assert _get(server.url + "/status/404/img/000001.jpg")[0] == 404
        assert _get(server.url + "/status/500/img/000001.jpg")[0] == 500
        assert _get(server.url + "/img/999999.jpg")[0] == 404
        assert _get(server.url + "/status/abc/x")[0] == 404
        for row in synthetic.url_list_rows(data, server.url, dead_url()):
            if row["kind"] in ("clean", "http_404", "http_500"):
                want = {"clean": 200, "http_404": 404, "http_500": 500}[row["kind"]]
                assert _get(row["url"])[0] == want
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_server_binds_loopback_only(data):
    for host in ("0.0.0.0", "localhost", "::1", "192.168.1.10"):
        with pytest.raises(ValueError):
            LoopbackServer(data.files, host=host)
    with LoopbackServer(data.files) as server:
        # Another loopback address reaches no listener: the socket is bound to 127.0.0.1 alone.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", server.port), timeout=2).close()


def test_busy_fixed_port_is_refused_by_name(data):
    with LoopbackServer(data.files) as first:
        with pytest.raises(OSError, match=str(first.port)):
            LoopbackServer(data.files, port=first.port).start()
        assert _get(first.url + "/status/500/x")[0] == 500  # the first one still serves
    with LoopbackServer(data.files, port=first.port) as again:  # and its port is free once stopped
        assert again.port == first.port


def test_dead_url_is_refused():
    parts = urlsplit(dead_url())
    assert parts.hostname.startswith("127.") and dead_url() == dead_url()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()

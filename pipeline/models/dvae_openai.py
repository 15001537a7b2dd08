"""OpenAI's released dVAE (`encoder.pkl` and `decoder.pkl`, whole pickled `dall_e` modules) as a
`DVAE`, read without the `dall_e` package and without running code from the pickles."""

from __future__ import annotations

import io
import pickle
import re
import types
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from pipeline import storage
from pipeline.errors import one_line
from pipeline.models.dvae import DVAE, DVAEConfig


class _PickledDallE(nn.Module):
    """Stands in for a `dall_e` class while unpickling: holds the pickled attributes, runs nothing."""

    dall_e_class = ""


# Every global a pickled dall_e module references (torch's storages, dtypes and rebuilders are matched below).
_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
}
for _cls in (nn.ReLU, nn.Sequential, nn.Identity, nn.MaxPool2d, nn.Upsample):
    _ALLOWED[f"{_cls.__module__}.{_cls.__name__}"] = _cls
for _name in ("encoder.Encoder", "encoder.EncoderBlock", "decoder.Decoder", "decoder.DecoderBlock", "utils.Conv2d"):
    _ALLOWED[f"dall_e.{_name}"] = type(_name.split(".")[1], (_PickledDallE,), {"dall_e_class": f"dall_e.{_name}"})
del _cls, _name
_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")


class _AllowlistUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled dall_e module needs; everything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol-2 spelling
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if module == "torch._utils" and name in _REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            is_storage = isinstance(obj, type) and name.endswith("Storage")
            if isinstance(obj, torch.dtype) or is_storage:
                return obj
        raise pickle.UnpicklingError(f"refusing to load global {full}")


# torch.load subclasses `pickle_module.Unpickler` and calls `pickle_module.load` (legacy format).
_allowlist_pickle = types.ModuleType("dvae_allowlist_pickle")
_allowlist_pickle.Unpickler = _AllowlistUnpickler  # type: ignore[attr-defined]
_allowlist_pickle.load = lambda f, **kw: _AllowlistUnpickler(f, **kw).load()  # type: ignore[attr-defined]


def _load_pickled_dall_e(path: str, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The attributes and the weights (keys in our naming) of a pickled `dall_e.<kind>` module."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-format pickles warn that class sources differ
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_allowlist_pickle)
    except Exception as e:
        raise ValueError(f"{path}: cannot load as a dall_e pickle ({one_line(e, typed=False)})") from None
    expected = f"dall_e.{kind.lower()}.{kind}"
    if getattr(obj, "dall_e_class", None) != expected:
        raise ValueError(f"{path}: not a pickled {expected} (found {type(obj).__module__}.{type(obj).__name__})")

    weights: dict[str, torch.Tensor] = {}

    # Walk __dict__ rather than calling state_dict(): it depends on no hook attributes of the pickling torch.
    def walk(module: nn.Module, prefix: str) -> None:
        for name, p in module.__dict__.get("_parameters", {}).items():
            if p is not None:
                weights[re.sub(r"\.w$", ".weight", re.sub(r"\.b$", ".bias", prefix + name))] = p.detach()
        for name, child in module.__dict__.get("_modules", {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(obj, "")
    attrs = dict(obj.__dict__)
    # dall_e declares group_count without attr.ib, so it is a class attribute and not pickled.
    blocks = obj.__dict__.get("_modules", {}).get("blocks")
    groups = [n for n in getattr(blocks, "_modules", {}) if n.startswith("group_")]
    attrs.setdefault("group_count", len(groups))
    return attrs, weights


def load_openai_dvae(encoder_path: str, decoder_path: str) -> DVAE:
    """A DVAE from OpenAI's released `encoder.pkl` and `decoder.pkl` (whole pickled `dall_e` modules).

    Needs no `dall_e` install and executes no code from the pickles beyond the allowlisted
    constructors (torch tensor/parameter rebuilders, storages, dtypes, `torch.device`, OrderedDict,
    set, and the plain `torch.nn` layers dall_e uses); dall_e's own classes become inert placeholder
    modules whose weights and size fields are read back. Raises one-line ValueErrors naming the file.
    """
    enc, enc_w = _load_pickled_dall_e(encoder_path, "Encoder")
    dec, dec_w = _load_pickled_dall_e(decoder_path, "Decoder")
    if enc.get("vocab_size") != dec.get("vocab_size"):
        raise ValueError(
            f"{decoder_path}: vocab_size {dec.get('vocab_size')} differs from {encoder_path}'s {enc.get('vocab_size')}"
        )
    for key in ("group_count", "n_hid", "n_blk_per_group"):
        if enc.get(key) != dec.get(key):
            raise ValueError(f"{decoder_path}: {key} {dec.get(key)} differs from {encoder_path}'s {enc.get(key)}")
    for path, attrs, key in ((encoder_path, enc, "input_channels"), (decoder_path, dec, "output_channels")):
        if attrs.get(key, 3) != 3:
            raise ValueError(f"{path}: {key} is {attrs.get(key)}, not 3 (RGB)")
    try:
        sizes = {k: int(enc[k]) for k in ("vocab_size", "n_hid", "n_blk_per_group", "group_count")}
        # 256 is the side the released model was trained at; the convolutions accept any multiple of 2^(g-1).
        model = DVAE(DVAEConfig(image_size=256, n_init=int(dec["n_init"]), **sizes))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{encoder_path}: bad or missing size fields ({one_line(e, typed=False)})") from None
    for part, weights, path in ((model.encoder, enc_w, encoder_path), (model.decoder, dec_w, decoder_path)):
        try:
            part.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit the architecture ({one_line(e, typed=False)})") from None
    return model

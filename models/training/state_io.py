"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

Why: `torch.load` unpickles, and a pickle can run code when it is read, so a checkpoint folder copied from
elsewhere could run anything on resume. Optimizer, LR-scheduler, grad-scaler and RNG states are nested dicts,
lists and tuples of tensors, numbers and strings; `save_state` writes each tensor into `NAME.safetensors` under a
stable key (its path in the nesting, e.g. `state.0.exp_avg`) and the rest as JSON into `NAME.json`, with markers
for what JSON cannot say (tuples, non-string dict keys, numpy arrays, tensors). Floats are written with Python's
shortest round-trip repr and tensors bit for bit, so `load_state` returns an equal object and a resumed run
continues on the same bits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
TENSOR = "__tensor__"
TUPLE = "__tuple__"
ITEMS = "__items__"
NDARRAY = "__ndarray__"
_MARKERS = frozenset((TENSOR, TUPLE, ITEMS, NDARRAY))


class _Encoder:
    """One object's walk: JSON-able structure out, tensors collected under unique keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def encode(self, obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return {TENSOR: self._tensor(obj, key)}
        if isinstance(obj, np.ndarray):
            return {NDARRAY: obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, tuple):
            return {TUPLE: [self.encode(v, f"{key}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{key}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and not _MARKERS & obj.keys():
                return {k: self.encode(v, f"{key}.{k}") for k, v in obj.items()}
            items = []
            for k, v in obj.items():
                if not isinstance(k, str | int):
                    raise TypeError(f"{key}: dict key {k!r} ({type(k).__name__}) cannot be stored without pickle")
                items.append([k, self.encode(v, f"{key}.{k}")])
            return {ITEMS: items}
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        raise TypeError(f"{key}: a {type(obj).__name__} cannot be stored without pickle")

    def _tensor(self, t: torch.Tensor, key: str) -> str:
        if key in self.tensors:
            raise ValueError(f"two tensors of the state map to the key {key!r}")
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage and storage in self._storages:  # safetensors refuses tensors sharing memory
            t = t.clone()
        self._storages.add(t.untyped_storage().data_ptr())
        self.tensors[key] = t
        return key


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if TENSOR in obj:
        return tensors[obj[TENSOR]]
    if TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[TUPLE])
    if ITEMS in obj:
        return {k: _decode(v, tensors) for k, v in obj[ITEMS]}
    if NDARRAY in obj:
        return np.array(obj["data"], dtype=np.dtype(obj[NDARRAY])).reshape(obj["shape"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(folder: Path, name: str, obj: Any) -> None:
    """Write `obj` as `folder/NAME.json` (+ `folder/NAME.safetensors` when it holds tensors)."""
    enc = _Encoder()
    body = enc.encode(obj, name)
    tensor_file = f"{name}.safetensors" if enc.tensors else None
    if tensor_file is not None:
        save_file(enc.tensors, str(folder / tensor_file), metadata={"format": f"dense-serve-state-{FORMAT}"})
    doc = {"format": FORMAT, "tensors": tensor_file, "state": body}
    (folder / f"{name}.json").write_text(json.dumps(doc) + "\n")


def load_state(folder: Path, name: str) -> Any:
    """The object `save_state(folder, name, ...)` wrote; tensors come back on the CPU (the consumers move them)."""
    doc = json.loads((folder / f"{name}.json").read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{folder / name}.json: unknown state format {doc.get('format')!r} (expected {FORMAT})")
    tensors = load_file(str(folder / f"{name}.safetensors"), device="cpu") if doc["tensors"] else {}
    return _decode(doc["state"], tensors)


def has_state(folder: Path, name: str) -> bool:
    return (folder / f"{name}.json").is_file()

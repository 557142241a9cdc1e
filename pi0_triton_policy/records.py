"""`--record`: one file per inference step, in OpenPI's PolicyRecorder format, and a reader for replay.

OpenPI's PolicyRecorder writes `<record_dir>/step_<N>.npy` with
    np.save(path, np.asarray(flatten_dict({"inputs": obs, "outputs": result}, sep="/")))
i.e. a 0-d object array holding one flat dict: "inputs/state", "inputs/images/cam_high",
"inputs/observation/image", "outputs/actions", "outputs/policy_timing/infer_ms", ... We write the same, so
OpenPI's tools read our records and our reader reads theirs.

Reading: object arrays are pickles, and np.load(allow_pickle=True) would run any code a file asks for.
`read_record` instead unpickles with an allow-list of numpy's array/dtype/scalar constructors only, so a
hostile file fails to load instead of executing.

Un-flattening is ambiguous ("observation/image" is one LIBERO key, "images/cam_high" is ALOHA's nested
dict): inputs are nested only under the top-level keys in `NESTED_INPUT_KEYS`; outputs are nested fully.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pathlib
import pickle
import re
from collections.abc import Iterator, Mapping

import numpy as np
from openpi_client import base_policy

from pi0_triton_policy.weights import flatten_tree as flatten  # same rule as flax.traverse_util.flatten_dict(sep="/")

log = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^step_(\d+)\.npy$")
NESTED_INPUT_KEYS = ("images",)  # ALOHA's camera dict; every other "/" is part of a flat key


def _nest(flat: Mapping[str, object], nested_keys: tuple[str, ...] | None) -> dict:
    """Inverse of `flatten`; with `nested_keys` only those first components become dicts."""
    out: dict = {}
    for key, v in flat.items():
        parts = key.split("/")
        if nested_keys is not None and parts[0] not in nested_keys:
            parts = [key]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def write_record(record_dir: str | pathlib.Path, step: int, obs: Mapping, outputs: Mapping) -> pathlib.Path:
    path = pathlib.Path(record_dir) / f"step_{step}.npy"
    payload = np.empty((), dtype=object)  # np.asarray(dict) in OpenPI: a 0-d object array
    payload[()] = flatten({"inputs": obs, "outputs": outputs})
    np.save(path, payload, allow_pickle=True)
    return path


class PolicyRecorder(base_policy.BasePolicy):
    """Wraps a policy and records every infer() like OpenPI's PolicyRecorder (same files, same layout)."""

    def __init__(self, policy: base_policy.BasePolicy, record_dir: str | pathlib.Path):
        self._policy = policy
        self.record_dir = pathlib.Path(record_dir)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        self._step = 0
        log.info("recording policy steps to %s", self.record_dir)

    def infer(self, obs: dict) -> dict:
        outputs = self._policy.infer(obs)
        write_record(self.record_dir, self._step, obs, outputs)
        self._step += 1
        return outputs

    def reset(self) -> None:
        self._policy.reset()

    @property
    def metadata(self) -> dict:
        return getattr(self._policy, "metadata", {})


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

# (module, name) pairs a numpy object-array pickle needs; numpy 2 writes numpy._core, numpy 1 numpy.core.
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes under pickle protocol 2
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a policy record holds only arrays and plain values")
        for candidate in (module, module.replace("numpy._core", "numpy.core"), module.replace("numpy.core", "numpy._core")):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name} in this numpy version")


def load_npy_safely(path: str | pathlib.Path):
    """np.load for .npy files whose object arrays are loaded through the numpy-only unpickler."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        arr = _NumpyOnlyUnpickler(f).load()
    if not isinstance(arr, np.ndarray) or arr.shape != shape:
        raise ValueError(f"{str(path)!r}: header says shape {shape} but the pickle holds {type(arr).__name__}")
    return arr


@dataclasses.dataclass
class Record:
    step: int
    inputs: dict  # the observation as the client sent it
    outputs: dict  # {"actions", "policy_timing", ...}
    path: pathlib.Path


def read_record(path: str | pathlib.Path, nested_input_keys: tuple[str, ...] = NESTED_INPUT_KEYS) -> Record:
    path = pathlib.Path(path)
    m = STEP_FILE.match(path.name)
    if not m:
        raise ValueError(f"{str(path)!r} is not a policy record (expected a file named step_<N>.npy)")
    arr = load_npy_safely(path)
    data = arr.item() if arr.shape == () else None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r}: expected a 0-d object array holding a dict, got {arr.dtype} {arr.shape}")
    inputs = {k[len("inputs/"):]: v for k, v in data.items() if k.startswith("inputs/")}
    outputs = {k[len("outputs/"):]: v for k, v in data.items() if k.startswith("outputs/")}
    return Record(int(m.group(1)), _nest(inputs, nested_input_keys), _nest(outputs, None), path)


def iter_records(record_dir: str | pathlib.Path) -> Iterator[Record]:
    """Every step_<N>.npy in the directory, in step order (numeric: step_10 after step_9)."""
    d = pathlib.Path(record_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"record directory {str(d)!r} does not exist")
    files = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := STEP_FILE.match(p.name)))
    for _, p in files:
        yield read_record(p)


def replay(policy: base_policy.BasePolicy, record_dir: str | pathlib.Path) -> Iterator[tuple[Record, dict]]:
    """Feed each recorded observation to `policy` again: yields (record, new outputs) for comparison."""
    for rec in iter_records(record_dir):
        yield rec, policy.infer(rec.inputs)

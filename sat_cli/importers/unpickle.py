"""Reading a pickled PyTorch checkpoint without running pickled code.

A pickle is a small program: GLOBAL names a callable, REDUCE calls it. ``load_restricted``
resolves only the names its caller allows, each to an object sat chose (an inert stand-in class,
a plain container, a function that builds a tensor from a storage and nothing else); any other
name is refused, before anything is called, with a CheckpointError that names it.

torch.load reads both file formats (the zip format of PyTorch >= 1.6 and the legacy format of
0.4-1.5) with this unpickler as its ``pickle_module``: it subclasses our Unpickler, maps storage
type names ("FloatStorage") to inert dtype holders itself and passes every other name to our
``find_class``; its ``persistent_load`` only reads storages (and, in the legacy format, returns
the class a "module" record names, which is our stand-in).
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

from ..errors import CheckpointError


class Inert:
    """Stands in for an object of an allowed class: keeps what the pickle hands it, runs nothing."""

    origin = "?"  # the pickled class, "module.Name"
    dump_patches = False  # torch's legacy loader reads this on module classes: never write patch files

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["fields"] = {}
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["fields"] = state if isinstance(state, dict) else {"state": state}

    def __repr__(self) -> str:
        return f"<stand-in for {self.origin}>"


_STAND_INS: dict[str, type] = {}


def stand_in(qualname: str) -> type:
    """The inert class that stands in for the class ``qualname`` ("torch.nn.modules.linear.Linear")."""
    if qualname not in _STAND_INS:
        _STAND_INS[qualname] = type(qualname.rpartition(".")[2], (Inert,), {"origin": qualname, "__module__": __name__})
    return _STAND_INS[qualname]


def origin(obj) -> str | None:
    """The class a stand-in stands for; None for anything else."""
    return obj.origin if isinstance(obj, Inert) else None


def fields(obj) -> dict:
    """A stand-in's recorded attributes (its pickled ``__dict__``)."""
    return obj.fields if isinstance(obj, Inert) else {}


def _naturals(values) -> bool:
    return isinstance(values, (tuple, list)) and all(type(v) is int and v >= 0 for v in values)


def _storage_tensor(storage, storage_offset, size, stride, *_ignored):
    """``torch._utils._rebuild_tensor(_v2)``: a tensor viewing a storage, its bounds checked.
    requires_grad, backward hooks and metadata are dropped."""
    import torch

    if not isinstance(storage, torch.storage.TypedStorage) or type(storage_offset) is not int \
            or storage_offset < 0 or not _naturals(size) or not _naturals(stride) or len(size) != len(stride):
        raise CheckpointError("a tensor record in this file is malformed")
    untyped = storage._untyped_storage
    extent = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    numel = untyped.nbytes() // storage.dtype.itemsize
    if all(size) and extent > numel:  # Tensor.set_ does not check: it would read past the end
        raise CheckpointError(f"a tensor record reaches past its storage ({extent} > {numel} elements)")
    empty = torch.empty((0,), dtype=storage.dtype, device=untyped.device)
    return empty.set_(untyped, storage_offset, tuple(size), tuple(stride))


def _parameter(data, *_ignored):
    """``torch._utils._rebuild_parameter(_with_state)`` and PyTorch 0.4's ``Parameter(data, requires_grad)``:
    the tensor itself (no state, hooks or gradient flag are applied)."""
    import torch

    if not isinstance(data, torch.Tensor):
        raise CheckpointError("a parameter record in this file does not hold a tensor")
    return data


def _plain_dict(*_ignored):
    """``collections.defaultdict(factory)``, as a plain dict: no factory is ever called."""
    return {}


def _nothing(*_ignored):
    """PyTorch 0.4 pickled every module's ``_backend`` as a call of _get_thnn_function_backend()."""


# Names that only ever build plain data: containers and tensors.
DATA = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): _plain_dict,
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): _storage_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _storage_tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.nn.parameter", "Parameter"): _parameter,
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _nothing,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names in ``allowed``; refuses every other one by name."""

    allowed: ClassVar[dict] = {}  # (module, name) -> object; set by load_restricted
    source = "this file"

    def find_class(self, module, name):
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # protocol 2 writes __builtin__ for builtins
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"{self.source} asks to load {module}.{name}, which sat does not allow: unpickling it "
                "could run code. Nothing from the file was run; only the classes and tensor records "
                "of a known checkpoint layout are read.") from None
    # No persistent_load here: torch sets its storage reader on each instance (a method defined in
    # the class would shadow it), and without one pickle refuses persistent records itself.


def load_restricted(path: str | Path, classes: tuple[str, ...]):
    """Unpickle a torch.save file (zip or legacy format) on the CPU. ``classes`` are the class
    names ("models.Encoder") that become inert stand-ins; besides them only :data:`DATA` resolves."""
    import torch

    path = Path(path)
    allowed = {**DATA, **{tuple(q.rsplit(".", 1)): stand_in(q) for q in classes}}
    unpickler = type("Unpickler", (RestrictedUnpickler,), {"allowed": allowed, "source": str(path)})
    module = types.SimpleNamespace(
        __name__="sat_restricted_pickle", Unpickler=unpickler, load=lambda f, **kw: unpickler(f, **kw).load())
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            inner = [n.split("/", 1)[-1] for n in archive.namelist()]
            if any(n == "constants.pkl" or n.startswith("code/") for n in inner):
                raise CheckpointError(f"{path} is a TorchScript archive, not a pickled checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy files: "source code of class ... has changed"
            return torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    except CheckpointError:
        raise
    except Exception as exc:  # not a torch.save file, truncated, or a malformed record
        raise CheckpointError(f"Cannot read {path} as a PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc


def module_tensors(obj, prefix: str = "") -> dict:
    """The state dict of a stand-in module tree: ``_parameters`` and ``_buffers`` of each module,
    keyed by dotted path, walking ``_modules``."""
    import torch

    if not isinstance(obj, Inert):
        raise CheckpointError(f"expected a module at {prefix or 'the top'}, found {type(obj).__name__}")
    f, out = fields(obj), {}
    for group in ("_parameters", "_buffers"):
        for name, value in (f.get(group) or {}).items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} is not a tensor")
            out[prefix + name] = value
    for name, child in (f.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out

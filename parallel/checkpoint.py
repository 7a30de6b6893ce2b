"""Sharded checkpoints with torch.distributed.checkpoint (DCP) that reshard across (dp, ep) layouts.

The checkpoint stores every tensor under its single-process name with its *global* shape:
`model.<param>` and `optim.<param>.{master,exp_avg,exp_avg_sq}`. Expert tensors (rows
[offset, offset + E_loc) of a global [E, ...] tensor, see `parallel.expert`) are written as
DTensors sharded on dim 0 over the ep group, so a rank saves only its experts and, on load, DCP
reads whichever rows the new layout's ep rank owns. Dense tensors are replicated; DCP keeps one
copy. ZeRO-1 moment shards are gathered per parameter over their group before saving (cost: one
parameter-sized copy of the state per rank during the save) and re-sharded by the new layout on
load, so any (dp, ep) pair with the same pp split can resume.

DCP keeps its metadata in a pickle that its FileSystemReader reads with plain `pickle.load`;
`safe_reader` reads it with an unpickler that only builds DCP's own metadata classes, so loading a
checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import io
import os
import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from parallel.expert import expert_shards

_OPT_KEYS = ("master", "exp_avg", "exp_avg_sq")


# DCP metadata classes that may appear in a .metadata pickle; anything else is refused.
_DCP_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # None = any class defined in that module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(ValueError):
    """A DCP .metadata that is not plain DCP metadata (or not readable)."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _DCP_ALLOWED.get(module, set())
        obj = super().find_class(module, name) if module in _DCP_ALLOWED else None
        if module == "torch" and isinstance(obj, torch.dtype):
            return obj
        if allowed is None and isinstance(obj, type) and obj.__module__ == module:
            return obj
        if allowed and name in allowed:
            return obj
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which is not a DCP metadata class")


def safe_reader(path: str):
    """A FileSystemReader for `path` whose metadata was read by the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            metadata = _DCPMetadataUnpickler(io.BytesIO(f.read())).load()
    except Exception as e:  # any failure of an untrusted pickle is one error
        raise UnsafeCheckpointError(f"{path}/.metadata: not loadable safely ({type(e).__name__}: {e})") from None

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _ep_mesh(topology, device: str):
    if topology.ep == 1:
        return None
    return DeviceMesh.from_group(topology.group("ep"), device_type=device)


def _wrap(t: Tensor, name: str, shards: dict, mesh):
    """Expert tensors become DTensor shards of their global tensor; the rest stay plain."""
    if name not in shards or mesh is None:
        return t
    n_global = shards[name][1]
    shape = (n_global,) + tuple(t.shape[1:])
    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _state(model: nn.Module, optimizer, topology, opt_state: dict | None) -> dict:
    shards = expert_shards(model)
    device = next(model.parameters()).device.type
    mesh = _ep_mesh(topology, device)
    state = {f"model.{k}": _wrap(v, k, shards, mesh) for k, v in model.state_dict().items()}
    if optimizer is not None:
        state["optim.step"] = torch.tensor(optimizer.step_count, dtype=torch.int64)
        for name, per in opt_state.items():
            for key in _OPT_KEYS:
                state[f"optim.{name}.{key}"] = _wrap(per[key], name, shards, mesh)
    return state


def save_checkpoint(path: str, model: nn.Module, optimizer, topology) -> None:
    """Collective: every rank calls it. `optimizer` is a `ZeroAdamW` or None."""
    opt_state = optimizer.full_state() if optimizer is not None else None
    dcp.save(_state(model, optimizer, topology, opt_state), checkpoint_id=path)


def load_checkpoint(path: str, model: nn.Module, optimizer, topology) -> None:
    """Collective: fill the model (and optimizer) of this layout from a checkpoint of any layout."""
    opt_state = None
    if optimizer is not None:
        opt_state = {name: {k: torch.zeros_like(p, dtype=torch.float32) for k in _OPT_KEYS}
                     for b in optimizer.buckets for name, p, _ in b.params}
    state = _state(model, optimizer, topology, opt_state)
    dcp.load(state, storage_reader=safe_reader(path))
    local = {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in state.items()}
    with torch.no_grad():
        model.load_state_dict({k[len("model."):]: v for k, v in local.items() if k.startswith("model.")})
    if optimizer is not None:
        for name, per in opt_state.items():
            for key in _OPT_KEYS:
                per[key] = local[f"optim.{name}.{key}"]
        optimizer.load_full_state(opt_state, int(local["optim.step"]))

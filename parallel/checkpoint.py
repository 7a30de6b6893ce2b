"""Checkpoints for every layout: atomic directories, verified on load, tensors in DCP format.

A checkpoint is a directory `step_00000100/` holding `state.pt` (RNG states, data-stream position,
step: the small extras), `config.yaml` (the fully resolved config), `manifest.json` (size and
sha256 of every file, verified on load) and, for the tensors, a torch.distributed.checkpoint (DCP)
directory `dcp/`. It is written into `step_00000100.tmp-*/` and renamed into place only when
complete, so a crash mid-write leaves only a `.tmp-*` directory that is never picked up (and is
removed by the next save). `latest` is found by scanning, not by a pointer file that could go
stale. `state.pt` is loaded with `torch.load(..., weights_only=True)`: a checkpoint from elsewhere
cannot run code. Files and the parent directory are fsynced before and after the rename, so a
power loss cannot expose a renamed directory whose files are still empty. The manifest may only
name files inside the checkpoint (relative, no `..`) and must list state.pt; its step must match
the directory name.

The DCP part holds the engine's tensors (`parallel.engine`), whatever the layout, under their
single-process names and *global* shapes: `model.<param>`, `optim.<param>.{master,exp_avg,
exp_avg_sq}` and `optim.step`. A sharded run writes its expert rows as DTensor shards and each
rank its own ZeRO-1 shard as chunks of the global tensors (`parallel.sharded_state`), nothing
gathered; on load DCP reads whichever chunks overlap what the new layout's rank holds, straight
into its shards. Each writer hashes the items it writes; the manifest keeps those per-item
hashes for the DCP data files (whole-file hashes for the small files), and a loading rank checks
each item it reads, so no rank rereads the checkpoint to verify it. So every
checkpoint resumes at every layout (one process, dp x ep, pp) through one path, `load`; a
checkpoint without optimizer tensors holds weights only (`trainer.import_hf`).

DCP keeps its metadata in a pickle that its FileSystemReader reads with plain `pickle.load`;
`safe_reader` reads it with an unpickler that only builds DCP's own metadata classes, tensors go
through torch's weights_only loader, so loading a checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from data.identity import sha256_file
from parallel.sharded_state import ChunkLoadPlanner, ChunkSavePlanner, HashingWriter, VerifyingReader
from parallel.topology import Topology

log = logging.getLogger("moepipe")

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2], "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(obj):
    """numpy values in a state dict -> python/tensor so weights_only loading accepts them."""
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def has_valid_manifest(path: str) -> bool:
    """A readable manifest whose step matches the directory (files are verified on load only)."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest):
        return False
    try:
        _read_manifest(path, manifest)
    except CheckpointError:
        return False
    return True


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints of the current branch, oldest first: `step_N/` with a valid manifest
    (a directory a crash left without one is neither counted by pruning nor picked to resume)."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if STEP_DIR.match(n))
    return [os.path.join(root, n) for n in names if has_valid_manifest(os.path.join(root, n))]


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_partial(root: str, own_only: bool = False) -> list[str]:
    """Delete leftovers of saves that crashed half-way (`*.tmp-*`) and of interrupted prunes
    (`*.pruned`); returns the names removed. Only the holder of the output-dir lock may remove
    everyone's (`trainer.run_dir`); `own_only` removes just this process's."""
    removed = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            mine = name.endswith(f".tmp-{os.getpid()}")
            if (".tmp-" in name or name.endswith(PRUNED)) and (mine or not own_only):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    return removed


PRUNED = ".pruned"


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the `keep_last` newest checkpoints of the current branch. Each is renamed
    out of the `step_N` pattern first, so a kill mid-delete never leaves a half-deleted `step_N/`."""
    removed = []
    for old in list_checkpoints(root)[:-keep_last]:
        doomed = old + PRUNED
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    return removed


def step_of(path: str) -> int | None:
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def start_branch(root: str, resumed: str) -> str | None:
    """Resuming from `resumed` abandons every later checkpoint in `root`: move them (not delete)
    into `root/abandoned-after-step_N-<k>/`, so pruning and auto-resume follow the new branch.
    Returns the directory they went to (None when there were none)."""
    step = step_of(resumed)
    if step is None or not os.path.isdir(root):
        return None
    later = [n for n in sorted(os.listdir(root)) if STEP_DIR.match(n) and int(n[5:]) > step]
    if not later:
        return None
    k = 0
    while os.path.exists(aside := os.path.join(root, f"abandoned-after-step_{step:08d}-{k}")):
        k += 1
    os.makedirs(aside)
    for name in later:
        os.rename(os.path.join(root, name), os.path.join(aside, name))
    _fsync_dir(root)
    return aside


def _files(top: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(top):
        out += [os.path.relpath(os.path.join(dirpath, n), top) for n in names]
    return sorted(out)


def finalize(root: str, tmp: str, final: str, step: int, state: dict, config_yaml: str, keep_last: int,
             chunks: dict[str, list] | None = None) -> str:
    """Add state.pt, config.yaml and the manifest of every file under `tmp`, rename, prune.
    `chunks`: {DCP data file: [[offset, length, sha256]]}, the hashes its writers took of each
    item as they wrote it; those files are not reread here, the others (small) are hashed whole."""
    chunks = {os.path.join("dcp", f): rows for f, rows in (chunks or {}).items()}
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        torch.save(_to_plain(state), f)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config_yaml)
        f.flush()
        os.fsync(f.fileno())
    files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)),
                 **({"chunks": sorted(chunks[n])} if n in chunks else {"sha256": sha256_file(os.path.join(tmp, n))})}
             for n in _files(tmp)}
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        os.rename(final, final + PRUNED)
        shutil.rmtree(final + PRUNED)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep_last)
    return final


def _fsync_dir(path: str) -> None:
    """Make a rename/creation inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(root: str, step: int, state: dict, config_yaml: str, keep_last: int,
                     tensors: dict[str, Tensor] | None = None) -> str:
    """Save from one process (no collective): `tensors` into dcp/, the small `state` into state.pt,
    atomically, then prune to `keep_last`; returns the final directory. Removes only this
    process's own partial directories (another run's may be in progress)."""
    os.makedirs(root, exist_ok=True)
    remove_partial(root, own_only=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        chunks = None
        if tensors is not None:
            writer = HashingWriter(os.path.join(tmp, "dcp"))
            with warnings.catch_warnings():  # DCP warns that it saves from a single process: it is meant
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(tensors, storage_writer=writer, planner=ChunkSavePlanner(), no_dist=True)
            chunks = writer.chunk_hashes()
        return finalize(root, tmp, final, step, state, config_yaml, keep_last, chunks)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(disk_full_message(root, step)) from None
        raise


def disk_full_message(root: str, step: int) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    previous = latest_checkpoint(root)
    return (f"checkpoint path = {os.path.join(root, f'step_{step:08d}')!r}: no space left on the device while "
            f"saving ({free}); the partial directory was removed and {previous or 'no earlier checkpoint'} is "
            "intact; free disk space (or lower checkpoint.keep_last) and resume")


def save(root: str, step: int, tensors: dict[str, Tensor], state: dict, config_yaml: str, keep_last: int,
         topology: Topology, group=None) -> str:
    """Collective save at any layout: every rank writes its DCP chunks (`parallel.sharded_state`:
    its own shards, replicated tensors by one rank) hashing them as it writes; rank 0 gathers the
    hash tables (small), adds state.pt, config.yaml and the manifest and renames the directory.
    `group`: the process group of the save's collectives (default: the world's)."""
    if topology.world_size == 1:
        return write_checkpoint(root, step, state, config_yaml, keep_last, tensors)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = f"{final}.tmp-dist"
    if topology.rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # our own earlier attempt; other leftovers go at start-up, under the lock
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier(group=group)
    writer = HashingWriter(os.path.join(tmp, "dcp"))
    dcp.save(tensors, storage_writer=writer, planner=ChunkSavePlanner(), process_group=group)
    tables = [None] * topology.world_size if topology.rank == 0 else None
    dist.gather_object(writer.chunk_hashes(), tables, dst=0, group=group)
    if topology.rank == 0:
        finalize(root, tmp, final, step, state, config_yaml, keep_last, {f: r for t in tables for f, r in t.items()})
    dist.barrier(group=group)
    return final


class Stateful(Protocol):
    """What `load` fills: an engine (`parallel.engine`), whose tensors carry single-process names
    (an engine may also offer `load_targets()`, the views DCP reads into, when they differ from
    what it writes)."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


def load(path: str, engine: Stateful) -> dict | None:
    """The one resume path, for a checkpoint of any layout into an engine of any layout (every
    rank calls it). Verifies the manifest, fills the engine's tensors from dcp/ (DCP reads
    whichever slices this rank holds) and returns the small state (step, data position, RNG);
    None for a weights-only checkpoint (no optimizer state: `trainer.import_hf`)."""
    state = read_checkpoint(path)
    reader = _dcp_reader(path, _manifest_chunks(path))
    saved = set(reader.read_metadata().state_dict_metadata)
    tensors = getattr(engine, "load_targets", engine.state_dict)()  # an engine may read into other views
    weights_only = "optim.step" not in saved
    if weights_only:
        tensors = {k: v for k, v in tensors.items() if k.startswith("model.")}
    missing = sorted(set(tensors) - saved)
    if missing:
        raise CheckpointError(f"{path}: has no {missing[:3]} ({len(missing)} tensors missing); the model config "
                              f"differs from the checkpoint's config.yaml")
    try:
        dcp.load(tensors, storage_reader=reader, planner=ChunkLoadPlanner(),
                 no_dist=not dist.is_initialized())  # one process: no warning
    except CheckpointException as e:
        _raise_if_corrupt(path, e)
        raise
    engine.load_state_dict(tensors)
    return None if weights_only else state


def _raise_if_corrupt(path: str, e: BaseException) -> None:
    """A DCP failure caused by an item whose checksum differs: one CheckpointError line."""
    bad = [line.split("ChunkChecksumError: ", 1)[1] for line in str(e).splitlines() if "ChunkChecksumError: " in line]
    if bad:
        raise CheckpointError(f"{path}/dcp/{bad[0]}; the checkpoint is corrupt: delete it to resume from the "
                              "previous one") from None


def _manifest_chunks(path: str) -> dict[str, list]:
    """{DCP data file (relative to dcp/): [[offset, length, sha256]]} from the manifest."""
    files = _read_manifest(path, os.path.join(path, "manifest.json"))
    return {name[len("dcp/"):]: meta["chunks"] for name, meta in files.items() if "chunks" in meta}


def _dcp_reader(path: str, chunks: dict[str, list] | None = None):
    where = os.path.join(path, "dcp")
    if not os.path.isfile(os.path.join(where, ".metadata")):
        raise CheckpointError(f"{path}: no dcp/.metadata; written by an older version of this trainer "
                              "(tensors inside state.pt), which this one cannot resume")
    try:
        return safe_reader(where, chunks)
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None


def resume_path(resume: str, output_dir: str) -> str | None:
    """checkpoint.resume: 'none', 'auto' (the latest in output_dir/checkpoints, if any) or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(os.path.join(output_dir, "checkpoints"))
    if not os.path.isdir(resume):
        raise CheckpointError(f"checkpoint.resume = {resume!r}: no such checkpoint directory")
    return resume


def read_checkpoint(path: str) -> dict:
    """Verify the manifest (sizes of all files, checksums of the files hashed whole; DCP data
    files hashed per item are checked item by item as `load` reads them), then load `state.pt`
    with weights_only=True."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: no manifest.json; not a complete checkpoint")
    files = _read_manifest(path, manifest_path)
    for name, meta in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) != meta["bytes"] or \
                ("sha256" in meta and sha256_file(file) != meta["sha256"]):
            raise CheckpointError(f"{file}: size or checksum differs from manifest.json; the checkpoint is "
                                  "corrupt: delete it to resume from the previous one")
    try:
        return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... on bad files
        raise CheckpointError(f"{path}/state.pt: cannot be loaded safely ({type(e).__name__}: {e})") from None


def _read_manifest(path: str, manifest_path: str) -> dict:
    """The manifest's file table, validated: plain names inside the checkpoint, state.pt listed."""
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files, step = manifest["files"], manifest["step"]
        ok = isinstance(files, dict) and all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int) and (isinstance(m.get("sha256"), str) or (
                isinstance(m.get("chunks"), list) and all(
                    isinstance(c, list) and len(c) == 3 and isinstance(c[0], int) and isinstance(c[1], int)
                    and isinstance(c[2], str) for c in m["chunks"])))
            for m in files.values())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({type(e).__name__}: {e})") from None
    if not ok:
        raise CheckpointError(f"{manifest_path}: 'files' must map names to {{bytes, sha256 or chunks}}")
    bad = [n for n in files if not isinstance(n, str) or os.path.isabs(n)
           or any(part in ("", ".", "..") for part in n.split("/"))]
    if bad:
        raise CheckpointError(f"{manifest_path}: names {bad[:3]} are not file paths inside the checkpoint")
    if "state.pt" not in files:
        raise CheckpointError(f"{manifest_path}: does not list state.pt; not a checkpoint of this trainer")
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{manifest_path}: step {step!r} but the directory is {os.path.basename(path)}")
    return files


def read_dcp(path: str) -> dict:
    """Every tensor of a DCP checkpoint at full (global) shape, on CPU, in this one process."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path}: no .metadata; not a DCP checkpoint")
    parent = os.path.dirname(os.path.normpath(path))
    chunks = _manifest_chunks(parent) if os.path.isfile(os.path.join(parent, "manifest.json")) else None
    try:
        reader = safe_reader(path, chunks)  # in a checkpoint directory: every item checked as it is read
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        _raise_if_corrupt(parent, e)
        raise CheckpointError(f"{path}: DCP checkpoint unreadable ({type(e).__name__}: {str(e)[:300]})") from None
    return state


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


def safe_reader(path: str, chunks: dict[str, list] | None = None):
    """A FileSystemReader for `path` whose metadata was read by the restricted unpickler; with
    `chunks` (the manifest's item hashes) it checks every item it reads."""
    from torch.distributed.checkpoint.metadata import StorageMeta
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            metadata = _DCPMetadataUnpickler(io.BytesIO(f.read())).load()
    except Exception as e:  # any failure of an untrusted pickle is one error
        raise UnsafeCheckpointError(f"{path}/.metadata: not loadable safely ({type(e).__name__}: {e})") from None

    class SafeReader(VerifyingReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path, chunks)

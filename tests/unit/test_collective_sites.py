"""Every torch.distributed call in parallel/ and trainer/ is one the device check knows.

tests/distributed/test_collective_devices.py wraps the collectives listed in
`tests.distributed.collective_check` and fails when one is handed a tensor off the data's device
(the NCCL mistake of a host tensor). A collective it does not wrap would escape that check; this
walks the syntax tree of every module and names any call site of such a function.
"""
import ast
import pathlib

from tests.distributed.collective_check import COLLECTIVES, OBJECT_COLLECTIVES, P2P_OPS

ROOT = pathlib.Path(__file__).resolve().parents[2]
# torch.distributed functions that move no tensor between ranks
SETUP = {"is_initialized", "is_available", "get_rank", "get_world_size", "new_group", "init_process_group",
         "destroy_process_group", "get_backend", "ReduceOp", "group", "checkpoint", "device_mesh", "tensor",
         "get_process_group_ranks"}


def _dist_calls(tree: ast.AST):
    """(line, name) of calls `dist.NAME(...)` and `torch.distributed.NAME(...)`."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        if isinstance(owner, ast.Name) and owner.id == "dist":
            yield node.lineno, node.func.attr
        elif isinstance(owner, ast.Attribute) and owner.attr == "distributed" and \
                isinstance(owner.value, ast.Name) and owner.value.id == "torch":
            yield node.lineno, node.func.attr


def test_every_collective_call_site_is_covered_by_the_device_check():
    known = set(COLLECTIVES) | set(P2P_OPS) | set(OBJECT_COLLECTIVES) | SETUP
    unknown, seen = [], set()
    for path in sorted([*ROOT.glob("parallel/**/*.py"), *ROOT.glob("trainer/**/*.py")]):
        for line, name in _dist_calls(ast.parse(path.read_text(), str(path))):
            seen.add(name)
            if name not in known:
                unknown.append(f"{path.relative_to(ROOT)}:{line} dist.{name}")
    assert not unknown, "add these to tests/distributed/collective_check.py: " + ", ".join(unknown)
    assert {"all_to_all_single", "all_reduce", "batch_isend_irecv"} <= seen   # the walk finds call sites

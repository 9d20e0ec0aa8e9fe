"""Group arguments: a communicator name, or a torch.distributed ProcessGroup resolved to one.

The operators take communicator names (str), as on Ascend. Wherever a group is taken, moedist also
accepts the ProcessGroup itself and resolves it through moedist.get_comm_name before the torch operator
is entered (the operator's schema says str, so torch would reject a ProcessGroup with a message that
does not say what to pass instead).
"""
from __future__ import annotations


def _is_process_group(obj) -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # torch built without distributed support
        return False
    if not dist.is_available():
        return False
    return isinstance(obj, dist.ProcessGroup)


def resolve_group(group, param: str, op: str, *, allow_none: bool = False):
    """`group` as a communicator name: a str is returned as it is, a ProcessGroup is resolved with
    moedist.get_comm_name (collective on its first use for that group). Anything else raises a TypeError
    naming the parameter, the type received and what is accepted."""
    if isinstance(group, str):
        return group
    if group is None and allow_none:
        return None
    if _is_process_group(group):
        from .distributed import get_comm_name

        return get_comm_name(group)
    raise TypeError(
        f"{op}: {param} has type {type(group).__module__}.{type(group).__qualname__} (must be a str, a communicator "
        f"name from moedist.get_comm_name(group), or a torch.distributed.ProcessGroup)")

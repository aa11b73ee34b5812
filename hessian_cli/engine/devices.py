"""The device a run computes on, from the user's ``device`` (``--device``): shared by ``analyze``
and ``train``, and under torchrun each rank's own GPU. Its refusals name it as the library's
messages do (`` `device=cuda` ``), which the command line shows as its flag."""

from __future__ import annotations

import os
import re

import torch

from hessian_cli.errors import UserError
from hessian_cli.launch import launched_by_torchrun

_CUDA = re.compile(r"cuda(?::(\d+))?")  # cuda, or GPU N as cuda:N (cudax, cuda:-1 failed in torch)


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error. Under
    torchrun, CUDA means this rank's GPU (its local rank's, selected by ``init_from_env``): a
    rank without one of its own would share another's, which NCCL refuses later in words of
    its own, so it is refused here. A script's ``torch.device`` is taken by its name (it failed
    in ``startswith``, an AttributeError). Names in any case (CPU, CUDA:1), as the command
    line's other words."""
    given, name = str(name), str(name).lower()
    cuda = _CUDA.fullmatch(name)
    if name not in ("auto", "cpu") and cuda is None:
        raise UserError(f"unknown device {given!r}: use auto, cpu, cuda or cuda:N (GPU N).")
    if cuda and not torch.cuda.is_available():
        raise UserError(f"`device={given}` asks for CUDA, but no CUDA device is available.")
    # torch takes any index and fails at the first tensor moved: "invalid device ordinal".
    if cuda and cuda[1] is not None and int(cuda[1]) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(
            f"`device={given}` names GPU {int(cuda[1])}, but this machine has {count} "
            f"(numbered from 0): use `device=cuda` or an index below {count}."
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name in ("auto", "cuda") and launched_by_torchrun():
        local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(
                f"local rank {local_rank} has no GPU of its own: this machine has {count}; start "
                "at most that many ranks per machine (--nproc_per_node), or use `device=cpu`."
            )
    return torch.device("cuda" if name == "auto" else name)

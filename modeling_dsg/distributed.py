"""Several processes for one command: who am I, and the few collective steps `dsg build` and `dsg eval` need.

A launcher (`torchrun --nproc_per_node N -m modeling_dsg ...`, `accelerate launch -m modeling_dsg ...`)
starts N copies of the command with `RANK`, `WORLD_SIZE` and `LOCAL_RANK` (and the rendezvous address) in
the environment. `init(device)` creates the default process group once: backend "nccl" when the device
is CUDA (each process then uses GPU `LOCAL_RANK`), else "gloo" (CPU processes). Without those variables
(one process) nothing is initialised and every function here is the identity: `rank()` 0, `world_size()`
1, `all_gather_object(x)` `[x]`, `is_main()` True.

Only `dsg build` (its statistics pass is sharded by `analysis.stats.collect`) and `dsg eval` (its forwards are
sharded by `evaluation.scoring.batched_forward`) run over several processes; `cli.main` refuses the other
commands with one `DSGError`. `shard` / `gather_shards` are the split both use: process r takes items r, r + W,
r + 2W, ... and the results come back in the items' order.
"""

from __future__ import annotations

import os
from datetime import timedelta

from .errors import DSGError

# How long a process waits for the others at a collective step (a slow model load, process 0 writing a large
# folder) before it gives up; a process that fails ends the launch at once (the launcher stops the others).
TIMEOUT = timedelta(hours=1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DSGError(f"the environment variable {name}={value!r} is not an integer (set by the launcher)") from None


def world_size() -> int:
    """The number of processes (`WORLD_SIZE`, 1 when not launched by torchrun / accelerate)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def rank() -> int:
    """This process's index, 0..world_size() - 1 (`RANK`)."""
    return _env_int("RANK", 0) if world_size() > 1 else 0


def local_rank() -> int:
    """This process's index on its machine (`LOCAL_RANK`): the GPU it uses."""
    return _env_int("LOCAL_RANK", rank()) if world_size() > 1 else 0


def is_main() -> bool:
    """True on the process that writes outputs and prints (rank 0; the only one without a launcher)."""
    return rank() == 0


def init(device="cpu") -> None:
    """Create the default process group once (no-op with one process or when it exists already).

    `device` is the command's `--device`: "cuda" selects NCCL and GPU `LOCAL_RANK` for this process ("cuda"
    without an index then means that GPU); anything else gloo. An explicit `cuda:N` other than `cuda:LOCAL_RANK`
    is refused with several processes (they would all share that one GPU).
    """
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    if device.type == "cuda":
        if device.index not in (None, local_rank()):
            raise DSGError(
                f"--device {device} with {world_size()} processes: pass --device cuda (each process uses the GPU "
                "numbered by its LOCAL_RANK)"
            )
        torch.cuda.set_device(local_rank())
    if dist.is_initialized():
        return
    # torch.distributed.fsdp evaluates `dist.group.WORLD` in a default argument when it is imported: imported
    # after the group exists (transformers' model loading and `evaluate` import it), it keeps the group alive
    # past `close()`. The group's gloo threads then outlive the script and may free their last collective's
    # tensors while Python shuts down, which aborts the process at exit. Imported first, it captures nothing.
    import torch.distributed.fsdp  # noqa: F401

    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, rank=rank(), world_size=world_size(), timeout=TIMEOUT)
    except (RuntimeError, ValueError) as err:
        message = " ".join(str(err).split())
        raise DSGError(f"cannot start the {backend} process group ({world_size()} processes): {message}") from None


def _group_ready() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        init("cpu")


def all_gather_object(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process (picklable objects; CPU tensors travel)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    _group_ready()
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(items) -> list:
    """This process's share of `items`: items r, r + W, r + 2W, ... (every item with one process)."""
    return list(items)[rank() :: world_size()]


def gather_shards(pieces: list, total: int) -> list:
    """Every process's `pieces` (one per item of its `shard` of `total` items), in the items' order, on every
    process. With one process, `pieces` itself."""
    if world_size() == 1:
        return pieces
    gathered = all_gather_object(pieces)
    world = len(gathered)
    return [gathered[i % world][i // world] for i in range(total)]


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """After a step every process ran: if one failed, every process fails.

    `error` is this process's exception (None if it succeeded). A process that failed re-raises its own
    exception; the others raise a `DSGError` naming the first process that failed and its message, so every
    process ends with one clear line and a non-zero exit instead of waiting for the failed one.
    """
    if world_size() == 1:
        if error is not None:
            raise error
        return
    messages = all_gather_object(None if error is None else " ".join(str(error).split()) or type(error).__name__)
    if error is not None:
        raise error
    for index, message in enumerate(messages):
        if message is not None:
            raise DSGError(f"{what} failed in process {index} of {len(messages)}: {message}")


def on_main(fn, what: str):
    """`fn()` on the main process only (writing a folder); the others wait for it and fail if it fails.

    Returns `fn()`'s result on the main process and None on the others.
    """
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as err:  # handed to the others, then re-raised here
            error = err
    raise_if_any_failed(error, what)
    return result


def close() -> None:
    """Destroy the default process group if this module (or anyone) created it. Its threads end here, while
    Python is still running (see `init`), not at the interpreter's exit."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        # every process leaves together: a process that tore its connections down while another still used
        # them could end the other in a gloo abort at exit
        try:
            dist.barrier()
        except Exception:  # a peer that is already gone: nothing left to wait for
            pass
        dist.destroy_process_group()

"""Running a causal LM up to one decoder block: the one home of "forward to block L".

A guardrail at layer L reads the residual stream after decoder block L, so everything that only needs
that stream (the statistics pass, RMU's activations, the guard's decisions) stops the forward right
after the block: a forward hook on it raises `StopForward`, which the caller catches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from ..errors import DSGError


class StopForward(Exception):
    """Raised by the hook of `stopping_after` to end a forward pass after its block."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (the runtime's discovery); `DSGError` if none is found."""
    from ..runtime.modeling_dsg import decoder_layers  # here, not at the top: `dsg --help` stays quick

    try:
        return decoder_layers(model)
    except ValueError as err:
        raise DSGError(str(err)) from None


def decoder_block(model: nn.Module, layer: int) -> nn.Module:
    """Decoder block `layer` of `model`; `DSGError` if the model has no such block."""
    blocks = decoder_blocks(model)
    if not 0 <= layer < len(blocks):
        raise DSGError(
            f"layer {layer} is out of range: the model has {len(blocks)} decoder layers (0..{len(blocks) - 1})"
        )
    return blocks[layer]


@contextlib.contextmanager
def stopping_after(block: nn.Module, *, capture: bool = True) -> Iterator[list[Tensor]]:
    """Inside the block, every forward through `block` ends right after it by raising `StopForward`.

    Yields the list that receives the block's output (its hidden states) at each stop, when `capture`.
    """
    captured: list[Tensor] = []

    def hook(module, args, output):
        if capture:
            captured.append(output[0] if isinstance(output, tuple) else output)
        raise StopForward

    handle = block.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def block_output(model: nn.Module, layer: int, forward: Callable[[], object]) -> Tensor:
    """The output of decoder block `layer` [B, T, d] during `forward()` (a call of `model`), which stops there."""
    with stopping_after(decoder_block(model, layer)) as captured:
        try:
            forward()
        except StopForward:
            pass
    if not captured:
        raise DSGError(f"decoder layer {layer} never ran during the forward pass")
    return captured[0]

"""`remove_guardrail`: detaching one guardrail leaves the model exactly as if it had never been added."""

import pytest
import tiny
import torch


@torch.no_grad()
def test_remove_restores_the_model_without_that_guardrail():
    first = tiny.guardrail("jumprelu", name="first", layer=1, threshold=0.0)
    second = tiny.guardrail("standard", name="second", layer=2, threshold=0.0, features=(1, 2))
    both, reference = tiny.tiny_dsg(guardrails=[first, second])
    only_second, _ = tiny.tiny_dsg(guardrails=[second])
    only_second.guards[0].load_state_dict(both.guards[1].state_dict())
    ids = torch.randint(3, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    with_both = both(input_ids=ids).logits
    removed = both.remove_guardrail("first")
    assert removed.name == "first" and [g.name for g in both.guards] == ["second"]
    assert both.guards[0].index == 0 and [g["name"] for g in both.config.guardrails] == ["second"]
    assert torch.equal(both(input_ids=ids).logits, only_second(input_ids=ids).logits)
    assert not torch.equal(with_both, both(input_ids=ids).logits)  # the first guardrail did edit
    both.remove_guardrail(0)
    assert torch.equal(both(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert all(not layer._forward_hooks for layer in both.model.model.layers)
    with pytest.raises(KeyError, match="no guardrail"):
        both.remove_guardrail("first")

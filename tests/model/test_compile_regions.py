"""GPT.compile_regions: one compiled graph serves every block, and the numbers do not change.

Uses dynamo with the ``aot_eager`` backend (traced and run through AOTAutograd, no C compiler):
what is under test is the regional wiring, not inductor's kernels.
"""

from __future__ import annotations

import copy

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from model.gpt import GPT, GPTConfig


def _loss_and_grads(model: GPT, idx: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    x, y = idx[:, :-1], idx[:, 1:]  # (B, T) each
    logits, _ = model(x)
    terms = model.loss_terms(logits, y)
    loss = model.objective(terms, num_tokens=terms.num_tokens)
    loss.backward()
    return float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_blocks_share_one_graph_and_match_eager() -> None:
    torch._dynamo.reset()
    counters.clear()
    eager = GPT(GPTConfig(size="tiny", n_layer=4, max_seq_len=32), seed=3)
    compiled = copy.deepcopy(eager)
    compiled.compile_regions(backend="aot_eager")
    idx = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(0))

    loss_c, grads_c = _loss_and_grads(compiled, idx)
    loss_e, grads_e = _loss_and_grads(eager, idx)

    # One graph for the four blocks, one for the loss terms: the blocks did not recompile.
    assert counters["stats"]["unique_graphs"] == 2
    assert loss_c == loss_e
    assert len(grads_c) == len(grads_e) == len(list(eager.parameters()))
    for got, want in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # In place: parameter names (and so checkpoints) are the uncompiled model's.
    assert list(compiled.state_dict()) == list(eager.state_dict())

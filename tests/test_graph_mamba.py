"""`train.graph_mamba_layers`: plain training with the Mamba layers captured in CUDA graphs (issue 16). The capture's
bookkeeping is checked on the CPU with a stand-in (tests/test_bench_speed.py); here the real capture, on a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

from star_elastic.model import Model
from star_elastic.train import compile_layers, graph_mamba_layers

from test_elastify import PARENTS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_graphed_mamba_layers_train_as_the_compiled_model_step_after_step():
    """Two steps on new batches (the graph's static input refilled each call): the loss and every parameter's
    gradient, under the checkpoint's names, equal the compiled model's to fp32 rounding."""
    torch.manual_seed(0)
    cfg = PARENTS["nemotron_h"]
    ref = compile_layers(Model(cfg).cuda().train(), "eager")
    graphed = graph_mamba_layers(copy.deepcopy(ref), (2, 16, cfg.hidden_size), torch.float32, backend="eager")
    assert sum(type(layer).__name__ == "GraphedLayer" for layer in graphed.model.layers) == cfg.layer_types.count("M")
    for step in range(2):
        x = torch.randint(0, cfg.vocab_size, (2, 17), device="cuda")
        losses = []
        for m in (ref, graphed):
            m.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        grads = dict(graphed.named_parameters())
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=f"step {step}: {name}")

"""torch.compile: growth within the capacity compiles nothing new, a shape change compiles once.

A counting backend (it records each graph Dynamo hands it and runs it as is) stands in for
Inductor, so the tests measure compilation, not kernel speed, and stay fast on CPU. Every
compiled step is checked against the uncompiled model: same loss, same gradients.
"""

import pytest
import torch
from helpers_train import wide_gpt2, wide_tokens
from torch.utils.flop_counter import FlopCounterMode

from hf_lowrank import LowRankConfig, get_lowrank_model, optim
from hf_lowrank.strategies import LayerChange, Plan

MLP = {"target_modules": ["c_fc", "c_proj"], "exclude_modules": r".*attn.*"}


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (and, when ``flops`` is set, their FLOPs)."""

    def __init__(self):
        self.graphs = 0
        self.flops: int | None = None

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            if self.flops is None:
                return gm.forward(*args)
            with FlopCounterMode(display=False) as counter:
                out = gm.forward(*args)
            self.flops += counter.get_total_flops()
            return out

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch():
    ids = torch.arange(64).remainder(50).view(2, 32)
    return {"input_ids": ids, "labels": ids}


def step_matches_eager(model, compiled):
    """One forward/backward compiled and one eager on the same weights: same loss and gradients."""
    losses, grads = [], []
    for run in (compiled, model):
        model.zero_grad(set_to_none=True)
        loss = run(**batch()).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_growth_within_capacity_does_not_recompile():
    model = get_lowrank_model(wide_gpt2(dropout=0.0), LowRankConfig(**MLP, rank=2, capacity=16))
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    step_matches_eager(model, compiled)
    first = backend.graphs
    names = list(model.lowrank_layers())
    # six growth steps, each on another layer (InRank grows layers at different checks)
    for i in range(6):
        name = names[i % len(names)]
        model.apply_plan(Plan([LayerChange(name, "grow", rank=model.lowrank_layers()[name].rank + 2)]))
        step_matches_eager(model, compiled)
    assert max(layer.rank for layer in model.lowrank_layers().values()) == 6
    assert backend.graphs == first, f"growth recompiled: {first} graphs after the first step, {backend.graphs} after growth"

    # a shape change (truncate to the rank, dropping the buffer) recompiles each compiled frame at most once
    model.apply_plan(Plan([LayerChange(n, "truncate", rank=layer.rank) for n, layer in model.lowrank_layers().items()]))
    step_matches_eager(model, compiled)
    after_truncate = backend.graphs
    assert first < after_truncate <= 2 * first
    step_matches_eager(model, compiled)
    assert backend.graphs == after_truncate

    # a re-balance rewrites the factors' values in place: no shape, no recompile
    with torch.no_grad():
        for layer in model.lowrank_layers().values():
            layer.B.normal_(std=0.02)  # grown (then truncated) components are zero, which a re-balance leaves alone
            layer.A.normal_(std=0.02)
    assert optim.rebalance(model.lowrank_layers()) == names
    step_matches_eager(model, compiled)
    assert backend.graphs == after_truncate, "a re-balance recompiled"


@pytest.mark.slow
def test_compiled_forward_cost_is_the_capacity():
    """What the mask costs: compiled, a layer multiplies at its capacity; eager, at its rank."""
    model = get_lowrank_model(wide_gpt2(dropout=0.0), LowRankConfig(**MLP, rank=4, capacity=16))
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    ids = batch()["input_ids"]
    with torch.no_grad():
        compiled(input_ids=ids)  # compile
        backend.flops = 0
        compiled(input_ids=ids)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids)
    tokens, extra = ids.numel(), 16 - 4
    per_layer = 2 * tokens * extra * (64 + 256)  # both factor matmuls of a 64 <-> 256 MLP layer, 12 more components
    assert backend.flops - counter.get_total_flops() == 4 * per_layer


@pytest.mark.slow
def test_trainer_torch_compile_inrank(tmp_path):
    """TrainingArguments(torch_compile=True): InRank's growth steps reuse the graphs, stage 2 compiles once."""
    import transformers
    from torch._dynamo.utils import counters

    from hf_lowrank.trainer import LowRankTrainer

    config = LowRankConfig(**MLP, strategy="inrank", strategy_args={"warmup_steps": 2, "interval": 2, "stage2_at": 0.5})
    model = get_lowrank_model(wide_gpt2(dropout=0.0), config)
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, torch_compile=True, torch_compile_backend="eager",
    )
    graphs: dict[int, int] = {}

    class Graphs(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            graphs[state.global_step] = counters["stats"]["unique_graphs"]

    trainer = LowRankTrainer(model=model, args=args, train_dataset=wide_tokens(), callbacks=[Graphs()])
    trainer.train()
    growth = [h["step"] for h in trainer.plan_history if all(c["op"] == "grow" for c in h["changes"])]
    stage2 = next(h["step"] for h in trainer.plan_history if any(c["op"] == "truncate" for c in h["changes"]))
    assert growth and min(growth) < stage2, "ranks grew before stage 2"
    first = graphs[1]
    assert all(graphs[s] == first for s in range(1, stage2 + 1)), f"growth recompiled: {graphs}"
    assert first < graphs[12] <= 2 * first, f"stage 2 compiled more than once: {graphs}"

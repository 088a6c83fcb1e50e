"""hf_lowrank/optim.py: the factors' parameter groups (learning-rate scale, weight decay), the
ScaledGD preconditioner of factor gradients, and re-balancing factor pairs (the product kept,
rank-deficient pairs and adapters left alone, Adam's moments kept, reset or rotated exactly).

How these run inside a training loop (bind_training, update_ranks, the Trainer):
tests/test_loops.py and tests/test_trainer.py.
"""

import pytest
import torch
from helpers_train import tiny_gpt2

from hf_lowrank import LowRankConfig, get_lowrank_model, optim


def test_param_groups_split_factors_and_scale_their_learning_rate():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4, factor_lr_scale=3.0, frobenius_decay=1e-3))
    groups = optim.param_groups(model, lr=1e-3, weight_decay=0.1)
    factors = [g for g in groups if g.get("lowrank_factors")]
    assert factors and all(g["lr"] == pytest.approx(3e-3) and g["weight_decay"] == 0.0 for g in factors)
    others = [g for g in groups if not g.get("lowrank_factors")]
    assert {g["weight_decay"] for g in others} == {0.1, 0.0}
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def test_preconditioned_factors_move_the_product_along_the_dense_gradient():
    """ScaledGD: with grad_B (A A^T)^-1 and (B^T B)^-1 grad_A, a small step moves W = B A by
    -lr (G P_row + P_col G), the dense gradient projected on the factors' spaces, however
    unbalanced B and A are; zero components (a fresh adapter, InRank's buffer) stay finite."""
    from hf_lowrank.layer import LowRankLinear

    torch.manual_seed(0)
    layer = LowRankLinear(torch.nn.Linear(12, 10))
    layer.init_factorized(rank=4, init="kaiming")
    with torch.no_grad():
        layer.B.mul_(10.0)  # badly balanced: plain gradients would move B A mostly through A
        layer.A.mul_(0.1)
    x = torch.randn(32, 12)
    layer(x).pow(2).sum().backward()
    B, A = layer.B.detach().clone(), layer.A.detach().clone()
    W = B @ A
    G = (2 * (x @ W.T + layer.bias.detach())).T @ x  # dL/dW of sum((x W^T + b)^2)
    optim.precondition_factors(layer)
    lr = 1e-4
    moved = (B - lr * layer.B.grad) @ (A - lr * layer.A.grad) - W
    p_row = A.T @ torch.linalg.solve(A @ A.T, A)
    p_col = B @ torch.linalg.solve(B.T @ B, B.T)
    na, nb = (A @ A.T).diagonal().mean(), (B.T @ B).diagonal().mean()
    expected = -lr * (na * G @ p_row + nb * p_col @ G)  # each Gram matrix was divided by its mean diagonal
    assert torch.allclose(moved, expected, rtol=2e-2, atol=1e-3 * expected.abs().max().item())

    adapter = LowRankLinear(torch.nn.Linear(12, 10))
    adapter.to_residual(rank=4)  # B = 0: B^T B is zero
    adapter(x).pow(2).sum().backward()
    grad_b = adapter.B.grad.clone()
    optim.precondition_factors(adapter)
    assert torch.isfinite(adapter.B.grad).all() and torch.isfinite(adapter.A.grad).all()
    assert not torch.equal(adapter.B.grad, grad_b) or grad_b.abs().sum() == 0


def unbalanced_layer(rank: int = 6, seed: int = 0):
    """A factorized (10 x 12) layer whose B is 8x too large and A 8x too small: the same product as balanced factors."""
    from hf_lowrank.layer import LowRankLinear

    torch.manual_seed(seed)
    layer = LowRankLinear(torch.nn.Linear(12, 10))
    layer.init_factorized(rank=rank, init="kaiming")
    with torch.no_grad():
        layer.B.mul_(8.0)
        layer.A.div_(8.0)
    return layer


def test_rebalance_keeps_the_product_and_balances_the_factors():
    layer = unbalanced_layer()
    before = (layer.B @ layer.A).detach().clone()
    assert optim.rebalance({"l": layer}) == ["l"]
    B, A = layer.B.detach(), layer.A.detach()
    torch.testing.assert_close(B @ A, before, rtol=1e-5, atol=1e-6)
    gram_b, gram_a = B.T @ B, A @ A.T
    torch.testing.assert_close(gram_b, gram_a, rtol=1e-4, atol=1e-6)  # both S
    torch.testing.assert_close(gram_b, torch.diag(gram_b.diagonal()), rtol=1e-4, atol=1e-5)
    assert torch.allclose(gram_b.diagonal().sort(descending=True).values, torch.linalg.svdvals(before)[:6], rtol=1e-4)

    half = unbalanced_layer().to(torch.bfloat16)  # computed in float32, stored in the parameters' dtype
    product = (half.B.float() @ half.A.float()).clone()
    optim.rebalance({"l": half})
    assert half.B.dtype == torch.bfloat16
    torch.testing.assert_close(half.B.float() @ half.A.float(), product, rtol=3e-2, atol=3e-2 * product.abs().max().item())


def test_rebalance_leaves_rank_deficient_pairs_and_adapters_alone():
    grown = unbalanced_layer()
    with torch.no_grad():
        grown.B[:, 2] = 0  # a component InRank just grew: B = 0, so the product has rank 5 of 6
    adapter = unbalanced_layer()
    adapter.to_residual(rank=4)
    saved = {k: v.clone() for k, v in {"gB": grown.B, "gA": grown.A, "aB": adapter.B, "aA": adapter.A}.items()}
    assert optim.rebalance({"grown": grown, "adapter": adapter}) == []
    assert optim.rebalance_factors(grown) is None
    for key, layer_t in {"gB": grown.B, "gA": grown.A, "aB": adapter.B, "aA": adapter.A}.items():
        assert torch.equal(layer_t, saved[key]), key


def test_rebalance_moments_keep_or_reset():
    for moments, kept in (("keep", True), ("reset", False)):
        layer = unbalanced_layer()
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
        layer(torch.randn(4, 12)).sum().backward()
        opt.step()
        optim.rebalance({"l": layer}, opt, moments)
        assert (layer.B in opt.state and layer.A in opt.state) is kept
        assert layer.bias in opt.state, "only the factors' state is touched"
        layer(torch.randn(4, 12)).sum().backward()
        opt.step()  # a reset state starts afresh, bias correction included
        assert int(opt.state[layer.B]["step"]) == (2 if kept else 1)
    with pytest.raises(ValueError, match="bogus"):
        optim.rebalance({"l": layer}, opt, "bogus")


def test_rebalance_rotates_first_moments_exactly_into_the_new_basis():
    """B' = B M, A' = N A with M N = I; a gradient of the new factors is grad_B N^T and M^T grad_A,
    so rotated first moments are what Adam would hold had it trained the new factors all along."""
    layer = unbalanced_layer()
    x = torch.randn(16, 12)
    layer(x).pow(2).sum().backward()
    grad_b, grad_a = layer.B.grad.clone(), layer.A.grad.clone()
    B, A = layer.B.detach().clone(), layer.A.detach().clone()
    m, n = optim.rebalance_factors(layer)
    torch.testing.assert_close(m @ n, torch.eye(6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(B @ m, layer.B.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(n @ A, layer.A.detach(), rtol=1e-4, atol=1e-5)
    layer.zero_grad()
    layer(x).pow(2).sum().backward()  # the same function, so the same dL/dW: the new factors' gradients
    torch.testing.assert_close(layer.B.grad, grad_b @ n.T, rtol=1e-3, atol=1e-3 * grad_b.abs().max().item())
    torch.testing.assert_close(layer.A.grad, m.T @ grad_a, rtol=1e-3, atol=1e-3 * grad_a.abs().max().item())

    layer = unbalanced_layer()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(x).pow(2).sum().backward()
    opt.step()
    m_b, m_a, v_b = (opt.state[p][k].clone() for p, k in ((layer.B, "exp_avg"), (layer.A, "exp_avg"), (layer.B, "exp_avg_sq")))
    B, A = layer.B.detach().clone(), layer.A.detach().clone()
    optim.rebalance({"l": layer}, opt, "rotate")
    n = torch.linalg.lstsq(A.T, layer.A.detach().T).solution.T  # A' = N A
    m = torch.linalg.lstsq(B, layer.B.detach()).solution  # B' = B M
    torch.testing.assert_close(opt.state[layer.B]["exp_avg"], m_b @ n.T, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(opt.state[layer.A]["exp_avg"], m.T @ m_a, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(opt.state[layer.B]["exp_avg_sq"], v_b @ (n * n).T, rtol=1e-3, atol=1e-9)
    assert (opt.state[layer.B]["exp_avg_sq"] >= 0).all()


def test_factor_weight_decay_sets_the_factor_groups():
    config = LowRankConfig(target_modules=["c_fc"], rank=4, factor_weight_decay=0.0)
    model = get_lowrank_model(tiny_gpt2(), config)
    groups = optim.param_groups(model, lr=1e-3, weight_decay=0.1)
    factor = [g for g in groups if g.get("lowrank_factors")]
    other = [g for g in groups if not g.get("lowrank_factors")]
    assert [g["weight_decay"] for g in factor] == [0.0] and max(g["weight_decay"] for g in other) == 0.1
    default = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4))  # None: 0 in the library's groups
    assert [g["weight_decay"] for g in optim.param_groups(default, 1e-3, 0.1) if g.get("lowrank_factors")] == [0.0]
    assert [g["weight_decay"] for g in optim.param_groups(default, 1e-3, 0.1, factor_weight_decay=0.05) if g.get("lowrank_factors")] == [0.05]
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)  # no factor groups: refused at bind
    with pytest.raises(ValueError, match="factor_weight_decay=0.0 needs factor parameter groups"):
        model.bind_training(10, plain)
    with pytest.raises(ValueError, match="frobenius_decay=0.001 already replaces"):
        LowRankConfig(target_modules=["c_fc"], factor_weight_decay=0.01, frobenius_decay=1e-3)

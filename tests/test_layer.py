"""LowRankLinear over nn.Linear and Conv1D: every transition, inits, layouts, counts, gradients, dtypes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_lowrank import LayerSpec, LowRankLinear

ATOL = 1e-5
IN, OUT = 24, 16  # full rank 16; the other orientation is covered by SHAPES
SHAPES = [(24, 16), (12, 20)]
KINDS = [(kind, bias) for kind in ("linear", "conv1d") for bias in (True, False)]
KIND_IDS = [f"{k}-{'bias' if b else 'nobias'}" for k, b in KINDS]


def make_base(kind: str, bias: bool, in_f: int = IN, out_f: int = OUT, seed: int = 0) -> nn.Module:
    """A random nn.Linear or Conv1D; Conv1D without bias has its bias removed by hand."""
    torch.manual_seed(seed)
    if kind == "linear":
        module = nn.Linear(in_f, out_f, bias=bias)
    else:
        module = Conv1D(out_f, in_f)
        nn.init.normal_(module.weight, std=0.2)  # Conv1D starts with std 0.02 and zero bias: make both matter
        if bias:
            nn.init.normal_(module.bias, std=0.2)
        else:
            module.bias = None
    return module


def dense_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (out, in) weight and bias of a plain module."""
    w = module.weight.T if isinstance(module, Conv1D) else module.weight
    return w.detach().clone(), None if module.bias is None else module.bias.detach().clone()


def inputs(in_f: int = IN) -> torch.Tensor:
    return torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(7))  # (batch, seq, in)


def out(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)


def randomize_active(layer: LowRankLinear, seed: int = 3) -> None:
    """Non-zero active factors (a fresh residual adapter has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.B[:, : layer.rank] = torch.randn(layer.out_features, layer.rank, generator=g) * 0.3


def assert_inactive_b_zero(layer: LowRankLinear) -> None:
    assert torch.count_nonzero(layer.B[:, layer.rank :]) == 0, "components beyond the active rank need B = 0"


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def kind(request):
    return request.param


@pytest.fixture(params=SHAPES, ids=[f"{i}to{o}" for i, o in SHAPES])
def shape(request):
    return request.param


def wrap(kind, shape=(IN, OUT)):
    base = make_base(*kind, *shape)
    return base, LowRankLinear(base)


# -- wrapping ---------------------------------------------------------------------------------


def test_wrap_keeps_the_function_and_normalises_the_weight(kind, shape):
    base, layer = wrap(kind, shape)
    in_f, out_f = shape
    x = inputs(in_f)
    w, b = dense_of(base)
    assert (layer.in_features, layer.out_features, layer.full_rank) == (in_f, out_f, min(in_f, out_f))
    assert layer.mode == "dense" and layer.spec == LayerSpec("dense")
    assert layer.weight.shape == (out_f, in_f)
    torch.testing.assert_close(out(layer, x), F.linear(x, w, b), atol=ATOL, rtol=0)
    if kind[1]:  # Conv1D without a bias cannot run on its own
        torch.testing.assert_close(out(layer, x), out(base, x), atol=ATOL, rtol=0)


def test_transitions_never_write_into_the_wrapped_module(kind):
    """The wrapped module (still referenced elsewhere, e.g. by the caller) keeps its weight."""
    base, layer = wrap(kind)
    before = base.weight.detach().clone()
    layer.dense_weight().zero_()  # a copy, not the parameter
    layer.to_residual(4, base="orthogonal")  # orthogonalises W0 in place: must not be the module's tensor
    randomize_active(layer)
    layer.to_dense()
    torch.testing.assert_close(base.weight.detach(), before, atol=0, rtol=0)


def test_wrap_refuses_other_modules():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        LowRankLinear(nn.Embedding(10, 4))


# -- exact transitions ------------------------------------------------------------------------


def test_dense_to_factorized_at_full_rank_is_exact(kind, shape):
    _, layer = wrap(kind, shape)
    x = inputs(shape[0])
    reference, w = out(layer, x), layer.dense_weight()
    layer.to_factorized(layer.full_rank)
    assert layer.mode == "factorized" and layer.weight is None and layer.base_weight is None
    assert layer.B.shape == (layer.out_features, layer.full_rank) and layer.A.shape == (layer.full_rank, layer.in_features)
    torch.testing.assert_close(layer.dense_weight(), w, atol=ATOL, rtol=0)
    torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)
    # balanced split: B^T B = A A^T = S
    BtB, AAt = layer.B.T @ layer.B, layer.A @ layer.A.T
    torch.testing.assert_close(BtB, AAt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.diag(BtB), torch.linalg.svdvals(w), atol=1e-4, rtol=1e-4)


def test_to_factorized_with_spare_capacity_is_exact_and_pads_b_with_zeros(kind):
    _, layer = wrap(kind)
    layer.to_factorized(layer.full_rank)
    x = inputs()
    reference = out(layer, x)
    layer.to_factorized(layer.full_rank, capacity=layer.full_rank)  # factorized -> factorized: re-balanced
    torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)
    _, layer = wrap(kind)
    layer.to_factorized(6, capacity=10)
    assert layer.spec == LayerSpec("factorized", 6, 10, 1.0)
    assert_inactive_b_zero(layer)
    assert torch.count_nonzero(layer.A[6:]) > 0, "spare A rows hold the next singular directions"


def test_factorized_to_dense_is_exact(kind):
    _, layer = wrap(kind)
    layer.init_factorized(5, capacity=8)
    x = inputs()
    reference, w = out(layer, x), layer.dense_weight()
    layer.to_dense()
    assert layer.mode == "dense" and layer.A is None and layer.B is None and layer.rank is None
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad
    torch.testing.assert_close(layer.weight.detach(), w, atol=ATOL, rtol=0)
    torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)
    layer.to_dense()  # already dense: no-op
    torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)


def test_dense_to_residual_is_exact_and_freezes_the_base(kind):
    _, layer = wrap(kind)
    x = inputs()
    reference, w = out(layer, x), layer.dense_weight()
    layer.to_residual(4, capacity=8, alpha=16.0)
    assert layer.spec == LayerSpec("residual", 4, 8, 4.0)  # scaling alpha / rank
    assert layer.weight is None
    assert not layer.base_weight.requires_grad
    assert layer.bias is None or not layer.bias.requires_grad, "the bias is frozen with W0"
    torch.testing.assert_close(layer.base_weight, w, atol=0, rtol=0)
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) > 0
    torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)
    layer.to_residual(4)  # alpha None: s = 1
    assert layer.scaling == 1.0


def test_residual_over_an_orthogonal_base(kind):
    _, layer = wrap(kind)
    layer.to_residual(4, base="orthogonal")
    w0 = layer.base_weight
    eye = torch.eye(layer.full_rank)
    gram = w0 @ w0.T if layer.out_features <= layer.in_features else w0.T @ w0
    torch.testing.assert_close(gram, eye, atol=1e-5, rtol=0)


def test_residual_to_dense_is_exact(kind):
    _, layer = wrap(kind)
    layer.to_residual(4, capacity=8, alpha=8.0)
    randomize_active(layer)
    x = inputs()
    reference, w = out(layer, x), layer.dense_weight()
    torch.testing.assert_close(w, layer.base_weight + 2.0 * layer.B[:, :4] @ layer.A[:4], atol=ATOL, rtol=0)
    layer.to_dense()
    assert layer.mode == "dense" and layer.base_weight is None and layer.scaling == 1.0
    assert layer.weight.requires_grad and (layer.bias is None or layer.bias.requires_grad)
    torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)


def test_residual_to_factorized_merges_exactly(kind):
    _, layer = wrap(kind)
    layer.to_residual(4, capacity=8, alpha=8.0)
    randomize_active(layer)
    x = inputs()
    reference = out(layer, x)
    layer.to_factorized(layer.full_rank)
    assert layer.mode == "factorized" and layer.base_weight is None and layer.scaling == 1.0
    assert layer.bias is None or layer.bias.requires_grad
    torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["factorized", "residual"])
def test_grow_is_exact(kind, mode):
    _, layer = wrap(kind)
    if mode == "factorized":
        layer.init_factorized(3, capacity=8)
    else:
        layer.to_residual(3, capacity=8, alpha=6.0)
        randomize_active(layer)
    assert_inactive_b_zero(layer)
    x = inputs()
    reference = out(layer, x)
    shapes = (layer.A.shape, layer.B.shape)
    for rank in (4, 8):
        layer.grow(rank)
        assert layer.rank == rank and (layer.A.shape, layer.B.shape) == shapes
        torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="capacity"):
        layer.grow(9)
    with pytest.raises(ValueError, match="below the current rank"):
        layer.grow(2)


def test_exact_chain_of_transitions(kind):
    """dense -> factorized -> residual -> grow -> dense -> residual -> factorized -> dense, same function throughout."""
    _, layer = wrap(kind)
    x = inputs()
    reference = out(layer, x)
    steps = [
        lambda: layer.to_factorized(layer.full_rank),
        lambda: layer.to_residual(2, capacity=6, alpha=4.0),
        lambda: layer.grow(6),
        layer.to_dense,
        lambda: layer.to_residual(3, capacity=3),
        lambda: layer.to_factorized(layer.full_rank),
        layer.to_dense,
    ]
    for step in steps:
        step()
        torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)


# -- truncation -------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_truncate_keeps_the_best_rank_r_approximation(kind, rank):
    _, layer = wrap(kind)
    w = layer.dense_weight()
    layer.to_factorized(layer.full_rank)
    layer.truncate(rank)
    assert layer.spec == LayerSpec("factorized", rank, rank, 1.0)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close(layer.dense_weight(), best, atol=1e-4, rtol=0)
    err = torch.linalg.matrix_norm(layer.dense_weight() - w)
    assert float(err) == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-4)
    torch.testing.assert_close(layer.B.T @ layer.B, layer.A @ layer.A.T, atol=1e-4, rtol=1e-4)  # balanced


def test_truncate_with_capacity_and_in_residual_mode(kind):
    _, layer = wrap(kind)
    layer.to_residual(8, capacity=8, alpha=8.0)
    randomize_active(layer)
    w0 = layer.base_weight.clone()
    delta = layer.B @ layer.A
    layer.truncate(3, capacity=6)
    assert layer.spec == LayerSpec("residual", 3, 6, 1.0), "the scaling is kept"
    assert_inactive_b_zero(layer)
    torch.testing.assert_close(layer.base_weight, w0, atol=0, rtol=0)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(layer.B[:, :3] @ layer.A[:3], u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="factorized or residual"):
        wrap(kind)[1].truncate(2)


# -- inits and layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["kaiming", "spectral", "spectral-ones", "zero_b"])
def test_init_factorized_shapes(kind, init):
    _, layer = wrap(kind)
    layer.init_factorized(4, capacity=10, init=init)
    assert layer.spec == LayerSpec("factorized", 4, 10, 1.0)
    assert layer.B.shape == (OUT, 10) and layer.A.shape == (10, IN)
    assert layer.weight is None and layer.A.requires_grad and layer.B.requires_grad
    assert_inactive_b_zero(layer)
    assert torch.count_nonzero(layer.A) > 0
    if init == "zero_b":
        assert torch.count_nonzero(layer.B) == 0
    else:
        assert torch.count_nonzero(layer.B[:, :4]) > 0
    if init == "kaiming":  # nn.Linear's bound 1 / sqrt(fan_in) for each factor
        assert layer.A.abs().max() <= 1 / math.sqrt(IN) and layer.B[:, :4].abs().max() <= 1 / math.sqrt(10)


def test_spectral_init_at_full_rank_reproduces_the_dense_weight(kind):
    _, layer = wrap(kind)
    x = inputs()
    reference, w = out(layer, x), layer.dense_weight()
    layer.init_factorized(layer.full_rank, init="spectral")
    torch.testing.assert_close(layer.dense_weight(), w, atol=ATOL, rtol=0)
    torch.testing.assert_close(out(layer, x), reference, atol=ATOL, rtol=0)


def test_spectral_ones_init_keeps_directions_with_unit_singular_values(kind):
    _, layer = wrap(kind)
    w = layer.dense_weight()
    layer.init_factorized(6, init="spectral-ones")
    torch.testing.assert_close(layer.B.T @ layer.B, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.A @ layer.A.T, torch.eye(6), atol=1e-5, rtol=0)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(layer.dense_weight(), u[:, :6] @ vh[:6], atol=1e-5, rtol=0)


def test_init_scale_multiplies_both_factors(kind):
    _, a = wrap(kind)
    _, b = wrap(kind)
    a.init_factorized(4, init="spectral")
    b.init_factorized(4, init="spectral", init_scale=0.5)
    torch.testing.assert_close(b.A, 0.5 * a.A, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.B, 0.5 * a.B, atol=1e-6, rtol=0)


SPECS = [LayerSpec("dense"), LayerSpec("factorized", 3, 7, 1.0), LayerSpec("residual", 2, 5, 4.0)]


@pytest.mark.parametrize("start", SPECS, ids=lambda s: s.mode)
@pytest.mark.parametrize("target", SPECS, ids=lambda s: s.mode)
def test_set_layout_allocates_the_spec(kind, start, target):
    _, layer = wrap(kind)
    layer.set_spec(start)
    layer.set_spec(target)
    assert layer.spec == target
    has_bias = layer.bias is not None
    if target.mode == "dense":
        assert layer.weight.shape == (OUT, IN) and layer.A is None and layer.base_weight is None
        assert layer.weight.requires_grad and (not has_bias or layer.bias.requires_grad)
        return
    assert layer.A.shape == (target.capacity, IN) and layer.B.shape == (OUT, target.capacity) and layer.weight is None
    if target.mode == "residual":
        assert layer.base_weight.shape == (OUT, IN) and not layer.base_weight.requires_grad
        assert not has_bias or not layer.bias.requires_grad
    else:
        assert layer.base_weight is None and (not has_bias or layer.bias.requires_grad)


def test_set_layout_refuses_an_unknown_mode(kind):
    with pytest.raises(ValueError, match="unknown mode 'lowrank'"):
        wrap(kind)[1].set_spec(LayerSpec("lowrank", 2, 2))


# -- conversion back --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in KINDS if k != ("conv1d", False)], ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("mode", ["dense", "factorized", "residual"])
def test_to_base_module_is_the_original_type_with_the_same_output(kind, mode):
    base, layer = wrap(kind)
    if mode == "factorized":
        layer.init_factorized(5, capacity=8)
    elif mode == "residual":
        layer.to_residual(4, capacity=8, alpha=8.0)
        randomize_active(layer)
    x = inputs()
    module = layer.to_base_module()
    assert type(module) is type(base)
    assert module.weight.shape == base.weight.shape
    assert (module.bias is None) == (base.bias is None)
    assert all(p.requires_grad for p in module.parameters())
    torch.testing.assert_close(out(module, x), out(layer, x), atol=ATOL, rtol=0)
    assert module.weight.data_ptr() != (layer.weight.data_ptr() if layer.weight is not None else -1), "a copy"


# -- errors -----------------------------------------------------------------------------------

BAD_SIZES = [(0, None), (5, 3), (17, None), (4, 17)]  # rank 0, rank > capacity, rank > full, capacity > full


@pytest.mark.parametrize("rank,capacity", BAD_SIZES)
@pytest.mark.parametrize("op", ["init_factorized", "to_factorized", "to_residual", "truncate", "set_spec"])
def test_sizes_beyond_the_layer_are_refused(op, rank, capacity):
    _, layer = wrap(("linear", True))
    if op == "truncate":
        layer.to_factorized(layer.full_rank)
    if op == "set_spec":
        call = lambda: layer.set_spec(LayerSpec("factorized", rank, capacity or rank))  # noqa: E731
    else:
        call = lambda: getattr(layer, op)(rank, capacity)  # noqa: E731
    with pytest.raises(ValueError, match=r"need 1 <= rank <= capacity <= 16"):
        call()


def test_grow_needs_factors():
    with pytest.raises(ValueError, match="factorized or residual"):
        wrap(("linear", True))[1].grow(2)


# -- parameter counts and gradients -----------------------------------------------------------


def actual_counts(layer: nn.Module) -> dict[str, int]:
    params = list(layer.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


@pytest.mark.parametrize("mode", ["dense", "factorized", "residual"])
def test_parameter_counts_follow_the_formula(kind, shape, mode):
    _, layer = wrap(kind, shape)
    in_f, out_f = shape
    bias = out_f if kind[1] else 0
    cap, rank = 6, 2
    if mode == "dense":
        expected = {"trainable": out_f * in_f + bias, "total": out_f * in_f + bias}
    elif mode == "factorized":
        layer.init_factorized(rank, capacity=cap)
        expected = {"trainable": cap * (in_f + out_f) + bias, "total": cap * (in_f + out_f) + bias}
    else:
        layer.to_residual(rank, capacity=cap)
        expected = {"trainable": cap * (in_f + out_f), "total": cap * (in_f + out_f) + out_f * in_f + bias}
    assert layer.num_parameters() == expected
    assert actual_counts(layer) == expected
    if mode != "dense":
        active = layer.num_parameters(active_only=True)
        assert expected["total"] - active["total"] == (cap - rank) * (in_f + out_f)


@pytest.mark.parametrize("mode", ["dense", "factorized", "residual"])
def test_gradients_flow_only_where_they_should(kind, mode):
    _, layer = wrap(kind)
    if mode == "factorized":
        layer.init_factorized(3, capacity=6)
    elif mode == "residual":
        layer.to_residual(3, capacity=6)
        randomize_active(layer)
    layer(inputs()).pow(2).sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    if layer.bias is not None:
        assert (grads["bias"] is None) == (mode == "residual")
    if mode == "dense":
        assert grads["weight"] is not None and torch.count_nonzero(grads["weight"]) > 0
        return
    assert "weight" not in grads
    assert torch.count_nonzero(grads["A"][:3]) > 0 and torch.count_nonzero(grads["B"][:, :3]) > 0
    assert torch.count_nonzero(grads["A"][3:]) == 0 and torch.count_nonzero(grads["B"][:, 3:]) == 0, "inactive: no gradient"
    if mode == "residual":
        assert grads["base_weight"] is None


# -- dtypes -----------------------------------------------------------------------------------


def test_bf16_layer_works_through_every_transition(kind):
    base = make_base(*kind).to(torch.bfloat16)
    layer = LowRankLinear(base)
    x = inputs().to(torch.bfloat16)
    reference = out(layer, x).float()
    for step in (
        lambda: layer.to_factorized(layer.full_rank),
        lambda: layer.to_residual(3, capacity=6, alpha=6.0),
        lambda: layer.grow(6),
        layer.to_dense,
        lambda: layer.init_factorized(4, init="spectral"),
        lambda: layer.truncate(2, capacity=4),
    ):
        step()
        assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
        y = out(layer, x)
        assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
        if layer.mode != "factorized" or layer.rank == layer.full_rank:  # the exact steps
            torch.testing.assert_close(y.float(), reference, atol=0.1, rtol=0.05)
    assert layer.singular_values().dtype == torch.float32
    assert layer.dense_weight().dtype == torch.float32
    if kind != ("conv1d", False):
        assert layer.to_base_module().weight.dtype == torch.bfloat16


def test_singular_values_are_of_the_trainable_matrix(kind):
    _, layer = wrap(kind)
    torch.testing.assert_close(layer.singular_values(), torch.linalg.svdvals(layer.dense_weight()))
    layer.to_residual(4, capacity=8)
    randomize_active(layer)
    s = layer.singular_values()
    assert s.shape == (4,)
    torch.testing.assert_close(s, torch.linalg.svdvals(layer.B[:, :4] @ layer.A[:4])[:4], atol=1e-5, rtol=1e-5)


# -- numerical faults inside transitions --------------------------------------------------------


def snapshot(layer: LowRankLinear) -> dict:
    """Mode, sizes and every tensor of the layer (identity and values)."""
    return {
        "spec": layer.spec,
        "tensors": {n: (p, p.detach().clone()) for n, p in layer.named_parameters()},
    }


def assert_unchanged(layer: LowRankLinear, before: dict) -> None:
    assert layer.spec == before["spec"]
    now = dict(layer.named_parameters())
    assert now.keys() == before["tensors"].keys()
    for name, (param, values) in before["tensors"].items():
        assert now[name] is param and torch.equal(param, values), name


def faulty_svd(monkeypatch, fault: str) -> None:
    """``torch.linalg.svd`` that raises a plain RuntimeError (as cuSOLVER does) or returns NaN silently."""
    real = torch.linalg.svd

    def svd(*args, **kwargs):
        if fault == "runtime_error":
            raise RuntimeError("cusolver error: CUSOLVER_STATUS_EXECUTION_FAILED")
        u, s, vh = real(*args, **kwargs)
        return u, torch.full_like(s, float("nan")), vh

    monkeypatch.setattr(torch.linalg, "svd", svd)


def prepared(op: str) -> tuple[LowRankLinear, callable]:
    """A layer ready for ``op`` and the call that performs it."""
    layer = LowRankLinear(make_base("linear", True))
    if op in ("truncate", "to_factorized from factorized"):
        layer.init_factorized(8, 12)
        return layer, (lambda: layer.truncate(4)) if op == "truncate" else (lambda: layer.to_factorized(4))
    if op == "init_factorized spectral":
        return layer, lambda: layer.init_factorized(4, 8, init="spectral")
    return layer, lambda: layer.to_factorized(4, 8)  # warm start's switch, from dense


@pytest.mark.parametrize("fault", ["runtime_error", "nan"])
@pytest.mark.parametrize("op", ["truncate", "to_factorized", "to_factorized from factorized", "init_factorized spectral"])
def test_a_failing_or_nan_svd_raises_linalg_error_and_leaves_the_layer(monkeypatch, op, fault):
    layer, transition = prepared(op)
    before = snapshot(layer)
    faulty_svd(monkeypatch, fault)
    with pytest.raises(torch.linalg.LinAlgError, match="cusolver" if fault == "runtime_error" else "non-finite"):
        transition()
    assert_unchanged(layer, before)


def test_a_failing_qr_of_the_orthogonal_base_raises_linalg_error(monkeypatch):
    layer = LowRankLinear(make_base("linear", True))
    before = snapshot(layer)

    def qr(*args, **kwargs):
        raise RuntimeError("cusolver error")

    monkeypatch.setattr(torch.linalg, "qr", qr)
    with pytest.raises(torch.linalg.LinAlgError, match="cusolver"):
        layer.to_residual(4, base="orthogonal")
    assert_unchanged(layer, before)


def test_out_of_memory_is_not_turned_into_a_solver_failure(monkeypatch):
    layer = LowRankLinear(make_base("linear", True))

    def svd(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(torch.linalg, "svd", svd)
    with pytest.raises(torch.OutOfMemoryError):
        layer.to_factorized(4)


# -- inactive components ------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["kaiming", "spectral"])
def test_inactive_components_zero_or_as_initialised(init):
    torch.manual_seed(0)
    zero = LowRankLinear(make_base("linear", True))
    zero.init_factorized(4, 12, init=init)
    torch.manual_seed(0)
    kept = LowRankLinear(make_base("linear", True))
    kept.init_factorized(4, 12, init=init, zero_inactive=False)
    assert_inactive_b_zero(zero)
    assert torch.count_nonzero(kept.B[:, 4:]) == kept.B[:, 4:].numel(), "the authors' layout: every component initialised"
    torch.testing.assert_close(kept.B[:, :4], zero.B[:, :4], atol=0, rtol=0)
    torch.testing.assert_close(kept.A, zero.A, atol=0, rtol=0)
    x = inputs()
    y_zero, y_kept = out(zero, x), out(kept, x)
    torch.testing.assert_close(y_kept, y_zero, atol=0, rtol=0)  # the same function at rank 4
    zero.grow(12)
    kept.grow(12)
    torch.testing.assert_close(out(zero, x), y_zero, atol=ATOL, rtol=0)  # exact growth
    assert not torch.allclose(out(kept, x), y_kept, atol=1e-3), "growing adds the initialised components"

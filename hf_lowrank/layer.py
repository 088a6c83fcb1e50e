"""LowRankLinear: one layer in dense, factorized or residual mode, and the moves between them.

The layer computes ``y = W x + bias`` with ``W`` of shape (out, in) whatever it wraps
(``nn.Linear`` stores (out, in), transformers' ``Conv1D`` stores (in, out); both are
normalised here). Factors are ``B`` (out, capacity) and ``A`` (capacity, in); only the first
``rank`` components take part in the forward, so growing the rank changes no shape.

Components beyond the active rank have ``B[:, j] = 0`` by default (``zero_inactive``), which
makes ``grow`` exact; InRank's authors' layout keeps them random instead.
The layer knows no strategy and no optimizer: transitions replace parameters, and
``hf_lowrank.optim.regroup`` moves the optimizer onto the new ones (parameters the change
kept keep their state, matched by identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .checks import check_layer_sizes
from .spectral import factor_svd, factor_svdvals, svdvals

SUPPORTED_TYPES = (nn.Linear, Conv1D)


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or a ``Conv1D`` (which stores (in, out)): a view, never a copy."""
    if not isinstance(module, SUPPORTED_TYPES):
        raise TypeError(f"LowRankLinear wraps nn.Linear or transformers Conv1D, not {type(module).__name__}.")
    return module.weight.T if isinstance(module, Conv1D) else module.weight


@dataclass(frozen=True)
class LayerSpec:
    """Mode and sizes of a layer: what a rank pattern stores per layer."""

    mode: str
    rank: int | None = None
    capacity: int | None = None
    scaling: float = 1.0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "rank": self.rank, "capacity": self.capacity, "scaling": self.scaling}


def _kaiming(rows: int, cols: int, like: torch.Tensor, scale: float) -> torch.Tensor:
    """Kaiming-uniform as ``nn.Linear`` initialises a (rows, cols) weight, times ``scale``."""
    w = torch.empty(rows, cols, device=like.device, dtype=torch.float32)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return (w * scale).to(like.dtype)


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, ones: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U sqrt(S)``, ``A = sqrt(S) Vh`` (or S replaced by 1 for spectral-ones)."""
    root = torch.ones_like(s) if ones else s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh  # (out, r), (r, in)


def _solve(fn, *args, **kwargs):
    """Run an SVD or QR routine; any solver failure comes out as ``torch.linalg.LinAlgError``.

    cuSOLVER and some CPU paths raise a plain ``RuntimeError``; callers of a transition then
    handle one exception type. Out-of-memory is not a solver failure and passes through.
    """
    try:
        return fn(*args, **kwargs)
    except (torch.linalg.LinAlgError, torch.OutOfMemoryError):
        raise
    except RuntimeError as e:
        raise torch.linalg.LinAlgError(f"{getattr(fn, '__name__', fn)} failed: {e}") from e


def _check_finite(op: str, *tensors: torch.Tensor) -> None:
    """Refuse to write non-finite factors (an SVD can return NaN without raising)."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise torch.linalg.LinAlgError(f"{op}: the SVD gave non-finite factors, so the layer is left as it was")


class LowRankLinear(nn.Module):
    """A linear layer that is dense, factorized (``W = B A``) or residual (``W = W0 + s B A``)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        weight = out_in_weight(base)
        self.base_type = "conv1d" if isinstance(base, Conv1D) else "linear"
        self.out_features, self.in_features = weight.shape
        self.mode = "dense"
        self.rank: int | None = None
        self.scaling = 1.0
        self.weight = weight if self.base_type == "linear" else nn.Parameter(weight.detach().contiguous())
        self.bias = base.bias
        self.register_parameter("A", None)
        self.register_parameter("B", None)
        self.register_parameter("base_weight", None)
        # 1 for the active components, 0 past the rank: a compiled forward multiplies at the full
        # capacity and masks, so growing changes a buffer's values, never a traced shape.
        self.register_buffer("rank_mask", None, persistent=False)

    # -- shape and reporting -------------------------------------------------------------------

    @property
    def full_rank(self) -> int:
        return min(self.in_features, self.out_features)

    @property
    def capacity(self) -> int | None:
        return None if self.A is None else self.A.shape[0]

    @property
    def spec(self) -> LayerSpec:
        """The layer's current mode and sizes."""
        return LayerSpec(self.mode, self.rank, self.capacity, self.scaling)

    def _ref(self) -> torch.Tensor:
        """A tensor with the layer's device and dtype."""
        return next(t for t in (self.weight, self.A, self.base_weight) if t is not None)

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``B[:, :rank]`` (out, r) and ``A[:rank]`` (r, in)."""
        k = self.rank
        return self.B[:, :k], self.A[:k]

    def num_parameters(self, active_only: bool = False) -> dict[str, int]:
        """``{"trainable": n, "total": n}`` of this layer; ``active_only`` counts only active components."""
        bias = 0 if self.bias is None else self.bias.numel()
        bias_trainable = bias if self.bias is not None and self.bias.requires_grad else 0
        if self.mode == "dense":
            return {"trainable": self.weight.numel() + bias_trainable, "total": self.weight.numel() + bias}
        k = self.rank if active_only else self.capacity
        factors = k * (self.in_features + self.out_features)
        base = 0 if self.mode == "factorized" else self.out_features * self.in_features
        return {"trainable": factors + bias_trainable, "total": factors + base + bias}

    def extra_repr(self) -> str:
        sizes = "" if self.mode == "dense" else f", rank={self.rank}, capacity={self.capacity}"
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}{sizes}"

    # -- compute -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return F.linear(x, self.weight, self.bias)
        mask = self.rank_mask
        if mask is not None and torch.compiler.is_compiling():
            # Compiled: the whole capacity, times a 0/1 mask of the active components. Growth
            # then changes the mask's values, not the graph (slicing at the rank bakes the rank
            # into the graph, one recompile per growth). Same outputs and gradients: masked
            # components get none, as sliced-off ones do.
            h = F.linear(x, self.A)  # (..., capacity)
            h, B = h * mask.to(h.dtype), self.B
        else:
            B, A = self.active_factors()
            h = F.linear(x, A)  # (..., r)
        if self.mode == "factorized":
            return F.linear(h, B, self.bias)  # (..., r) -> (..., out)
        return F.linear(x, self.base_weight, self.bias) + self.scaling * F.linear(h, B)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix the layer applies, computed in float32 (always a new tensor)."""
        if self.mode == "dense":
            return self.weight.detach().to(torch.float32, copy=True)  # never the parameter itself
        B, A = self.active_factors()
        delta = B.float() @ A.float()
        return delta if self.mode == "factorized" else self.base_weight.float() + self.scaling * delta

    @torch.no_grad()
    def singular_values(self) -> torch.Tensor:
        """Spectrum of the trainable matrix: ``W`` when dense, ``B A`` (active part) otherwise; float32."""
        if self.mode == "dense":
            return svdvals(self.weight)
        return factor_svdvals(*self.active_factors())

    # -- parameter management ------------------------------------------------------------------

    def _set_factors(self, B: torch.Tensor, A: torch.Tensor, rank: int, ref: torch.Tensor) -> None:
        self.B = nn.Parameter(B.to(ref.device, ref.dtype).contiguous())
        self.A = nn.Parameter(A.to(ref.device, ref.dtype).contiguous())
        self.rank = rank
        self.rank_mask = (torch.arange(self.A.shape[0], device=self.A.device) < rank).to(self.A.dtype)

    def _pad(self, B: torch.Tensor, A: torch.Tensor, capacity: int, init_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend factors of rank r to ``capacity`` with inactive components (B = 0, A random)."""
        extra = capacity - A.shape[0]
        if extra <= 0:
            return B, A
        A_pad = _kaiming(extra, self.in_features, A, init_scale).to(A.dtype)
        return torch.cat([B, B.new_zeros(self.out_features, extra)], 1), torch.cat([A, A_pad], 0)

    def _check_sizes(self, rank: int, capacity: int) -> None:
        check_layer_sizes(rank, capacity, self.out_features, self.in_features)

    # -- transitions ---------------------------------------------------------------------------

    @torch.no_grad()
    def init_factorized(
        self, rank: int, capacity: int | None = None, init: str = "kaiming", init_scale: float = 1.0, zero_inactive: bool = True
    ) -> None:
        """Dense -> factorized with freshly initialised factors (the dense weight is only read by spectral inits).

        ``zero_inactive`` sets ``B = 0`` beyond ``rank``, so that growing is exact; ``False``
        keeps those components as initialised (random for Kaiming, the next singular
        directions for a spectral init), the InRank authors' layout, where growing adds them.
        """
        capacity = capacity or rank
        self._check_sizes(rank, capacity)
        ref = self._ref()
        if init in ("spectral", "spectral-ones"):
            u, s, vh = _solve(torch.linalg.svd, self.dense_weight(), full_matrices=False)
            B, A = _balanced(u[:, :capacity], s[:capacity], vh[:capacity], ones=init == "spectral-ones")
            B, A = B * init_scale, A * init_scale
            _check_finite("init_factorized", B, A)
        else:
            A = _kaiming(capacity, self.in_features, ref, init_scale)
            B = _kaiming(self.out_features, capacity, ref, init_scale)
            if init == "zero_b":
                B.zero_()
        if zero_inactive:
            B[:, rank:] = 0
        self._drop_dense()
        self._set_factors(B, A, rank, ref)
        self.mode = "factorized"

    @torch.no_grad()
    def to_factorized(self, rank: int, capacity: int | None = None, ones: bool = False) -> None:
        """Split the current function by balanced SVD at ``rank`` (exact when ``rank`` covers its spectrum).

        From residual mode the base and adapter are merged first. Extra capacity is filled with
        the next singular directions in ``A`` and zeros in ``B``. ``ones`` gives spectral-ones.
        """
        capacity = capacity or rank
        self._check_sizes(rank, capacity)
        ref = self._ref()
        if self.mode == "factorized":
            u, s, vh = _solve(factor_svd, *self.active_factors())
        else:
            u, s, vh = _solve(torch.linalg.svd, self.dense_weight(), full_matrices=False)
        B, A = _balanced(u[:, :capacity], s[:capacity], vh[:capacity], ones=ones)
        _check_finite("to_factorized", B, A)
        B[:, rank:] = 0
        B, A = self._pad(B, A, capacity, 1.0)
        self._drop_dense()
        self._set_factors(B, A, rank, ref)
        self.mode = "factorized"

    @torch.no_grad()
    def truncate(self, rank: int, capacity: int | None = None) -> None:
        """Replace the low-rank part by its best rank-``rank`` approximation (SVD of ``B A``), balanced.

        In residual mode the adapter is truncated and ``W0`` is kept. New capacity defaults to ``rank``.
        """
        if self.mode == "dense":
            raise ValueError("truncate needs a factorized or residual layer; use to_factorized on a dense one.")
        capacity = capacity or rank
        self._check_sizes(rank, capacity)
        ref = self._ref()
        u, s, vh = _solve(factor_svd, *self.active_factors())
        B, A = _balanced(u[:, :rank], s[:rank], vh[:rank])
        _check_finite("truncate", B, A)
        B, A = self._pad(B, A, capacity, 1.0)
        self._set_factors(B, A, rank, ref)

    def grow(self, rank: int) -> None:
        """Activate more components up to the capacity; exact when inactive ``B`` columns are zero (the default layout)."""
        if self.mode == "dense":
            raise ValueError("grow needs a factorized or residual layer.")
        self._check_sizes(rank, self.capacity)
        if rank < self.rank:
            raise ValueError(f"grow: rank {rank} is below the current rank {self.rank}; use truncate to shrink.")
        self.rank = rank
        with torch.no_grad():
            self.rank_mask[:rank] = 1  # in place: compiled graphs and DDP keep the same buffer

    @torch.no_grad()
    def to_dense(self) -> None:
        """Merge into one trainable dense ``W`` (``B A``, or ``W0 + s B A``); exact."""
        if self.mode == "dense":
            return
        ref = self._ref()
        w = self.dense_weight().to(ref.dtype)
        self.A = self.B = self.base_weight = None
        self.rank_mask = None
        self.weight = nn.Parameter(w.contiguous())
        self.rank, self.scaling, self.mode = None, 1.0, "dense"
        if self.bias is not None:
            self.bias.requires_grad_(True)

    @torch.no_grad()
    def to_residual(
        self,
        rank: int,
        capacity: int | None = None,
        alpha: float | None = None,
        base: str = "model",
        init_scale: float = 1.0,
    ) -> None:
        """Freeze the current function as ``W0`` and add a fresh adapter with ``B = 0``.

        The function is unchanged when ``base="model"``. ``base="orthogonal"`` replaces ``W0``
        by a fixed orthogonal matrix (training from scratch, original InRank). The bias is
        frozen with ``W0``.
        """
        capacity = capacity or rank
        self._check_sizes(rank, capacity)
        ref = self._ref()
        w0 = self.dense_weight()
        if base == "orthogonal":
            _solve(nn.init.orthogonal_, w0)  # a QR
            _check_finite("to_residual", w0)
        A = _kaiming(capacity, self.in_features, ref, init_scale)
        B = torch.zeros(self.out_features, capacity, device=ref.device, dtype=ref.dtype)
        self.weight = None
        self.base_weight = nn.Parameter(w0.to(ref.dtype).contiguous(), requires_grad=False)
        self._set_factors(B, A, rank, ref)
        self.scaling = 1.0 if alpha is None else alpha / rank
        self.mode = "residual"
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @torch.no_grad()
    def set_spec(self, spec: LayerSpec) -> None:
        """Allocate parameters of ``spec``'s shapes (values to be loaded next, e.g. from a checkpoint)."""
        if spec.mode not in ("dense", "factorized", "residual"):
            raise ValueError(f"unknown mode {spec.mode!r} in a rank pattern; expected dense, factorized or residual.")
        if spec == self.spec:
            return
        if spec.mode == "dense":
            self.to_dense()
            return
        self._check_sizes(spec.rank, spec.capacity)
        if spec.mode == "factorized":
            self.init_factorized(spec.rank, spec.capacity, init="zero_b")
        else:
            self.to_residual(spec.rank, spec.capacity)
            self.scaling = spec.scaling

    def _drop_dense(self) -> None:
        self.weight = None
        self.base_weight = None
        self.scaling = 1.0
        if self.bias is not None:
            self.bias.requires_grad_(True)

    @torch.no_grad()
    def to_base_module(self) -> nn.Module:
        """A plain ``nn.Linear`` or ``Conv1D`` computing the same function (a copy)."""
        w = self.dense_weight()
        ref = self._ref()
        has_bias = self.bias is not None
        if self.base_type == "conv1d":
            module = Conv1D(self.out_features, self.in_features)
            module.weight = nn.Parameter(w.T.contiguous().to(ref.dtype))
            module.bias = nn.Parameter(self.bias.detach().clone()) if has_bias else None
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=has_bias, device="meta")
            module.weight = nn.Parameter(w.to(ref.dtype).contiguous())
            if has_bias:
                module.bias = nn.Parameter(self.bias.detach().clone())
        return module.to(ref.device)

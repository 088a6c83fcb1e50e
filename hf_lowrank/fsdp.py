"""Rank changes under FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 replaces each parameter by a ``DTensor`` sharded on dim 0 and groups the parameters of
every ``fully_shard``-ed module (a *unit*: a block, or the root with what no block owns) into
one parameter group, all-gathered before the unit's forward and reduce-scattered after its
backward. For the rank strategies that means:

- **Deciding** reads full tensors (SVDs of ``B A`` or ``W``): :func:`gathered_layers`
  all-gathers the low-rank layers' parameters on every process for the decision and puts
  the shards back after; process 0 decides on them and broadcasts the plan.
- **Growth** within the capacity changes only the active rank, a Python int: the DTensors
  keep their global shape (the capacity) and their sharding, and nothing is re-sharded.
- **A transition that replaces parameters** (truncate, to_factorized, to_dense,
  to_residual): :func:`resharding` gathers the units holding the changed layers, lets the
  change run on full tensors, broadcasts the new tensors from process 0 (so every shard comes
  from one set of values) and rebuilds each such unit's parameter group with the same mesh,
  placements, mixed-precision and offload policies. The unit's untouched parameters are
  re-sharded into the same chunks, and the optimizer moves onto the new shards with their
  state. Units without a changed layer are left alone.

No public FSDP2 API re-shards a unit whose parameters changed shape, so the rebuild calls
FSDP2's own constructor for a unit's parameter group (``FSDPParamGroup``); it checks the
layout it relies on and names the torch version when it differs.

Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` write and read the usual
``LowRankModel`` folder (untrimmed factors) plus the optimizer state as full tensors
(safetensors and JSON, never pickled), for a sharded or a plain model.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from . import optim, private_torch
from .config import CONFIG_NAME, LowRankConfig
from .files import atomic_directory, read_json, read_safetensors, write_json, write_safetensors
from .layer import LayerSpec, LowRankLinear

OPTIMIZER_NAME = "optimizer.safetensors"
OPTIMIZER_GROUPS_NAME = "optimizer_groups.json"
SCHEDULER_NAME = "scheduler.json"
RNG_NAME = "rng_state.safetensors"

def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or to a module inside it."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing can be sharded
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in module.modules())


def _states(model: nn.Module) -> list[Any]:
    """The FSDP2 states (one per unit) inside ``model``, in module order."""
    states: list[Any] = []
    for module in model.modules():
        state = private_torch.get_module_fsdp_state(module)
        if state is not None and state not in states:
            states.append(state)
    return states


def _group(state: Any) -> Any:
    """The unit's one parameter group (None for a unit without parameters).

    Raises ``RuntimeError`` when this torch's FSDP2 lacks the internals re-sharding reads, and
    ``ValueError`` for a unit sharded over several meshes; :func:`check_reshardable` raises
    both before training.
    """
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        raise RuntimeError(
            f"hf_lowrank re-shards FSDP2 units through FSDPState._fsdp_param_groups, which torch {torch.__version__} "
            "does not have; use a torch with it (2.13 is tested), DDP, or a strategy with changes_shapes=False."
        )
    if len(groups) > 1:
        raise ValueError(
            "an FSDP2 unit sharded over several meshes (shard_placement_fn returning ShardPlacementResult) cannot "
            "be re-sharded after a rank change; shard every parameter of a unit on one mesh."
        )
    return groups[0] if groups else None


def check_reshardable(model: nn.Module) -> None:
    """Raise now, not at the first rank change, if any FSDP2 unit of ``model`` could not be re-sharded."""
    for state in _states(model):
        _group(state)


def _unit_modules(state: Any) -> list[nn.Module]:
    """The modules whose own parameters the unit manages (not those of units nested in it)."""
    return private_torch.managed_modules(state._modules)


@contextmanager
def _gathered(states: list[Any], only: tuple[type, ...] = (nn.Module,), write_back: bool = False) -> Iterator[list]:
    """Full plain parameters on the modules of ``states`` (those of type ``only``) inside the block.

    Yields ``(FSDPParam, full parameter)`` pairs. On exit, a module attribute still holding
    its full parameter gets its shard back (a rebuilt unit's new shards are left alone), after
    copying the full values into the shard when ``write_back``. Every process must enter with
    the same states: each gather is a collective.
    """
    params = []
    for state in states:
        group = _group(state)
        if group is None:
            continue
        for module in state._modules:
            module.reshard()  # a unit the user left unsharded holds its unsharded tensors on the modules
        params += [fp for fp in group.fsdp_params if isinstance(fp._module_info.module, only)]
    pairs = []
    try:
        with torch.no_grad():
            for fp in params:
                full = nn.Parameter(fp.sharded_param.full_tensor(), requires_grad=fp.sharded_param.requires_grad)
                fp._setattr_on_modules(full)
                pairs.append((fp, full))
        # FSDP re-reads a module's parameters as shards after load_state_dict; here they are full tensors.
        for fp in params:
            fp._post_load_hook_handle.remove()
        yield pairs
        if write_back:
            from torch.distributed.tensor import distribute_tensor

            with torch.no_grad():
                for fp, full in pairs:
                    shard = fp.sharded_param
                    local = distribute_tensor(full.detach(), shard.device_mesh, shard.placements, src_data_rank=None)
                    shard.to_local().copy_(local.to_local())
    finally:
        for fp, full in pairs:
            info = fp._module_info
            if info.module._parameters.get(info.param_name) is full:
                fp._setattr_on_modules(fp.sharded_param)
                fp._post_load_hook_handle = info.module.register_load_state_dict_post_hook(
                    lambda *args, fp=fp, **kwargs: fp.reset_sharded_param()
                )


@contextmanager
def gathered_layers(model: nn.Module) -> Iterator[None]:
    """The low-rank layers hold full tensors inside the block (a strategy's decision reads them).

    A no-op for a model that is not sharded; otherwise a collective every process enters.
    """
    if not is_sharded(model):
        yield
        return
    with _gathered(_states(model), only=(LowRankLinear,)):
        yield


@contextmanager
def gathered_model(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """Every parameter is a full tensor inside the block (saving, loading); ``write_back`` keeps changes.

    A no-op for a model that is not sharded; otherwise a collective every process enters,
    which holds one full copy of the model per process while inside.
    """
    if not is_sharded(model):
        yield
        return
    with _gathered(_states(model), write_back=write_back):
        yield


def _rebuild(state: Any, placements: dict[int, Any], ignored: set[int]) -> dict[int, nn.Parameter]:
    """A new parameter group for ``state`` over its modules' current (full, plain) parameters.

    Parameters that were gathered keep their placement; new ones are sharded on dim 0, as
    ``fully_shard`` does by default. Returns ``{id(full parameter): its new shard}``.
    """
    old = _group(state)
    params = [p for p in private_torch.managed_parameters(_unit_modules(state)) if id(p) not in ignored]
    new = private_torch.fsdp_param_group_class()(
        params, state._modules, old.mesh_info, old.post_forward_mesh_info, old.device,
        lambda p: placements.get(id(p)), old.mp_policy, old.offload_policy,
    )
    for attr in private_torch.FSDP_GROUP_SETTINGS:
        if hasattr(old, attr):  # a setting this torch's FSDP2 does not have is not one the user set
            setattr(new, attr, getattr(old, attr))
    # The old group's state-dict hooks would reshard parameters that no longer exist.
    for handles in (old._module_to_pre_save_state_dict_hook_handle, old._module_to_pre_load_state_dict_hook_handle):
        for handle in handles.values():
            handle.remove()
    for fp in old.fsdp_params:
        fp._post_load_hook_handle.remove()
    state._fsdp_param_groups = [new]
    if state._is_root is not None:  # the root's lazy init ran already: do this group's part of it
        new.lazy_init()
        prefix = {id(fp._module_info.module): fp._param_fqn.rpartition(".")[0] for fp in old.fsdp_params if fp._param_fqn}
        for fp in new.fsdp_params:  # names for FSDP's error messages, as the root's lazy init sets them
            owner = prefix.get(id(fp._module_info.module))
            fp._param_fqn = None if owner is None else f"{owner}.{fp._module_info.param_name}".lstrip(".")
    return {id(p): fp.sharded_param for p, fp in zip(params, new.fsdp_params)}


def _swap_in_optimizer(optimizer: Any, swap: dict[int, nn.Parameter]) -> None:
    """Replace parameters in the optimizer's groups and state, each keeping its slot and state."""
    opt = optim.inner_optimizer(optimizer)
    for group in opt.param_groups:
        group["params"] = [swap.get(id(p), p) for p in group["params"]]
    for p in [p for p in opt.state if id(p) in swap]:
        opt.state[swap[id(p)]] = opt.state.pop(p)


def _broadcast_layers(model: nn.Module, names: set[str]) -> None:
    """Process 0's tensors of the named layers on every process (SVDs need not agree bit for bit)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for name, layer in model.lowrank_layers().items():
            if name in names:
                for p in layer.parameters(recurse=False):
                    dist.broadcast(p.data, src=0)


@contextmanager
def resharding(model: nn.Module, layers: Iterable[str], optimizer: Any = None) -> Iterator[None]:
    """Replace the parameters of the named low-rank ``layers`` inside the block; re-shard on exit.

    Inside, the units holding those layers carry full plain parameters and ``optimizer`` (if
    given) points at them, so transitions and the optimizer's regrouping run as without
    FSDP. On exit the layers take process 0's values, each such unit gets a new parameter
    group (same mesh, placements and policies), and the optimizer moves onto the new shards
    with the state of every parameter that survived. A no-op for a model that is not sharded
    or an empty ``layers``; otherwise a collective every process enters with the same layers.
    """
    from torch.distributed.tensor import DTensor

    names = set(layers)
    if not names or not is_sharded(model):
        yield
        return
    targets = {id(m) for n, m in model.lowrank_layers().items() if n in names}
    states = [s for s in _states(model) if _group(s) and any(id(fp._module_info.module) in targets for fp in _group(s).fsdp_params)]
    # Parameters fully_shard was told to ignore are plain tensors; they stay out of the rebuilt group.
    ignored = {id(p) for s in states for m in _unit_modules(s) for p in m.parameters(recurse=False) if not isinstance(p, DTensor)}
    with _gathered(states) as pairs:
        if optimizer is not None:
            _swap_in_optimizer(optimizer, {id(fp.sharded_param): full for fp, full in pairs})
        yield
        _broadcast_layers(model, names)
        placements = {id(full): fp.fsdp_placement for fp, full in pairs}
        shards: dict[int, nn.Parameter] = {}
        for state in states:
            shards.update(_rebuild(state, placements, ignored))
    if optimizer is not None:
        _swap_in_optimizer(optimizer, shards)


# -- checkpoints ---------------------------------------------------------------------------


def _process_index() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's CPU (and current CUDA device's) random state."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def save_checkpoint(
    model: nn.Module, optimizer: Any, folder: str | os.PathLike, lr_scheduler: Any = None, step: int | None = None
) -> None:
    """Write a resumable checkpoint of a ``LowRankModel`` (sharded or not), its optimizer and schedule.

    Process 0 writes ``LowRankModel.save_pretrained(trim=False)``'s files (config, rank
    pattern, untrimmed factors), the optimizer state as full tensors (``optimizer.safetensors``,
    ``optimizer_groups.json``), the scheduler's state (``scheduler.json``), every process's
    random state (``rng_state.safetensors``: transitions draw new factors from it), the
    strategy's state in the format ``LowRankTrainer`` writes (``lowrank_trainer_state.json``,
    with ``step``, the last optimizer step, as ``global_step`` when given) and the files'
    checksums (``lowrank_checksums.json``), through :func:`hf_lowrank.files.atomic_directory`:
    ``folder`` is replaced only once complete. A collective every process enters.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    main = _process_index() == 0
    osd = get_optimizer_state_dict(
        model, optim.inner_optimizer(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    rng = [_rng_states()]
    if dist.is_available() and dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, _rng_states())
    with atomic_directory(folder) if main else contextlib.nullcontext() as staging:
        if main:
            tensors = {f"{name}/{key}": t for name, state in osd["state"].items() for key, t in state.items()}
            write_safetensors(staging / OPTIMIZER_NAME, tensors)
            write_json(staging / OPTIMIZER_GROUPS_NAME, osd["param_groups"])
            write_safetensors(staging / RNG_NAME, {f"{kind}/{r}": t for r, states in enumerate(rng) for kind, t in states.items()})
            if lr_scheduler is not None:
                write_json(staging / SCHEDULER_NAME, optim.inner_scheduler(lr_scheduler).state_dict())
            write_json(staging / ckpt.LOWRANK_STATE_NAME, ckpt.lowrank_state(model, step))
        with gathered_model(model):
            if main:
                model.save_pretrained(staging, trim=False)  # keeps the files already in the folder
        if main:
            ckpt.write_manifest(staging)
    _barrier()


def load_model(model: nn.Module, folder: str | os.PathLike, optimizer: Any = None) -> None:
    """Load a saved ``LowRankModel`` folder into ``model`` (sharded or not): layout first, then tensors.

    Layers whose saved layout differs are reshaped first (their units re-sharded, and
    ``optimizer``, if given, regrouped onto the new parameters), so every tensor loads into a
    parameter of its saved shape. A collective every process enters; each reads ``folder``.
    """
    from transformers.utils import (
        SAFE_WEIGHTS_NAME,  # the name LowRankModel.save_pretrained writes
    )

    folder = Path(folder)
    saved = LowRankConfig.from_dict(read_json(folder / CONFIG_NAME), source=str(folder / CONFIG_NAME))
    layers = model.lowrank_layers()
    changed = [n for n, spec in saved.rank_pattern.items() if n in layers and LayerSpec(**spec) != layers[n].spec]
    with resharding(model, changed, optimizer):
        before = dict(model.named_parameters())
        model.apply_rank_pattern(saved.rank_pattern)
        if optimizer is not None:
            frobenius = model.lowrank_config.frobenius_decay > 0
            optim.regroup(optimizer, model.named_parameters(), before, decays=lambda n, p: optim.decays(n, p, frobenius))
    with gathered_model(model, write_back=True):
        model.load_weights(folder / SAFE_WEIGHTS_NAME)


def load_checkpoint(model: nn.Module, optimizer: Any, folder: str | os.PathLike, lr_scheduler: Any = None) -> None:
    """Resume from :func:`save_checkpoint`: model (:func:`load_model`), strategy, optimizer, schedule, random state.

    Works on a sharded or a plain model with the optimizer already built over it (or
    ``optimizer=None`` to restore the model and strategy alone). Every process reads
    ``folder`` (a shared filesystem, or a copy per machine). A collective every process enters.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    folder = Path(folder)
    ckpt.verify_manifest(folder)
    state_file = ckpt.state_file(folder)
    load_model(model, folder, optimizer)
    model.load_lowrank_state_dict(read_json(state_file), source=str(state_file))
    if optimizer is not None:
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in read_safetensors(folder / OPTIMIZER_NAME).items():
            name, _, leaf = key.rpartition("/")
            state.setdefault(name, {})[leaf] = tensor
        osd = {"state": state, "param_groups": read_json(folder / OPTIMIZER_GROUPS_NAME)}
        set_optimizer_state_dict(model, optim.inner_optimizer(optimizer), osd, options=StateDictOptions(full_state_dict=True))
    if lr_scheduler is not None:
        optim.inner_scheduler(lr_scheduler).load_state_dict(read_json(folder / SCHEDULER_NAME))
    rng = read_safetensors(folder / RNG_NAME)
    index = _process_index() if f"cpu/{_process_index()}" in rng else 0  # another world size: every process takes process 0's
    torch.set_rng_state(rng[f"cpu/{index}"])
    if f"cuda/{index}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda/{index}"])

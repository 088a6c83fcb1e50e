"""Private torch / transformers / accelerate names: each declared in one module per dependency, each present here.

hf_lowrank/private_torch.py, private_transformers.py and private_accelerate.py hold every
private name the library touches. These tests fail, naming the name and the installed
version, when an upgrade drops one (instead of an AttributeError deep in a rank change), and
when library code reaches a private name those modules do not declare.
"""

from __future__ import annotations

import ast
from pathlib import Path

import accelerate
import torch
import torch.distributed as dist
import transformers

import hf_lowrank
from hf_lowrank import private_accelerate, private_torch, private_transformers

ROOT = Path(hf_lowrank.__file__).parent
FENCES = {"private_torch.py", "private_transformers.py", "private_accelerate.py"}
DEPENDENCIES = ("torch", "transformers", "accelerate")


def test_torch_has_every_private_name(tmp_path):
    from torch.distributed.fsdp import fully_shard

    assert private_torch.missing() == [], f"torch {torch.__version__} lacks {private_torch.missing()}; see hf_lowrank/private_torch.py"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        fully_shard(model[0])
        fully_shard(model)
        model(torch.randn(2, 4)).sum().backward()  # the root's lazy init ran: every attribute is set
        for unit in (model[0], model):
            state = private_torch.get_module_fsdp_state(unit)
            assert private_torch.missing_on_unit(state) == [], f"torch {torch.__version__}: {private_torch.missing_on_unit(state)}"
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        assert private_torch.missing_on_ddp(ddp) == [], f"torch {torch.__version__}: {private_torch.missing_on_ddp(ddp)}"
        assert {id(p) for p in private_torch.ddp_parameters(ddp)} == {id(p) for p in ddp.module.parameters()}
    finally:
        dist.destroy_process_group()
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert private_torch.missing_on_scheduler(sched) == [], f"torch {torch.__version__}: {private_torch.missing_on_scheduler(sched)}"
    compiled = torch.compile(torch.nn.Linear(2, 2))
    assert isinstance(compiled, private_torch.compiled_module_class())
    assert all(hasattr(compiled, a) for a in private_torch.COMPILED_MODULE_ATTRIBUTES)


def test_transformers_and_accelerate_have_every_private_name():
    assert private_transformers.missing() == [], (
        f"transformers {transformers.__version__} lacks {private_transformers.missing()}; see hf_lowrank/private_transformers.py"
    )
    acc = accelerate.Accelerator(cpu=True)
    assert private_accelerate.missing(acc) == [], f"accelerate {accelerate.__version__} lacks {private_accelerate.missing(acc)}"


def _declared() -> set[str]:
    names = set(private_transformers.TRAINER_METHODS) | set(private_accelerate.ACCELERATOR_ATTRIBUTES)
    for attr in dir(private_torch):
        if attr.isupper() and isinstance(getattr(private_torch, attr), tuple):
            names |= set(getattr(private_torch, attr))
    return names


def _library_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if p.name not in FENCES]


def test_no_private_module_is_imported_outside_its_fence():
    found = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in DEPENDENCIES:
                private = [p for p in node.module.split(".") if p.startswith("_") and not p.startswith("__")]
                private += [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in DEPENDENCIES:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert found == [], f"private imports outside hf_lowrank/private_*.py: {found}; move them there"


def test_every_private_attribute_the_library_reaches_is_declared():
    """A private attribute the library reads but never defines itself belongs to a dependency: it must be declared."""
    own: set[str] = set()
    used: dict[str, str] = {}
    for path in _library_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                used.setdefault(node.attr, f"{path.name}:{node.lineno}")
            # getattr(x, "_name"), hasattr, setattr: a private name spelled as a string
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr"):
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.startswith("_") and not name.value.startswith("__"):
                    used.setdefault(name.value, f"{path.name}:{node.lineno}")
    declared = _declared()
    undeclared = {name: where for name, where in used.items() if name not in own | declared}
    assert undeclared == {}, f"private attributes of a dependency used but not declared in hf_lowrank/private_*.py: {undeclared}"
    # overriding a private Trainer method is reaching into it too
    from hf_lowrank.trainer import LowRankTrainer

    overrides = {n for n in vars(LowRankTrainer) if n.startswith("_") and not n.startswith("__") and hasattr(transformers.Trainer, n)}
    assert overrides <= set(private_transformers.TRAINER_METHODS), (
        f"LowRankTrainer overrides {sorted(overrides - set(private_transformers.TRAINER_METHODS))}, not declared in "
        "hf_lowrank/private_transformers.py"
    )

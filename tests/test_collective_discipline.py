"""Collective discipline: every rank makes the same process groups in the same order, and no
rank-dependent code path (``if rank == 0:`` and its kin) contains a collective.

1. On 4 real gloo processes a Search-Softmax trainer is built (2 candidates x 2 ranks) with
   ``torch.distributed``'s group constructors (``init_process_group``, ``new_group``,
   ``new_subgroups``, ``new_subgroups_by_enumeration``, ``split_group``) wrapped to record each
   call: every rank records the same calls, in the same order, and they are the world and the
   groups written here by hand (candidates ``[0, 1]``, ``[2, 3]``; cross groups ``[0, 2]``,
   ``[1, 3]``). A rank that made a group the others did not (or in another order) would hang
   the job, or pair its collectives with the wrong peers.
2. The package's source is read with ``ast``: inside a branch that only some ranks take (the
   test of an ``if``/``while``/conditional expression compares a rank, or reads a rank-0 flag
   such as ``self.write_files``; after ``if rank != 0: return`` the rest of the block), no call
   is a collective: a ``torch.distributed`` collective or group constructor, a wrapper of
   ``partialfc/ops/collectives.py``, or a function documented as one (a docstring starting
   "Collective"). Package functions called there are followed two levels deep (module-level
   functions by name or through a module alias, and ``self.method`` of the same class). The
   walker itself is tested on small sources that must and must not be reported.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import partialfc
from partialfc.testing.multiprocess import run_distributed
from partialfc.testing.ports import reserved_port
from partialfc.train.config import load_config
from tests.ast_helpers import import_base
from tests.test_search import search_overrides

ROOT = Path(partialfc.__file__).parent

# ----------------------------------------------------------------- 1. groups, on every rank

GROUP_CONSTRUCTORS = {  # name -> the arguments recorded (those that must agree across ranks)
    "init_process_group": ("backend", "world_size"),
    "new_group": ("ranks", "backend", "use_local_synchronization"),
    "new_subgroups": ("group_size", "backend"),
    "new_subgroups_by_enumeration": ("ranks_per_subgroup_list", "backend"),
    "split_group": ("split_ranks", "backend"),
}


def _plain(value):
    """A recorded argument as a comparable, picklable value."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _record_group_calls(records: list, init_ranks: list) -> None:
    """Wrap every group constructor of ``torch.distributed`` (and of ``distributed_c10d``, where
    torch's own helpers find them) to append ``(name, {argument: value})`` to ``records``, then
    call through. ``init_process_group``'s rank, which differs by design, goes to ``init_ranks``."""
    import inspect

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name, keys in GROUP_CONSTRUCTORS.items():
        original = getattr(dist, name, None)
        if original is None:  # split_group is recent
            continue
        signature = inspect.signature(original)

        def wrapper(*args, _name=name, _keys=keys, _original=original, _signature=signature, **kwargs):
            bound = _signature.bind(*args, **kwargs)
            bound.apply_defaults()
            records.append((_name, tuple((k, _plain(bound.arguments.get(k))) for k in _keys)))
            if _name == "init_process_group":
                init_ranks.append(bound.arguments.get("rank"))
            return _original(*args, **kwargs)

        for module in (dist, c10d):
            if getattr(module, name, None) is original:
                setattr(module, name, wrapper)


def _build_search_trainer(rank, world, port, run_dir, cache):
    """Rank ``rank``: the group of ``run_distributed`` torn down, then a search trainer built from
    the launch environment (its own rendezvous on ``port``) with every group constructor
    recorded; the records, the ranks passed to ``init_process_group``, the calls of
    ``candidate_groups`` and the members of the groups this rank got."""
    import torch.distributed as dist

    from partialfc import dist as pdist
    from partialfc.train.trainer import Trainer

    records, init_ranks, layouts = [], [], []
    dist.destroy_process_group()  # run_distributed connected every rank's group before fn: safe at once
    os.environ["MASTER_PORT"] = str(port)  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR: set by run_distributed
    _record_group_calls(records, init_ranks)
    candidate_groups = pdist.candidate_groups

    def recorded_candidate_groups(population):
        records.append(("candidate_groups", (("population", population),)))
        layout = candidate_groups(population)
        layouts.append(layout)
        return layout

    pdist.candidate_groups = recorded_candidate_groups  # the trainer calls it as pdist.candidate_groups
    # 40 verification pairs (not 400): the evaluator decodes them on every rank
    trainer = Trainer(load_config(None, search_overrides(run_dir, cache, "dist.timeout_s=60",
                                                         "data.synthetic.verification_pairs=40")))
    layout = trainer.layout
    assert [layout] == layouts, "the trainer's layout is not the one candidate_groups made"
    return {"records": records, "init_ranks": init_ranks, "candidate": layout.candidate,
            "group_rank": layout.group_rank, "group": dist.get_process_group_ranks(layout.group),
            "cross": dist.get_process_group_ranks(layout.cross), "world": dist.get_world_size()}


def _new_group(ranks) -> tuple:
    return ("new_group", (("ranks", tuple(ranks)), ("backend", None), ("use_local_synchronization", False)))


@pytest.mark.multiprocess
@pytest.mark.required
def test_every_rank_makes_the_same_groups_in_the_same_order(tmp_path, cache):
    with reserved_port() as port:
        results = run_distributed(_build_search_trainer, 4, port, str(tmp_path), str(cache), timeout=120)
    # written by hand for population 2 x 2 ranks: the world, candidate c = ranks [2c, 2c+1],
    # cross group i = group rank i of every candidate
    expected = [
        ("init_process_group", (("backend", "gloo"), ("world_size", 4))),
        ("candidate_groups", (("population", 2),)),
        _new_group([0, 1]), _new_group([2, 3]),  # the candidates
        _new_group([0, 2]), _new_group([1, 3]),  # the cross groups
    ]
    for rank, result in enumerate(results):
        assert result["records"] == results[0]["records"], (
            f"rank {rank} made other groups (or in another order) than rank 0:\n"
            f"rank 0: {results[0]['records']}\nrank {rank}: {result['records']}")
        assert result["records"] == expected, result["records"]
        assert result["init_ranks"] == [rank]
        assert result["world"] == 4
        assert (result["candidate"], result["group_rank"]) == (rank // 2, rank % 2)
        assert result["group"] == [[0, 1], [2, 3]][rank // 2]
        assert result["cross"] == [[0, 2], [1, 3]][rank % 2]


# ----------------------------------------------------------------- 2. rank-dependent paths

TORCH_COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "barrier", "monitored_barrier", "gather", "gather_object", "scatter",
    "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "send_object_list", "recv_object_list", "batch_isend_irecv",
    "init_process_group", "new_group", "new_subgroups", "new_subgroups_by_enumeration", "split_group",
})
# method names too generic to flag on a receiver that is not torch.distributed (a tensor's
# ``gather``/``scatter``, a generator's ``send``)
GENERIC_METHODS = frozenset({"gather", "scatter", "reduce", "send", "recv"})
COLLECTIVES_MODULE = "partialfc.ops.collectives"
RANK_NAMES = re.compile(r"^(get_)?(group_|local_|global_|node_|world_)?rank$")
RANK0_FLAGS = frozenset({"write_files", "is_main", "is_main_process", "main_process", "is_master", "is_rank0",
                         "is_rank_zero", "rank0", "rank_zero", "is_leader", "is_root", "is_primary"})
DEPTH = 2  # package functions followed from a rank-dependent call: the callee and its callees
# ``file:line function -> call`` entries judged safe (none today); each needs a comment saying why
ALLOWED: frozenset[str] = frozenset()


@dataclass
class Module:
    name: str
    path: str  # as reported
    tree: ast.Module
    aliases: dict[str, str] = field(default_factory=dict)  # local name -> dotted target
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)  # module level
    classes: dict[str, dict[str, ast.FunctionDef]] = field(default_factory=dict)  # class -> methods
    flags: set[str] = field(default_factory=set)  # local names assigned a rank test


def parse_module(name: str, path: str, source: str) -> Module:
    module = Module(name, path, ast.parse(source, path))
    package = name.rpartition(".")[0] if not path.endswith("__init__.py") else name
    for node in ast.walk(module.tree):  # imports anywhere (function-level ones too)
        if isinstance(node, ast.Import):
            for a in node.names:
                module.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = import_base(node, package)
            for a in node.names:
                module.aliases[a.asname or a.name] = f"{base}.{a.name}"
    for node in module.tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            module.functions[node.name] = node
            module.aliases[node.name] = f"{name}.{node.name}"
        elif isinstance(node, ast.ClassDef):
            module.classes[node.name] = {n.name: n for n in node.body
                                         if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            module.aliases[node.name] = f"{name}.{node.name}"
    return module


def package_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("partialfc", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = parse_module(name, str(path.relative_to(ROOT.parent)), path.read_text())
    return modules


def dotted(node: ast.expr, module: Module) -> str | None:
    """``dist.all_reduce`` -> ``torch.distributed.all_reduce`` through the module's imports and
    module-level definitions; None for anything else (``self.x``, a local variable)."""
    if isinstance(node, ast.Name):
        return module.aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, module)
        return f"{base}.{node.attr}" if base else None
    return None


def is_collective_doc(fn: ast.AST) -> bool:
    """The package's marker of a collective: a docstring starting "Collective"."""
    doc = ast.get_docstring(fn)
    return bool(doc) and doc.lstrip().startswith("Collective")


@dataclass
class Collectives:
    functions: set[str]  # dotted module-level functions
    methods: set[str]  # names of methods documented as collectives
    names: set[str]  # every simple name above (for calls on receivers that cannot be resolved)


def find_collectives(modules: dict[str, Module]) -> Collectives:
    """The wrappers of ``ops/collectives.py`` (its functions that reach a ``torch.distributed``
    collective, called or passed on, directly or through one another) and every function or
    method documented "Collective"."""
    home = modules[COLLECTIVES_MODULE]

    def direct(fn) -> bool:
        return any(isinstance(n, ast.Attribute) and (dotted(n, home) or "").startswith("torch.distributed.")
                   and n.attr in TORCH_COLLECTIVES for n in ast.walk(fn))

    wrappers = {n for n, fn in home.functions.items() if direct(fn)}
    while True:  # a wrapper calling a wrapper (barrier -> all_reduce)
        more = {n for n, fn in home.functions.items() if n not in wrappers and any(
            isinstance(c, ast.Name) and c.id in wrappers for c in ast.walk(fn))}
        if not more:
            break
        wrappers |= more
    functions = {f"{COLLECTIVES_MODULE}.{n}" for n in wrappers if not n.startswith("_")}
    methods = set()
    for module in modules.values():
        functions |= {f"{module.name}.{n}" for n, fn in module.functions.items() if is_collective_doc(fn)}
        methods |= {n for cls in module.classes.values() for n, fn in cls.items() if is_collective_doc(fn)}
    names = {f.rpartition(".")[2] for f in functions} | methods
    return Collectives(functions, methods, names)


def _final_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_rank(node: ast.expr) -> bool:
    """``rank``, ``self.group_rank``, ``launch.rank``, ``get_rank()``, ``pdist.get_rank(group)``, ..."""
    name = _final_name(node)
    return name is not None and bool(RANK_NAMES.match(name))


def rank_split(test: ast.expr, flags: set[str]) -> tuple[bool, bool]:
    """Whether the true branch and the false branch of ``test`` are taken by some ranks only
    (depending on the rank: ``rank == 0``, ``get_rank() != src``, ``self.write_files``, ...)."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and not isinstance(test.ops[0], (ast.Is, ast.IsNot)):
        if _is_rank(test.left) or _is_rank(test.comparators[0]):  # not ``rank is None``: an argument's default
            return True, True
    if isinstance(test, (ast.Name, ast.Attribute)) and _final_name(test) in flags:
        return True, True
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        body, orelse = rank_split(test.operand, flags)
        return orelse, body
    if isinstance(test, ast.BoolOp):
        parts = [rank_split(v, flags) for v in test.values]
        if isinstance(test.op, ast.And):  # true: all hold (one restricts); false: any fails (all must restrict)
            return any(b for b, _ in parts), all(o for _, o in parts)
        return all(b for b, _ in parts), any(o for _, o in parts)
    return False, False


def rank_flags(modules: dict[str, Module]) -> tuple[set[str], dict[str, set[str]]]:
    """Attributes (package-wide) and names (per module) assigned a rank test, e.g.
    ``self.write_files = pdist.get_rank() == 0``; plus the usual names of such flags."""
    attributes, names = set(RANK0_FLAGS), {}
    for module in modules.values():
        names[module.name] = set()
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None \
                    and rank_split(node.value, set())[0]:
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    if isinstance(target, ast.Attribute):
                        attributes.add(target.attr)
                    elif isinstance(target, ast.Name):
                        names[module.name].add(target.id)
    return attributes, names


def _terminates(stmts: list[ast.stmt]) -> bool:
    return bool(stmts) and isinstance(stmts[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break))


class Walker:
    """Finds the collective calls reachable from the rank-dependent branches of the modules."""

    def __init__(self, modules: dict[str, Module], collectives: Collectives, depth: int = DEPTH):
        self.modules, self.collectives, self.depth = modules, collectives, depth
        self.attribute_flags, self.name_flags = rank_flags(modules)
        self.found: list[str] = []

    # which calls are collectives
    def _function(self, target: str) -> tuple[Module, ast.FunctionDef] | None:
        module_name, _, fn = target.rpartition(".")
        module = self.modules.get(module_name)
        return (module, module.functions[fn]) if module is not None and fn in module.functions else None

    def reached(self, call: ast.Call, module: Module, cls: str | None, depth: int) -> list[str]:
        """The chains (``helper -> barrier``) by which ``call`` reaches a collective."""
        func = call.func
        target = dotted(func, module)
        label = ast.unparse(func)
        if target is not None:
            if target.startswith("torch.distributed.") and target.rpartition(".")[2] in TORCH_COLLECTIVES:
                return [label]
            if target in self.collectives.functions:
                return [label]
            found = self._function(target)
            if found is not None and depth > 0:
                return [f"{label} -> {chain}" for chain in self.calls_in(found[1], found[0], None, depth - 1)]
            return []
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self" \
                and cls is not None and func.attr in module.classes.get(cls, {}):
            method = module.classes[cls][func.attr]
            if is_collective_doc(method):
                return [label]
            if depth > 0:
                return [f"{label} -> {chain}" for chain in self.calls_in(method, module, cls, depth - 1)]
            return []
        name = _final_name(func)
        if name in self.collectives.names or (name in TORCH_COLLECTIVES - GENERIC_METHODS
                                              and isinstance(func, ast.Attribute)):
            return [label]
        return []

    def calls_in(self, fn: ast.AST, module: Module, cls: str | None, depth: int) -> list[str]:
        chains = []
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                chains += self.reached(node, module, cls, depth)
        return chains

    # where the rank-dependent branches are
    def walk(self, module: Module) -> list[str]:
        self.found = []
        self._block(module.tree.body, module, None, "<module>", False)
        return self.found

    def _split(self, test: ast.expr, module: Module) -> tuple[bool, bool]:
        return rank_split(test, self.attribute_flags | self.name_flags.get(module.name, set()))

    def _block(self, stmts: list[ast.stmt], module: Module, cls, where: str, restricted: bool) -> None:
        for stmt in stmts:
            self._node(stmt, module, cls, where, restricted)
            # ``if rank != 0: return`` (no else): the rest of the block is the other branch
            if isinstance(stmt, ast.If) and not stmt.orelse and _terminates(stmt.body):
                restricted = restricted or self._split(stmt.test, module)[1]

    def _node(self, node: ast.AST, module: Module, cls, where: str, restricted: bool) -> None:
        if isinstance(node, ast.ClassDef):
            for child in node.decorator_list:
                self._node(child, module, cls, where, restricted)
            self._block(node.body, module, node.name, node.name, restricted)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = node.name if where == "<module>" else f"{where}.{node.name}"
            for child in [*node.decorator_list, node.args]:
                self._node(child, module, cls, where, restricted)
            self._block(node.body, module, cls, inner, restricted)
            return
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            body, orelse = self._split(node.test, module)
            self._node(node.test, module, cls, where, restricted)
            for part, extra in ((node.body, body), (node.orelse, orelse)):
                if isinstance(part, list):
                    self._block(part, module, cls, where, restricted or extra)
                else:
                    self._node(part, module, cls, where, restricted or extra)
            return
        if restricted and isinstance(node, ast.Call):
            for chain in self.reached(node, module, cls, self.depth):
                self.found.append(f"{module.path}:{node.lineno} {where} -> {chain}")
        for name, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                self._block(value, module, cls, where, restricted)
            elif isinstance(value, list):
                for child in value:
                    if isinstance(child, ast.AST):
                        self._node(child, module, cls, where, restricted)
            elif isinstance(value, ast.AST):
                self._node(value, module, cls, where, restricted)


def rank_dependent_collectives(modules: dict[str, Module], only: set[str] | None = None) -> list[str]:
    """``file:line function -> call [-> callee ...]`` of every collective reachable from a
    branch that some ranks only take, in the modules named ``only`` (default: all)."""
    walker = Walker(modules, find_collectives(modules))
    return [entry for name, module in modules.items() if only is None or name in only
            for entry in walker.walk(module)]


def test_the_collective_names_are_found_in_the_package():
    collectives = find_collectives(package_modules())
    wrappers = {f"{COLLECTIVES_MODULE}.{n}" for n in ("all_reduce", "all_gather", "broadcast", "broadcast_object",
                                                       "barrier", "all_true", "gather_sizes", "gather_rows")}
    assert wrappers <= collectives.functions
    assert {f"{COLLECTIVES_MODULE}.{n}" for n in ("communicates", "group_device")}.isdisjoint(collectives.functions)
    assert {"partialfc.dist.candidate_groups", "partialfc.train.checkpoint.save_checkpoint",
            "partialfc.train.search.gather_rewards", "partialfc.train.preemption.agree"} <= collectives.functions
    assert {"save", "end_epoch"} <= collectives.methods


def test_no_rank_dependent_branch_reaches_a_collective():
    found = rank_dependent_collectives(package_modules())
    offenders = [entry for entry in found if entry not in ALLOWED]
    assert offenders == [], ("collectives on a path only some ranks take (the others never join them: a "
                             "hang, or a mismatch with their next collective):\n" + "\n".join(offenders))
    assert ALLOWED <= set(found), f"stale allow-list entries: {sorted(ALLOWED - set(found))}"


BAD = '''\
import torch.distributed as dist
from partialfc import dist as pdist
from partialfc.ops.collectives import barrier, broadcast_object


def direct(rank, x):
    if rank == 0:
        dist.all_reduce(x)
    return x


def through_a_helper(x):
    if pdist.get_rank() == 0 and x is not None:
        helper(x)


def helper(x):
    print(x)
    barrier()


def early_return(launch, x):
    if launch.rank != 0:
        return x
    broadcast_object(x, 0)


def in_the_else(group_rank):
    if group_rank != 0:
        pass
    else:
        pdist.candidate_groups(2)


class Driver:
    def __init__(self):
        self.write_files = pdist.get_rank() == 0

    def end(self, x):
        if self.write_files:
            self.outputs(x)

    def outputs(self, x):
        """Not marked, but it gathers."""
        dist.all_gather_object([None, None], x)

    def save(self):
        """Collective: every rank saves."""

    def other(self, trainer):
        if not trainer.is_main:
            return
        trainer.save()
'''

GOOD = '''\
import torch
import torch.distributed as dist
from partialfc import dist as pdist
from partialfc.ops.collectives import barrier, broadcast_object


def agreed(rank, obj, x):
    value = broadcast_object(obj if rank == 0 else None, 0)
    if rank == 0:
        print(value)
        torch.save(x, "x.pt")
    barrier()
    dist.all_reduce(x)
    return value


def helper_without_collective(x):
    if pdist.get_rank() == 0:
        write(x)


def write(x):
    torch.save(x, "x.pt")


def not_a_rank_test(per_rank, world):
    if per_rank and world > 1:
        barrier()
'''


def _snippet(source: str) -> list[str]:
    modules = package_modules()
    modules["partialfc._snippet"] = parse_module("partialfc._snippet", "snippet.py", source)
    return rank_dependent_collectives(modules, only={"partialfc._snippet"})


def test_the_walker_reports_collectives_in_rank_dependent_branches():
    assert _snippet(BAD) == [
        "snippet.py:8 direct -> dist.all_reduce",
        "snippet.py:14 through_a_helper -> helper -> barrier",
        "snippet.py:25 early_return -> broadcast_object",
        "snippet.py:32 in_the_else -> pdist.candidate_groups",
        "snippet.py:41 Driver.end -> self.outputs -> dist.all_gather_object",
        "snippet.py:53 Driver.other -> trainer.save",
    ]


def test_the_walker_leaves_collectives_outside_those_branches_alone():
    assert _snippet(GOOD) == []

"""A small mutation runner: does the suite fail when the code is changed a little?

    python tests/mutation/mutants.py [--budget SECONDS] [--only FILE[:FIRST-LAST]] ...

Each mutant is one edit of the AST — a comparison flipped (``==``/``!=``, ``<``/``>=``,
``in``/``not in``, ``is``/``is not``), ``and``/``or`` swapped, ``True``/``False`` swapped, an
integer constant moved by one, ``not`` dropped, a returned value replaced by ``None``, or a
statement replaced by ``pass`` — written to disk (bytecode caches off, so child interpreters
the tests start see it too), then the targets' test files run in a forked child of a process
that has already imported torch and pytest (a run costs the tests, not the imports). A mutant
is killed when a test fails or the run exceeds ``--timeout``; the original file is restored
after every mutant, and at exit whatever happens.

Each mutant runs only the part of its selection that can see it (``--all-tests`` turns this off).
Before the mutants, the selection runs once unmutated with every line of the target files traced,
test by test, threads included; a mutant then runs the selection's entries whose tests executed a
line of its statement. What the trace cannot see runs for every mutant: a statement run at import
(module level, a default, a decorator) or while a session-wide fixture was made runs the whole
selection, and a test that starts a process (whose lines are not traced) runs for every mutant. A
mutant whose statement no test executes survives without a run: no test of the selection reaches it.

Not run in CI (minutes of CPU); the results and the reasoning about each survivor are in
docs/mutation.md.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# target file -> (line range or None for the whole file, the test files that should kill its mutants)
# The fast pure tests come first: with -x a mutant they kill never reaches the slower ones.
TARGETS: dict[str, tuple[tuple[int, int] | None, list[str]]] = {
    "tiecheck/analyses/duplicates.py": (None, ["tests/test_analyses.py", "tests/test_duplicates_content.py",
                                               "tests/test_content_stats.py", "tests/test_duplicates_groups.py",
                                               "tests/test_duplicates_transposed_pairs.py",
                                               # the content pass's progress calls
                                               "tests/test_progress_within_phase.py::"
                                               "test_content_pass_reports_sampled_tensors_up_to_the_total",
                                               "tests/test_progress_within_phase.py::"
                                               "test_content_pass_calls_per_percent_or_per_tensor",
                                               "tests/test_progress_within_phase.py::"
                                               "test_content_pass_without_a_callback_is_unchanged",
                                               "tests/test_inspect_modules.py"]),
    "tiecheck/analyses/ties.py": (None, ["tests/test_analyses.py", "tests/test_ties_overlap_views.py",
                                         "tests/test_ties_groups.py", "tests/test_memory_summary_figures.py",
                                         "tests/test_inspect_modules.py"]),
    "tiecheck/analyses/candidates.py": (None, ["tests/test_analyses.py", "tests/test_candidates_roles.py",
                                               "tests/test_inspect_modules.py"]),
    "tiecheck/analyses/lint.py": (None, ["tests/test_analyses.py", "tests/test_lint_findings.py",
                                         "tests/test_lint_linear_findings.py", "tests/test_device_findings.py",
                                         "tests/test_inspect_modules.py"]),
    "tiecheck/analyses/memory.py": (None, ["tests/test_analyses.py", "tests/test_memory_counts.py",
                                           "tests/test_memory_summary_figures.py",
                                           "tests/test_inspect_modules.py"]),
    "tiecheck/analyses/packed.py": (None, ["tests/test_analyses.py", "tests/test_packed_pairs.py",
                                           "tests/test_packed_heads.py"]),
    # Declared against physical and stored, and adapters against their base: the pure tests first, then
    # the ones built on transformers models and PEFT folders (seconds each).
    "tiecheck/analyses/layers.py": (None, ["tests/test_layers_states.py", "tests/test_declared.py",
                                           "tests/test_declared_diff_check.py", "tests/test_layers_config_tie.py",
                                           "tests/test_sharded_aliases.py"]),
    "tiecheck/analyses/adapter.py": (None, ["tests/test_adapter_rows.py", "tests/test_peft_adapter.py"]),
    # The safety features themselves: fix's plan, writer and verification, the hardened torch.save
    # reader, the format loaders, the training guards, the distributed accounting, the FLOPs handles
    # and the escaping. Each selection starts with the tests that hand the check a really wrong input.
    **{f"tiecheck/repair/{name}.py": (None, ["tests/test_fix_writer.py", "tests/test_fix_run.py",
                                             "tests/test_fix_plan_cases.py", "tests/test_fix_config_edits.py",
                                             "tests/test_fix_verify.py", "tests/test_fix_answers.py",
                                             "tests/test_fix_hostile.py", "tests/test_fix.py"])
       for name in ("verify", "write", "actions", "__init__")},
    **{f"tiecheck/loaders/{name}.py": (None, ["tests/test_pickleloop_opcodes.py", "tests/test_pickles_globals.py",
                                              "tests/test_pickles_first_byte.py",
                                              "tests/test_pickleloop_budget_base.py",
                                              "tests/test_torchfile_pick.py", "tests/test_torchfile_load.py",
                                              "tests/test_archive_tensors_layout.py",
                                              "tests/test_torchzip_trusted_claims.py", "tests/test_torchzip_hostile.py",
                                              "tests/test_zipcheck.py",
                                              "tests/test_torchzip_rules.py",
                                              "tests/test_torchzip.py",
                                              "tests/test_loaders_security.py",
                                              "tests/test_formats.py", "tests/test_fix_hostile.py"])
       for name in ("formats/torchzip", "formats/archive_tensors", "formats/torchfile", "pickleloop", "pickles",
                    "zipcheck")},
    "tiecheck/loaders/hf_config_edits.py": (None, ["tests/test_fix_config_edits.py", "tests/test_fix_writer.py"]),
    "tiecheck/loaders/formats/onnx_files.py": (None, ["tests/test_onnx_files_hostile.py", "tests/test_onnx_files.py"]),
    "tiecheck/loaders/onnx_graph.py": (None, ["tests/test_onnx_graph.py", "tests/test_onnx_files.py",
                                                "tests/test_onnx_files_hostile.py"]),
    "tiecheck/loaders/formats/gguf_files.py": (None, ["tests/test_gguf_files_hostile.py", "tests/test_gguf_files_report.py",
                                                      "tests/test_gguf_files.py"]),
    **{f"tiecheck/loaders/{name}.py": (None, [*first, "tests/test_hf_key_match.py", "tests/test_hf_renamed.py",
                                              "tests/test_hf_conversion.py", "tests/test_loaders_weights_in_hf_folder.py",
                                              "tests/test_loaders.py"])
       for name, first in (("formats/hf", ["tests/test_hf_folder_files.py"]),
                           ("hf_architecture", ["tests/test_hf_architecture_budget.py",
                                               "tests/test_hf_architecture_custom.py"]),
                           ("hf_reconcile", ["tests/test_hf_reconcile_flag.py", "tests/test_hf_reconcile_notes.py",
                                            "tests/test_hf_reconcile.py", "tests/test_layers_config_tie.py",
                                            "tests/test_formats.py",
                                            # the spans the content pass reads remote bytes through
                                            "tests/test_remote.py::"
                                            "test_the_hugging_face_reconciliation_compares_remote_bytes"]))},
    "tiecheck/runtime.py": (None, ["tests/test_runtime_guard_paths.py", "tests/test_runtime_saved_verdicts.py",
                                   "tests/test_runtime_guard.py", "tests/test_sharded_aliases.py"]),
    "tiecheck/integrations/lightning.py": (None, ["tests/test_lightning_callback.py",
                                                  "tests/test_runtime_saved_verdicts.py", "tests/test_runtime_guard.py",
                                                  "tests/test_sharded_aliases.py"]),
    "tiecheck/integrations/transformers.py": (None, ["tests/test_transformers_callback.py",
                                                     "tests/test_runtime_saved_verdicts.py",
                                                     "tests/test_runtime_guard.py", "tests/test_sharded_aliases.py"]),
    **{f"tiecheck/{name}.py": (None, ["tests/test_check_outcome.py", "tests/test_snapshot_file.py",
                                      "tests/test_check_policy.py", "tests/test_check.py",
                                      "tests/test_snapshot_errors.py",
                                      "tests/test_pytest_plugin.py", "tests/test_declared_diff_check.py"])
       for name in ("check/outcome", "check/policy", "check/snapshot")},
    # The expectations serve analyze(expect_tied=...) and the CLI's --expect-tied as much as check.
    "tiecheck/analyses/expect.py": (None, ["tests/test_expect_findings.py", "tests/test_expect_relations.py",
                                           "tests/test_analyses.py",
                                           "tests/test_check.py", "tests/test_snapshot_errors.py",
                                           "tests/test_pytest_plugin.py", "tests/test_declared_diff_check.py",
                                           "tests/test_cli.py"]),
    "tiecheck/bench/distributed.py": (None, ["tests/test_distributed_parts.py", "tests/test_distributed_accounting.py",
                                             "tests/test_distributed_bench.py"]),
    "tiecheck/bench/stats.py": (None, ["tests/test_bench_stats.py", "tests/test_bench.py"]),
    # test_bench.py never calls seeds: its functions are read by the converge bench's tests.
    "tiecheck/bench/seeds.py": (None, ["tests/test_bench_seeds.py", "tests/test_converge.py"]),
    "tiecheck/flops/handles.py": (None, ["tests/test_flops_handles.py", "tests/test_flops_handles_edges.py",
                                         "tests/test_flops_grouped_mm.py",
                                         "tests/test_flops.py",
                                         "tests/test_flops_moe.py", "tests/test_flops_windows.py",
                                         "tests/test_flops_window_edges.py"]),
    "tiecheck/flops/moe.py": (None, ["tests/test_moe_routing.py", "tests/test_flops_moe.py"]),
    "tiecheck/report/text.py": (None, ["tests/test_text_escaping.py", "tests/test_report_outputs.py"]),
}
# The loaders' path checks: only the lines of the check itself are mutated (found by marker).
PATH_CHECKS = {
    "tiecheck/loaders/formats/sharded.py": ("def shard_paths(", "return by_shard",
                                              ["tests/test_shard_index.py", "tests/test_shard_messages.py",
                                               "tests/test_loaders_contained_paths.py"]),
    # test_loaders_contained_paths only holds hostile names: a check that refused every name would pass it.
    "tiecheck/loaders/formats/dcp.py": ("    files: dict[str, int] = {}", "files[rel] = p.stat().st_size",
                                ["tests/test_formats.py::test_dcp_folder_reads_metadata_and_maps_chunks",
                                 "tests/test_formats.py::test_dcp_missing_data_file_and_truncation",
                                 "tests/test_loaders_contained_paths.py"]),
}

FLIP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


@dataclass
class Mutant:
    file: str
    line: int
    what: str
    source: str
    # The lines of the innermost statement holding the edit, and whether that statement runs only
    # when a function is called (not when the module is imported): the coverage selection's inputs.
    span: tuple[int, int] = (0, 0)
    in_body: bool = False


def _statement_of(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> tuple[tuple[int, int], bool]:
    """(first, last) line of the innermost statement holding ``node``, and whether it lies in the
    body of a function or lambda (its defaults, decorators and annotations run at import)."""
    stmt = node
    while not isinstance(stmt, ast.stmt) and stmt in parents:
        stmt = parents[stmt]
    child, up = node, parents.get(node)
    while up is not None:
        if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)) and child in up.body:
            break
        if isinstance(up, ast.Lambda) and child is up.body:
            break
        child, up = up, parents.get(up)
    return (stmt.lineno, stmt.end_lineno or stmt.lineno), up is not None


def _line_range(path: Path, start_marker: str, end_marker: str) -> tuple[int, int]:
    lines = path.read_text().splitlines()
    first = next(i for i, s in enumerate(lines, 1) if start_marker in s)
    last = next(i for i, s in enumerate(lines, 1) if i > first and end_marker in s)
    return first, last


def _is_docstring(node: ast.AST, parent: ast.AST | None) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            and parent is not None and getattr(parent, "body", [None])[0] is node)


def mutants_of(rel: str, lines: tuple[int, int] | None) -> list[Mutant]:
    """Every single-edit mutant of ``rel`` whose edit starts within ``lines``."""
    tree = ast.parse((ROOT / rel).read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    sites = []  # (node, description, edit) where edit mutates a copy in place
    for node in ast.walk(tree):
        line = getattr(node, "lineno", None)
        if line is None or (lines and not lines[0] <= line <= lines[1]):
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in FLIP:
                    sites.append((node, f"{type(op).__name__} -> {FLIP[type(op)].__name__}",
                                  lambda n, i=i: n.ops.__setitem__(i, FLIP[type(n.ops[i])]())))
        elif isinstance(node, ast.BoolOp):
            sites.append((node, f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}",
                          lambda n: setattr(n, "op", ast.Or() if isinstance(n.op, ast.And) else ast.And())))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            sites.append((node, "not dropped", None))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            sites.append((node, f"{node.value} -> {not node.value}", lambda n: setattr(n, "value", not n.value)))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            sites.append((node, f"{node.value} -> {node.value + 1}", lambda n: setattr(n, "value", n.value + 1)))
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            sites.append((node, "return None", lambda n: setattr(n, "value", ast.Constant(None))))
        if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.If, ast.For, ast.Raise, ast.Continue)) \
                and not _is_docstring(node, parents.get(node)):
            sites.append((node, f"{type(node).__name__} statement -> pass", "pass"))
    out = []
    for node, what, edit in sites:
        clone = copy.deepcopy(tree)
        target = next(n for n in ast.walk(clone) if ast.dump(n, include_attributes=True)
                      == ast.dump(node, include_attributes=True))
        if edit == "pass":
            _replace(clone, target, ast.Pass())
        elif edit is None:  # `not x` -> `x`
            _replace(clone, target, target.operand)
        else:
            edit(target)
        ast.fix_missing_locations(clone)
        out.append(Mutant(rel, node.lineno, what, ast.unparse(clone), *_statement_of(node, parents)))
    return out


def _operator(what: str) -> str:
    """The kind of edit, for sampling: 'statement', 'compare', 'boolop', 'not', 'bool', 'int', 'return'."""
    head = what.split(" -> ")[0]
    if "statement" in what:
        return "statement"
    if head in ("And", "Or"):
        return "boolop"
    if head in ("True", "False"):
        return "bool"
    if head.lstrip("-").isdigit():
        return "int"
    return {"not dropped": "not", "return None": "return"}.get(what, "compare")


def _selected(m: Mutant, only: str) -> bool:
    """Whether ``--only FILE[:FIRST[-LAST]]`` selects ``m``."""
    rel, _, lines = only.partition(":")
    if m.file != rel:
        return False
    if not lines:
        return True
    first, _, last = lines.partition("-")
    return int(first) <= m.line <= int(last or first)


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if isinstance(value, list) and any(v is old for v in value):
                value[next(i for i, v in enumerate(value) if v is old)] = new
                return
            if value is old:
                setattr(parent, field, new)
                return


def _module_name(rel: str) -> str:
    """The name the file is imported under (a package's ``__init__.py`` is the package itself)."""
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def patch_module(rel: str, source: str) -> None:
    """Run ``source`` as the already-imported module ``rel`` and rebind what its importers took.

    The module keeps its identity (its namespace is re-executed in place), so ``import x`` users
    see the new code; ``from x import f`` users hold the old objects, so every module attribute
    that *is* an old function or class of ``rel`` — or bears the same name and *is* the old value,
    for constants — is pointed at the new one. Only used in a forked child, which then exits.

    A module the tests have not imported yet (the code imports it lazily, as ``check``'s policy and
    ``bench``'s seeds are) is left alone: the mutant is on disk, where the first import reads it.
    """
    mod = sys.modules.get(_module_name(rel))
    if mod is None:
        return
    old = dict(vars(mod))
    new = vars(mod)
    # Start from an empty namespace, as an import would: a name the mutant no longer assigns must
    # be missing, not the unmutated value left over.
    new.clear()
    new.update({k: v for k, v in old.items() if k.startswith("__") and k.endswith("__")})
    exec(compile(source, str(ROOT / rel), "exec"), new)
    by_id = {id(v): new[k] for k, v in old.items() if k in new and new[k] is not v
             and getattr(v, "__module__", None) == mod.__name__}
    by_name = {k: (v, new[k]) for k, v in old.items() if k in new and new[k] is not v and not k.startswith("__")}
    for other in list(sys.modules.values()):
        if other is mod or not hasattr(other, "__dict__"):
            continue
        space = vars(other)
        for key, value in list(space.items()):
            if id(value) in by_id:
                space[key] = by_id[id(value)]
            elif key in by_name and by_name[key][0] is value:
                space[key] = by_name[key][1]


def preimport(tests: list[str], files: set[str]) -> set[tuple[str, int]]:
    """Import the test modules (and through them the code) once, as pytest would, in this process.

    Returns the lines of ``files`` that ran meanwhile: code run at import (a table a function
    builds when the module loads) runs in no test of the traced run, which starts after it, and
    must count as run by every test, not by none.
    """
    import pytest  # noqa: PLC0415 - already imported by main(): only bound here

    paths = {str(ROOT / rel) for rel in files}
    ran: set[tuple[str, int]] = set()

    def local(frame, event, arg):
        if event == "line":
            ran.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def call(frame, event, arg):
        return local if frame.f_code.co_filename in paths else None

    with open(os.devnull, "w") as devnull:
        saved = os.dup(1), os.dup(2)
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        sys.settrace(call)
        try:
            pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider", *tests])
        finally:
            sys.settrace(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    return ran


def run_tests(tests: list[str], timeout: float, patch: Mutant | None = None) -> str:
    """'passed', 'failed' or 'timeout': the tests in a forked child (imports already paid).

    With ``patch``, the child first swaps the mutant into the modules the parent pre-imported
    (the screen); without, the child imports whatever the tests need afresh from disk (exact).
    """
    pid = os.fork()
    if pid == 0:
        import pytest  # noqa: PLC0415 - already imported by the parent: only bound here

        sys.dont_write_bytecode = True
        if patch is None:  # exact: forget what the parent imported, so the tests import the code from disk
            for name in list(sys.modules):
                if name.split(".")[0] in ("tiecheck", "tests", "support", "conftest") or name.startswith("test_"):
                    del sys.modules[name]
        else:
            try:
                patch_module(patch.file, patch.source)
            except Exception:  # noqa: BLE001 - a mutant that cannot even load is killed
                os._exit(3)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", *tests])
        os._exit(int(code))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


ALL = "*"  # the owner of lines run while a session-wide fixture is made: every test may depend on them


@dataclass
class Coverage:
    """Which entries of one selection run which lines of the target files (the unmutated code).

    ``lines[entry]`` holds (path, line) pairs executed by the entry's tests (an entry is a test file
    or a test id as the selection names it); ``lines[ALL]`` those run while a session- or
    package-scoped fixture was made. ``spawners`` are the test ids that started a process: what a
    child process runs is not traced, so they run for every mutant.
    """

    lines: dict[str, set[tuple[str, int]]]
    spawners: list[str]

    def tests_for(self, m: Mutant, selection: list[str]) -> list[str] | None:
        """The part of ``selection`` that can see ``m``: the entries whose tests executed a line of
        its statement, then the process-starting tests; ``None`` for the whole selection (a statement
        run at import, or one a session-wide fixture ran). An empty list: no test runs it."""
        path = str(ROOT / m.file)
        span = {(path, line) for line in range(m.span[0], m.span[1] + 1)}
        if not m.in_body or span & self.lines.get(ALL, set()):
            return None
        chosen = [e for e in selection if span & self.lines.get(e, set())]
        return chosen + [t for t in self.spawners if _entry(t, selection) not in chosen]


def _entry(nodeid: str, selection: list[str]) -> str | None:
    """The selection entry (a file, or a test id) a test id belongs to."""
    return next((e for e in selection if nodeid == e or nodeid.startswith(e + "::") or nodeid.startswith(e + "[")),
                None)


def measure_coverage(tests: list[str], files: set[str], timeout: float) -> Coverage | None:
    """Run ``tests`` once, unmutated, in a forked child that traces the lines of ``files`` each test
    executes (threads included) and notes the tests that start processes. ``None`` if they fail."""
    paths = {str(ROOT / rel) for rel in files}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        import pytest  # noqa: PLC0415 - already imported by the parent: only bound here

        owner = [None]
        hits: dict[str | None, set[tuple[str, int]]] = {}
        spawners: set[str] = set()

        def local(frame, event, arg):
            if event == "line":
                hits.setdefault(owner[0], set()).add((frame.f_code.co_filename, frame.f_lineno))
            return local

        def call(frame, event, arg):
            return local if frame.f_code.co_filename in paths else None

        def noting(f):
            def started(*a, **k):
                if owner[0] not in (None, ALL):
                    spawners.add(owner[0])
                return f(*a, **k)
            return started

        subprocess.Popen.__init__ = noting(subprocess.Popen.__init__)
        os.fork = noting(os.fork)
        os.posix_spawn = noting(os.posix_spawn)

        class Owner:
            @pytest.hookimpl(hookwrapper=True)
            def pytest_runtest_protocol(self, item, nextitem):
                owner[0] = item.nodeid
                yield
                owner[0] = None

            @pytest.hookimpl(hookwrapper=True)
            def pytest_fixture_setup(self, fixturedef, request):
                before = owner[0]
                if fixturedef.scope in ("session", "package"):
                    owner[0] = ALL
                yield
                owner[0] = before

        sys.dont_write_bytecode = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        threading.settrace(call)
        sys.settrace(call)
        code = pytest.main(["-q", "-p", "no:cacheprovider", *tests], plugins=[Owner()])
        sys.settrace(None)
        threading.settrace(None)
        by_entry: dict[str, set[tuple[str, int]]] = {}
        for nodeid, lines in hits.items():
            entry = ALL if nodeid in (None, ALL) else _entry(nodeid, tests)
            by_entry.setdefault(entry or ALL, set()).update(lines)
        with os.fdopen(write, "wb") as out:
            pickle.dump((int(code), by_entry, sorted(spawners)), out)
        os._exit(0)
    os.close(write)
    deadline, chunks = time.monotonic() + timeout, []
    with os.fdopen(read, "rb", buffering=0) as got:
        while True:
            ready, _, _ = select.select([got], [], [], max(0.0, deadline - time.monotonic()))
            chunk = got.read(1 << 20) if ready else None
            if not chunk:
                break
            chunks.append(chunk)
    if chunk is None:  # past the deadline
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if chunk is None or not chunks:
        return None
    code, by_entry, spawners = pickle.loads(b"".join(chunks))
    return Coverage(by_entry, spawners) if code == 0 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=600, help="stop starting mutants after this many seconds")
    ap.add_argument("--timeout", type=float, default=120, help="a mutant whose tests run longer is killed")
    ap.add_argument("--only", action="append", default=[], metavar="FILE[:FIRST[-LAST]]",
                    help="restrict to these target files, or to the mutants starting on these lines of one")
    ap.add_argument("--sample", type=int, default=1, metavar="K",
                    help="run every K-th mutant of each (file, operator) stratum of analyses/, starting with the first")
    ap.add_argument("--all-tests", action="store_true",
                    help="run each mutant against its file's whole selection, not only the tests that execute "
                         "its statement in a traced run of the unmutated code")
    ap.add_argument("--exact", action="store_true",
                    help="no screen: every mutant's tests import the code afresh from disk (slow, the reference)")
    args = ap.parse_args()
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    # A `timeout`, Ctrl-C or a closed terminal must still restore the mutated file: SIGTERM and
    # SIGHUP unwind like SystemExit. (Killed by SIGHUP, a run once left a mutant on disk, which the
    # next run then took for the original.)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    began_all = time.monotonic()
    import pytest  # noqa: F401, PLC0415 - paid once here, shared by every forked run
    import torch  # noqa: F401, PLC0415 - idem

    plan: list[tuple[Mutant, list[str]]] = []  # the path checks first: the fewest and the costliest to miss
    wanted = {only.partition(":")[0] for only in args.only}  # mutants are made for the files asked for only
    for rel, (start, end, tests) in PATH_CHECKS.items():
        if not wanted or rel in wanted:
            plan += [(m, tests) for m in mutants_of(rel, _line_range(ROOT / rel, start, end))]
    for rel, (lines, tests) in TARGETS.items():
        if not wanted or rel in wanted:
            plan += [(m, tests) for m in mutants_of(rel, lines)]
    if args.only:
        plan = [(m, t) for m, t in plan if any(_selected(m, only) for only in args.only)]
    if args.sample > 1:
        seen: dict[tuple[str, str], int] = {}
        kept = []
        for m, t in plan:
            key = (m.file, _operator(m.what))
            seen[key] = seen.get(key, 0) + 1
            if m.file in PATH_CHECKS or (seen[key] - 1) % args.sample == 0:  # the path checks run in full
                kept.append((m, t))
        plan = kept

    # The path checks always run exact: their tests analyse in child interpreters anyway, and
    # re-executing loaders/dcp.py in place breaks its tests (the swap check below refuses it).
    screened = set() if args.exact else {m.file for m, _ in plan} - set(PATH_CHECKS)
    if screened:  # the screen: import once here; each child swaps the mutant in
        at_import = preimport(sorted({f for m, t in plan if m.file in screened for f in t}), screened)
    else:
        at_import = set()
    for tests in {tuple(t) for m, t in plan if m.file not in screened}:
        if run_tests(list(tests), args.timeout) != "passed":
            print(f"the unmutated code fails {' '.join(tests)}: fix that first", file=sys.stderr)
            return 2
    for rel in sorted(screened):  # the unmutated source swapped in must pass: the swap itself is harmless
        same = Mutant(rel, 0, "unmutated", (ROOT / rel).read_text())
        tests = next(t for m, t in plan if m.file == rel)
        if run_tests(tests, args.timeout, patch=same) != "passed":
            print(f"swapping {rel} in place breaks {' '.join(tests)} (or they fail): use --exact", file=sys.stderr)
            return 2
    coverage: dict[tuple[str, ...], Coverage | None] = {}
    if not args.all_tests:
        for tests in {tuple(t) for _, t in plan}:
            files = {m.file for m, t in plan if tuple(t) == tests}
            coverage[tests] = measure_coverage(list(tests), files, max(600.0, 10 * args.timeout))
            if coverage[tests] is not None:  # what ran at import in this process ran before any test
                coverage[tests].lines.setdefault(ALL, set()).update(at_import)
            if coverage[tests] is None:
                print(f"the traced run of {' '.join(tests)} failed: its mutants run the whole selection",
                      file=sys.stderr)
    for tests, cov in coverage.items():
        if cov is not None:
            print(f"traced {' '.join(tests)}: {len(cov.spawners)} tests start processes and run for every mutant",
                  flush=True)
    print(f"{len(plan)} mutants planned; checks done in {time.monotonic() - began_all:.0f}s", flush=True)
    start = time.monotonic()
    survivors, killed, skipped, uncovered = [], 0, 0, 0
    originals: dict[str, str] = {}
    try:
        for m, tests in plan:
            if time.monotonic() - start > args.budget:
                skipped += 1
                continue
            cov = coverage.get(tuple(tests))
            chosen = cov.tests_for(m, tests) if cov is not None else None
            if chosen == []:  # no test of the selection executes the statement: it survives unrun
                print(f"{'passed':8} {0.0:5.1f}s {m.file}:{m.line} {m.what} (no test runs this statement)",
                      flush=True)
                survivors.append(m)
                uncovered += 1
                continue
            tests = chosen or tests
            path = ROOT / m.file
            originals.setdefault(m.file, path.read_text())
            cached = Path(importlib.util.cache_from_source(str(path)))
            cached.unlink(missing_ok=True)
            path.write_text(m.source + "\n")
            began = time.monotonic()
            try:
                result = run_tests(tests, args.timeout, patch=m if m.file in screened else None)
                if result == "passed" and m.file in screened:  # a screen survivor is confirmed the exact way
                    result = run_tests(tests, args.timeout)
            finally:
                path.write_text(originals[m.file])
            part = "" if chosen is None else f" ({len(chosen)} of the selection's tests and files)"
            print(f"{result:8} {time.monotonic() - began:5.1f}s {m.file}:{m.line} {m.what}{part}", flush=True)
            if result == "passed":
                survivors.append(m)
            else:
                killed += 1
    finally:
        for rel, text in originals.items():
            (ROOT / rel).write_text(text)
    print(f"{len(plan)} mutants: {killed} killed, {len(survivors)} survived ({uncovered} run by no test), "
          f"{skipped} not run (budget)")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())

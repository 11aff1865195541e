"""benchmarks/targets.toml holds every acceptance target the benchmark scripts read, and targets.load says clearly
what is missing. The scripts are parsed, not imported (most import torch or llama.cpp and take seconds)."""

from __future__ import annotations

import ast
import itertools
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import targets  # noqa: E402

SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "targets.py")


def _load_call(node: ast.AST) -> str | None:
    """The table of a `targets.load("<table>")` call, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "targets"):
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant):
            raise AssertionError(f"targets.load takes the table name as one string literal: {ast.unparse(node)}")
        return node.args[0].value
    return None


def reads(script: Path) -> dict[str, set[tuple[str, ...]]]:
    """{table: the key paths the script reads from it}: `T["a"]["b"]` where T is `targets.load("table")` or a
    name assigned from it; a subscript by a comprehension variable over a tuple of strings reads each string."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    tables = {}  # name -> table
    loops = {}  # comprehension variable -> the strings it runs over
    out: dict[str, set[tuple[str, ...]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and (table := _load_call(node.value)):
            tables.update({t.id: table for t in node.targets if isinstance(t, ast.Name)})
            out.setdefault(table, set())
        elif isinstance(node, ast.comprehension) and isinstance(node.target, ast.Name) and isinstance(
                node.iter, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.iter.elts):
            loops[node.target.id] = [e.value for e in node.iter.elts]
        elif (table := _load_call(node)) is not None:
            out.setdefault(table, set())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Subscript):
            continue
        keys: list[list[str]] = []
        while isinstance(node, ast.Subscript):
            s = node.slice
            keys.insert(0, [s.value] if isinstance(s, ast.Constant) else loops.get(getattr(s, "id", None), []))
            node = node.value
        table = tables.get(node.id) if isinstance(node, ast.Name) else _load_call(node)
        if table is None:
            continue
        known = list(itertools.takewhile(bool, keys))  # stop at the first key the parse cannot tell
        out[table].update(itertools.product(*known))
    return out


READS = {script.stem: reads(script) for script in SCRIPTS}


def test_the_scripts_that_judge_results_read_their_targets_from_the_file():
    users = {name for name, tables in READS.items() if tables}
    assert users == {"batch_turnaround", "cpu_precision", "gguf_speed", "import_folder", "labeling_throughput",
                     "llama_cpu", "memory", "prepare_folder", "train_geometry", "train_speed"}
    for name in users:
        assert set(READS[name]) == {name}, f"{name}.py reads another script's table: {set(READS[name])}"
        assert READS[name][name], f"{name}.py loads its table but reads no key from it"


@pytest.mark.parametrize("script", [s.stem for s in SCRIPTS if any(READS[s.stem].values())])
def test_every_key_a_script_reads_is_in_the_file(script):
    for table, paths in READS[script].items():
        loaded = targets.load(table)  # raises TargetError when the table is missing
        for path in paths:
            value = loaded
            for key in path:
                value = value[key]  # raises TargetError naming the file and the key when one is missing


def test_every_table_in_the_file_belongs_to_a_script():
    import tomllib

    tables = set(tomllib.loads(targets.FILE.read_text(encoding="utf-8")))
    assert tables == {t for r in READS.values() for t in r}


def test_no_target_is_left_as_a_literal_in_a_script():
    """A module-level TARGET/MARGIN name must come from the file, not from a number in the script."""
    for script in SCRIPTS:
        for node in ast.parse(script.read_text(encoding="utf-8")).body:
            names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if any(re.search(r"TARGET|MARGIN", n) for n in names):
                assert "targets.load" in ast.unparse(node) or "TARGETS[" in ast.unparse(node), \
                    f"{script.name}: {ast.unparse(node)}"


def test_the_targets_that_name_a_case_name_one_the_script_measures():
    """train_geometry judges the token ratio on one of its photos, gguf_speed's sweep on whole-number edges."""
    tree = ast.parse((BENCHMARKS / "train_geometry.py").read_text(encoding="utf-8"))
    photos = next(ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "PHOTOS")
    assert targets.load("train_geometry")["token_ratio_photo"] in {name for name, _ in photos}
    gguf = targets.load("gguf_speed")
    assert isinstance(gguf["sweep_seed_ratio_edge"], int)
    assert all(edge.isdigit() for edges in gguf["sweep_seconds"].values() for edge in edges)


def test_gguf_speed_builds_its_sweep_targets_from_the_file():
    pytest.importorskip("llama_cpp")
    import gguf_speed

    t = targets.load("gguf_speed")
    assert gguf_speed.SEED_TARGET == t["seed_ratio"] and gguf_speed.FLOOR_TARGET == t["floor_ratio"]
    assert gguf_speed.SWEEP_TARGETS == {(size, int(edge)): s for size, edges in t["sweep_seconds"].items()
                                        for edge, s in edges.items()}
    assert len(gguf_speed.SWEEP_TARGETS) == sum(len(e) for e in t["sweep_seconds"].values()) > 0
    size, edge, seconds = gguf_speed.TARGETS_MACHINE_ENCODE_S
    assert isinstance(size, str) and isinstance(edge, int) and seconds > 0


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "targets.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_returns_the_table(tmp_path):
    path = _toml(tmp_path, "[bench]\nratio = 1.5  # x\n[bench.per_size]\nsmall = 2\n")
    assert targets.load("bench", path) == {"ratio": 1.5, "per_size": {"small": 2}}


@pytest.mark.parametrize(("text", "read", "said"), [
    ("[other]\nratio = 1\n", lambda t: t, "no table [bench]"),
    ("bench = 3\n", lambda t: t, "no table [bench]"),
    ("[bench]\nratio = 1\n", lambda t: t["margin"], "no key 'margin' in table [bench]"),
    ("[bench.sub]\nratio = 1\n", lambda t: t["sub"]["margin"], "no key 'margin' in table [bench.sub]"),
    ("[bench]\nratio = \n", lambda t: t, "Invalid value"),
])
def test_a_missing_table_or_key_is_one_line_naming_the_file_and_what_is_missing(tmp_path, text, read, said):
    path = _toml(tmp_path, text)
    with pytest.raises(targets.TargetError) as err:
        read(targets.load("bench", path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and said in message and "\n" not in message

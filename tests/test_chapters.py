"""The course as a learner meets it: structural checks on the committed chapters (no kernel needed).

Running every chapter top to bottom in a real kernel is `tools/run_notebooks.py` (the README's test line);
these checks keep the rules that make that run, and the committed outputs, trustworthy.
"""
import re
from pathlib import Path
import nbformat
import pytest

NBS = Path(__file__).resolve().parent.parent / "nbs"
CHAPTERS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))
MAX_EXPORTED_LINES = 60

def cells(path):
    return nbformat.read(path, as_version=4).cells

def flags(cell) -> set[str]:
    out = set()
    for line in cell.source.splitlines():
        if not line.strip(): continue
        if not line.startswith("#|"): break
        out.update(line[2:].split())
    return out

@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_exported_cells_fit_one_screen(path):
    long = [(i, len(c.source.splitlines())) for i, c in enumerate(cells(path))
            if c.cell_type == "code" and "export" in flags(c) and len(c.source.splitlines()) > MAX_EXPORTED_LINES]
    assert not long, f"{path.name}: exported cells longer than {MAX_EXPORTED_LINES} lines (index, lines): {long}"

@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_gpu_cells_skip_themselves_without_a_gpu(path):
    cs = cells(path)
    cuda = [i for i, c in enumerate(cs) if c.cell_type == "code" and "cuda" in flags(c)]
    if not cuda: return
    setup = [i for i, c in enumerate(cs) if c.cell_type == "code" and "skip_cuda_cells_without_gpu()" in c.source]
    assert setup and setup[0] < cuda[0], f"{path.name}: call skip_cuda_cells_without_gpu() before its first #| cuda cell"
    for i in cuda:
        assert not re.search(r"^\s*(import|from)\s", cs[i].source, re.M), f"{path.name} cell {i}: #| cuda cells hold no imports"

@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_command_line_entry_points_do_not_run_in_a_kernel(path):
    for i, c in enumerate(cells(path)):
        if c.cell_type == "code" and "__name__" in c.source and "__main__" in c.source:
            assert "ipykernel" in c.source, f"{path.name} cell {i}: a __main__ guard must not run inside Jupyter"

_VOLATILE = [(re.compile(r"0x[0-9a-f]{8,}"), "a memory address"), (re.compile(r"/tmp/|/work/|/root/|/home/"), "a machine path"),
             (re.compile(r"\b\d+(\.\d+)? ?(ms|s) (elapsed|wall)\b|it/s\]"), "a timing")]

@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_committed_outputs_hold_no_error_and_nothing_volatile(path):
    for i, c in enumerate(cells(path)):
        if c.cell_type != "code": continue
        if "output: false" in " ".join(f"{k}" for k in flags(c)) or "#| output: false" in c.source:
            assert not c.get("outputs"), f"{path.name} cell {i}: `#| output: false` cells are committed without output"
        for o in c.get("outputs", []):
            assert o.get("output_type") != "error", f"{path.name} cell {i}: committed with an error: {o.get('ename')}"
            text = o.get("text", "") + "".join(v if isinstance(v, str) else "" for k, v in o.get("data", {}).items()
                                               if k.startswith("text/"))
            for pat, what in _VOLATILE:
                m = pat.search(text)
                assert not m, f"{path.name} cell {i}: output holds {what} ({m.group(0)!r}), which changes run to run"

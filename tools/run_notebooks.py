"""Run chapters top to bottom in a real Jupyter kernel, as a learner's "Run All" does.

    python tools/run_notebooks.py                 # every chapter; fail on the first error output; print times
    python tools/run_notebooks.py --write         # ... and store the outputs in the notebooks (then nbdev_clean)
    python tools/run_notebooks.py --check-committed   # only check: no committed notebook holds an error output
    python tools/run_notebooks.py nbs/05_block_manager.ipynb -j 1

A cell flagged `#| output: false` (a benchmark's timing, say) keeps no output in the committed notebook.
Unlike `nbdev_test`, cells flagged `#| cuda` / `#| slow` run too (a `#| cuda` cell prints "skipped" on a machine
without a GPU, through `skip_cuda_cells_without_gpu`). Outputs are made reproducible for committing: progress
bars off (TQDM_DISABLE), fixed hash seed, and no execution counts or timing metadata.
"""
import argparse, os, re, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"

def chapters() -> list[Path]:
    "Every notebook nbdev_test would run: not `_scratch` ones."
    return sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))

def error_outputs(nb) -> list[str]:
    "Descriptions of error outputs in `nb` (an exception shown in a cell)."
    found = []
    for i, c in enumerate(nb.cells):
        for o in c.get("outputs", []):
            if o.get("output_type") == "error": found.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
    return found

def scrub(nb) -> None:
    "Drop what changes on every run and says nothing: execution counts, timing and widget-state metadata."
    nb.metadata.pop("widgets", None)
    for c in nb.cells:
        c.metadata.pop("execution", None)
        if c.cell_type != "code": continue
        c.execution_count = None
        if "#| output: false" in c.source: c.outputs = []   # a timing or the like: shown when run, never committed
        merged = []   # subtle: the kernel may flush one print in several stream messages; join them so runs compare
        for o in c.outputs:
            if merged and o.get("output_type") == "stream" and merged[-1].get("output_type") == "stream" \
                    and merged[-1].get("name") == o.get("name"):
                merged[-1]["text"] += o["text"]
            else: merged.append(o)
        c.outputs = merged
        for o in c.get("outputs", []):
            if "execution_count" in o: o["execution_count"] = None
            # a live widget's view names a random model id and needs the kernel; the static HTML beside it stays
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {}) and "text/html" in o["data"]:
                del o["data"]["application/vnd.jupyter.widget-view+json"]
            o.get("metadata", {}).clear() if isinstance(o.get("metadata"), dict) else None

def run(path: Path, write: bool, timeout: int) -> tuple[Path, float, str | None]:
    nb = nbformat.read(path, as_version=4)
    t = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NBS)}},
                            allow_errors=False, record_timing=False)
    try: client.execute()
    except CellExecutionError as e:
        return path, time.perf_counter() - t, re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip().splitlines()[-1])[:300]
    except Exception as e:  # timeouts, dead kernels
        return path, time.perf_counter() - t, f"{type(e).__name__}: {e}"[:300]
    dt = time.perf_counter() - t
    errors = error_outputs(nb)
    if errors: return path, dt, "; ".join(errors)
    if write:
        scrub(nb)
        nbformat.write(nb, path)
    return path, dt, None

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--write", action="store_true", help="store the outputs in the notebooks")
    ap.add_argument("--check-committed", action="store_true", help="only check committed outputs for errors")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="notebooks run at once (times are comparable with 1)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a cell may take")
    ap.add_argument("--budget", type=float, default=60.0, help="report chapters slower than this (seconds)")
    args = ap.parse_args()
    paths = [p.resolve() for p in args.notebooks] or chapters()
    if args.check_committed:
        bad = {p.name: error_outputs(nbformat.read(p, as_version=4)) for p in paths}
        bad = {k: v for k, v in bad.items() if v}
        for k, v in bad.items(): print(f"{k}: committed with an error output: {v}")
        print(f"{len(paths) - len(bad)} of {len(paths)} notebooks committed without error outputs")
        sys.exit(1 if bad else 0)
    os.environ.setdefault("TQDM_DISABLE", "1")      # progress bars would differ on every run
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda p: run(p, args.write, args.timeout), paths))
    failed = 0
    for path, dt, err in results:
        mark = "FAIL" if err else ("slow" if dt > args.budget else "ok")
        print(f"{mark:4s} {dt:6.1f} s  {path.name}" + (f"\n       {err}" if err else ""))
        failed += bool(err)
    total = sum(dt for _, dt, _ in results)
    print(f"{len(results) - failed} of {len(results)} notebooks ran top to bottom in a kernel ({total:.0f} s of kernel time)")
    sys.exit(1 if failed else 0)

if __name__ == "__main__":
    main()

"""Run a chapter's code cells in one namespace, top to bottom, without Jupyter or nbdev (for the lent GPU machines,
which have neither): `python tools/run_cells.py nbs/14b_sampler_kernel.ipynb`. The exported cells are not run again:
the namespace starts with everything of the chapter's exported module (Triton's @jit needs a source file).
`#| eval: false` cells are skipped; `#| cuda` cells run (this is for machines with a GPU) unless `--skip-cuda`. Fails on the first error,
or with `--keep-going` reports each failing cell, runs the rest and exits 1 at the end. (One kind of cell can fail here
and only here: a check that the chapter's own class lacks what a later chapter patches onto the package's class,
e.g. 08's `not hasattr(ModelRunner, "call")`: this namespace holds the package's classes.)"""
import importlib, json, os, sys, time, traceback

def run(path: str, keep_going: bool = False, skip_cuda: bool = False) -> int:
    "-> the number of cells that failed (only with keep_going; otherwise the first failure raises)."
    cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
    ns = {"__name__": "__chapter__"}
    for c in cells:
        for line in "".join(c["source"]).splitlines():
            if line.startswith("#| default_exp"): ns.update(vars(importlib.import_module("nanovllm_lit." + line.split()[-1])))
    os.chdir(os.path.dirname(os.path.abspath(path)))        # chapters use paths relative to nbs/
    failed = 0
    for i, c in enumerate(cells):
        src = "".join(c["source"])
        flags = [l for l in src.splitlines() if l.startswith("#|")]
        if any(k in f for f in flags for k in ("eval: false", "default_exp", "export")): continue
        if skip_cuda and "#| cuda" in flags: print(f"  cell {i} skipped (#| cuda)"); continue
        t = time.perf_counter()
        try: exec(compile(src, f"{os.path.basename(path)}[{i}]", "exec"), ns)
        except Exception:
            if not keep_going: raise
            failed += 1; print(f"  cell {i} FAILED:\n{traceback.format_exc()}", flush=True); continue
        print(f"  cell {i} ok ({time.perf_counter() - t:.1f} s)", flush=True)
    return failed

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    keep_going, skip_cuda = "--keep-going" in sys.argv, "--skip-cuda" in sys.argv
    failed = 0
    for p in [os.path.abspath(p) for p in sys.argv[1:] if not p.startswith("--")]:   # absolute: run() changes directory
        print(p, flush=True); failed += run(p, keep_going, skip_cuda)
    sys.exit(1 if failed else 0)

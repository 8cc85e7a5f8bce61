"""Run a chapter's code cells in one namespace, top to bottom, without Jupyter or nbdev (for the lent GPU machines,
which have neither): `python tools/run_cells.py nbs/14b_sampler_kernel.ipynb`. The exported cells are not run again:
the namespace starts with everything of the chapter's exported module (Triton's @jit needs a source file).
`#| eval: false` cells are skipped; `#| cuda` cells run (this is for machines with a GPU). Fails on the first error."""
import importlib, json, os, sys, time

def run(path: str) -> None:
    cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
    ns = {"__name__": "__chapter__"}
    for c in cells:
        for line in "".join(c["source"]).splitlines():
            if line.startswith("#| default_exp"): ns.update(vars(importlib.import_module("nanovllm_lit." + line.split()[-1])))
    os.chdir(os.path.dirname(os.path.abspath(path)))        # chapters use paths relative to nbs/
    for i, c in enumerate(cells):
        src = "".join(c["source"])
        flags = [l for l in src.splitlines() if l.startswith("#|")]
        if any(k in f for f in flags for k in ("eval: false", "default_exp", "export")): continue
        t = time.perf_counter()
        exec(compile(src, f"{os.path.basename(path)}[{i}]", "exec"), ns)
        print(f"  cell {i} ok ({time.perf_counter() - t:.1f} s)", flush=True)

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for p in [os.path.abspath(p) for p in sys.argv[1:]]:   # absolute: run() changes into each chapter's folder
        print(p, flush=True); run(p)

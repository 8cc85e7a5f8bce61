"""Out-of-bounds checking for Triton's CPU interpreter (TRITON_INTERPRET=1). On a GPU a masked-in load from outside
every tensor the kernel was given reads garbage or faults; in the interpreter it reads whatever lies at that host
address and, when nothing is mapped there, kills the process ("Kernel died" in Jupyter). `check_bounds()` makes every
interpreted load and store check that each masked-in address falls inside the storage of one of the kernel's tensor
arguments, and raise `IndexError` naming the kernel otherwise.

    python tools/bounds_check.py nbs/10a_triton_kernels.ipynb ...   # run chapters' cells with the check on
"""
import contextlib, os, sys
import numpy as np


def check_bounds():
    "Patch the interpreter (idempotent). Needs TRITON_INTERPRET=1 set before triton is imported."
    from triton.runtime import interpreter as I
    if getattr(I, "_bounds_checked", False): return
    hooks = [(I.GridExecutor, "_init_args_hst"), (I.InterpreterBuilder, "create_masked_load"),
             (I.InterpreterBuilder, "create_masked_store")]
    if not all(hasattr(c, n) for c, n in hooks):          # another Triton: tests/test_bounds_check.py will say so
        import warnings; warnings.warn("tools/bounds_check.py: this Triton's interpreter lacks its hooks; no check"); return
    I._bounds_checked = True
    state = {"ranges": None, "name": "?"}

    def storages(a, out):
        if isinstance(a, (tuple, list)):
            for x in a: storages(x, out)
        elif hasattr(a, "untyped_storage"):
            s = a.untyped_storage(); out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        elif hasattr(a, "base") and hasattr(a.base, "untyped_storage"): storages(a.base, out)   # TensorDescriptor

    def check(ptrs, mask, what):
        if state["ranges"] is None: return
        p = np.asarray(ptrs, dtype=np.uint64)
        m = np.broadcast_to(np.asarray(mask, dtype=bool), p.shape)
        p = p[m]
        if p.size == 0: return
        lo, hi = state["ranges"]
        i = np.searchsorted(lo, p, side="right") - 1                   # the last range starting at or before p
        ok = (i >= 0) & (p < hi[np.maximum(i, 0)])
        if not ok.all():
            bad = p[~ok]
            raise IndexError(f"{state['name']}: {what} of {bad.size} masked-in address(es) outside every tensor "
                             f"argument, first at {int(bad[0]):#x}")

    def ranges(args):
        "Sorted, merged [start, end) byte ranges of the storages of the tensors in `args`."
        spans, merged = [], []
        storages(args, spans)
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]: merged[-1][1] = max(merged[-1][1], b)
            else: merged.append([a, b])
        return (np.array([a for a, _ in merged], dtype=np.uint64), np.array([b for _, b in merged], dtype=np.uint64))

    orig_init = I.GridExecutor._init_args_hst
    def init_args_hst(self, args_dev, kwargs):            # the host copies are what the interpreter reads and writes
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        state["ranges"] = ranges(list(args_hst) + list(kwargs_hst.values()))
        return args_hst, kwargs_hst
    I.GridExecutor._init_args_hst = init_args_hst

    orig_call = I.GridExecutor.__call__
    def call(self, *args, **kwargs):
        prev = dict(state)
        state["name"] = getattr(self.fn, "__name__", "?")
        try: return orig_call(self, *args, **kwargs)
        finally: state.update(prev)
    I.GridExecutor.__call__ = call

    B = I.InterpreterBuilder
    orig_load, orig_store = B.create_masked_load, B.create_masked_store
    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs.data, mask.data, "load"); return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)
    def store(self, ptrs, value, mask, cache_policy):
        check(ptrs.data, mask.data, "store"); return orig_store(self, ptrs, value, mask, cache_policy)
    B.create_masked_load, B.create_masked_store = load, store
    if hasattr(B, "create_atomic_rmw"):
        orig_rmw = B.create_atomic_rmw
        def rmw(self, rmwOp, ptr, val, mask, sem, scope):
            check(ptr.data, mask.data, "atomic"); return orig_rmw(self, rmwOp, ptr, val, mask, sem, scope)
        B.create_atomic_rmw = rmw


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    check_bounds()
    import torch
    from tools import run_cells
    failed = 0
    for p in [os.path.abspath(p) for p in sys.argv[1:]]:
        print(p, flush=True); failed += run_cells.run(p, keep_going=True, skip_cuda=not torch.cuda.is_available())
    sys.exit(1 if failed else 0)

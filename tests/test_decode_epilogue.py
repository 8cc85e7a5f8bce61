"""Chapter 12c's decode kernel with the epilogue inside, compiled for sm_90 on the CPU with Triton's own ptxas (no GPU
needed): registers without spills at the configured warps, and under PDL the cached keys and values loaded before
griddepcontrol.wait, every store after it. (Its results are checked in the chapter, against chapters 12b + 10a.)"""
import os
import pytest

_COMPILE = r'''
import os, subprocess, tempfile, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanovllm_lit.layers import decode_epilogue as de
fn = de._decode_epilogue_kernel
types = dict(qkv_ptr="*bf16", q_w_ptr="*bf16", k_w_ptr="*bf16", cs_ptr="*fp32", positions_ptr="*i32", slot_ptr="*i32",
             k_cache_ptr="*bf16", v_cache_ptr="*bf16", block_tables_ptr="*i32", context_lens_ptr="*i32",
             out_ptr="*bf16", part_o_ptr="*fp32", part_lse_ptr="*fp32", eps="fp32", qk_scale="fp32")
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
cfg = de.DECODE_EPILOGUE_CONFIG
for splits in (1, 32):                       # Qwen3-0.6B's heads, block size 256: 256 sequences, and one
    const = dict(H=16, KVH=8, GROUP=2, GROUP_P=16, D=128, D_P=128, HALF=64, HAS_NORM=True, BLOCK_SIZE=256,
                 BLOCK_N=cfg["block_n"], NUM_SPLITS=splits, PRECISION="tf32", PDL=PDL)
    sig = {n: types.get(n, "i32") for n in fn.arg_names}
    sig.update({k: "constexpr" for k in const})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(kv.split(":") for kv in next(l for l in usage.splitlines() if "REG:" in l).split() if ":" in kv)
    print("USAGE", splits, fields["REG"], fields["STACK"], fields["LOCAL"])
    lines = [l.strip() for l in k.asm["ptx"].splitlines() if not l.strip().startswith("//")]
    at = lambda word: [i for i, l in enumerate(lines) if word in l]
    wait = at("griddepcontrol.wait")
    print("PTX", splits, len(wait), sum(i < (wait or [0])[0] for i in at("ld.global")), min(at("st.global")) > (wait or [-1])[0])
'''


def _run(triton_for_hopper, pdl):
    out = triton_for_hopper(f"PDL = {pdl}" + _COMPILE)
    usage = [l.split()[1:] for l in out.splitlines() if l.startswith("USAGE")]
    ptx = [l.split()[1:] for l in out.splitlines() if l.startswith("PTX")]
    return usage, ptx


def test_compiles_for_sm90_without_spilling_and_reads_the_cache_before_the_wait(triton_for_hopper):
    "No local memory and no stack at the configured warps (at 4 warps it spilled 80 bytes a thread); with PDL one"
    " wait, loads before it (the context length, this step's rows, the first cached tile), and every store after it."
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this Triton ships no cuobjdump")
    usage, ptx = _run(triton_for_hopper, 1)
    assert len(usage) == 2 and all(int(reg) <= 255 and stack == "0" and local == "0" for _, reg, stack, local in usage), usage
    for splits, waits, loads_before, stores_after in ptx:
        assert waits == "1" and int(loads_before) >= 8 and stores_after == "True", ptx
    _, plain = _run(triton_for_hopper, 0)
    assert all(waits == "0" for _, waits, _, _ in plain)

"""GPU checks of the engine (standalone: needs torch, triton, transformers; no pytest, no nbdev).

    python tests/gpu_engine_check.py            # one GPU
    python tests/gpu_engine_check.py --tp 2     # also TP=2 (NCCL) identical to TP=1

Checks, on tiny random checkpoints: greedy tokens equal to HF transformers (fp32); CUDA graphs vs eager
identical (fp32 and bf16); triton backend vs torch backend identical; a decode with the full-width block table
(sequence at max_model_len, nano-vllm #190); prefix-cache hits and preemption under CUDA graphs; KV cache sized
from free memory; TP=2 identical to TP=1 (graphs and eager). Prints one line per check and a summary.
"""
import argparse, datetime, os, sys, tempfile, time, traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout: no install needed
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch
from transformers import AutoModelForCausalLM

from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.testing import make_tiny_qwen3

RESULTS = []
ONLY = []  # --only-tp: run just the checks whose names start with one of these




def check(name):
    "Decorator: run a check, record PASS/FAIL with its time and message."
    def wrap(f):
        def run(*a, **k):
            if ONLY and not name.startswith(tuple(ONLY)): return
            t = time.perf_counter()
            try:
                msg = f(*a, **k) or ""
                RESULTS.append((name, True, time.perf_counter() - t, msg))
            except Exception as e:
                RESULTS.append((name, False, time.perf_counter() - t, f"{type(e).__name__}: {e}"))
                traceback.print_exc()
            ok, dt, msg = RESULTS[-1][1:]
            print(f"[{'PASS' if ok else 'FAIL'}] {name} ({dt:.1f} s) {msg}", flush=True)
        return run
    return wrap


def hf_greedy(path, prompts, max_tokens):
    "HF transformers greedy (fp32, CUDA), one prompt at a time, EOS ignored (plain argmax loop)."
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            for _ in range(max_tokens): ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            outs.append(ids[0, len(p):].tolist())
    del hf
    torch.cuda.empty_cache()
    return outs


def generate(path, prompts, sp, **kw):
    "Token ids from a fresh engine; returns (tokens, info)."
    kw = {"max_model_len": 512, "max_num_batched_tokens": 2048, "max_num_seqs": 16, "kvcache_block_size": 16,
          "gpu_memory_utilization": 0.5, **kw}
    with LLMEngine(path, device="cuda", **kw) as llm:
        preempted, original = [], llm.scheduler.preempt
        def preempt(seq):
            preempted.append(seq.seq_id); original(seq)
        llm.scheduler.preempt = preempt
        cached, schedule = [], llm.scheduler.schedule
        def sched():
            seqs, is_prefill = schedule()
            if is_prefill: cached.extend(s.num_cached_tokens for s in seqs)
            return seqs, is_prefill
        llm.scheduler.schedule = sched
        out = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
        info = dict(graphs=bool(llm.model_runner.graphs), preempted=len(preempted), cached=sum(cached),
                    blocks=llm.config.num_kvcache_blocks, backend=llm.config.attention_backend)
    torch.cuda.empty_cache()
    return out, info


def prompts_with_prefixes():
    prefix = [(5 * i + 3) % 250 + 3 for i in range(40)]
    return [prefix + [11, 12, 13], prefix + [20], prefix[:32], [7, 8, 9], prefix[:33] + [99] * 20,
            [(11 * i) % 250 + 3 for i in range(100)], [42] * 5, list(range(3, 203))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1, help="2: also check TP=2 against TP=1")
    ap.add_argument("--only-tp", action="store_true", help="with --tp: only the TP=1 baseline and the TP checks")
    ap.add_argument("--only", nargs="*", default=[], help="run only the checks whose names start with these")
    args = ap.parse_args()
    ONLY.extend(args.only)
    if args.only_tp: ONLY.extend(["fp32 triton + CUDA graphs == HF", "TP="])
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp()
    path = make_tiny_qwen3(f"{tmp}/tiny")
    path2 = make_tiny_qwen3(f"{tmp}/tied", seed=1, tie_word_embeddings=True, num_key_value_heads=1, head_dim=32)
    prompts = prompts_with_prefixes()
    n = 24
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    ref = {p: hf_greedy(p, prompts, n) for p in (path, path2)}
    fp32 = dict(dtype="float32")
    base = {}

    @check("fp32 triton + CUDA graphs == HF greedy (2 checkpoints)")
    def c1():
        for p in (path, path2):
            base[p], info = generate(p, prompts, sp, **fp32)
            assert info["graphs"] and info["backend"] == "triton", info
            assert base[p] == ref[p], f"{p}: engine {base[p]} != HF {ref[p]}"
        return f"prefix-cached tokens {info['cached']}"
    c1()

    @check("fp32 eager == CUDA graphs")
    def c2():
        for p in (path, path2):
            out, info = generate(p, prompts, sp, enforce_eager=True, **fp32)
            assert not info["graphs"] and out == base[p]
    c2()

    @check("fp32 torch backend == triton backend")
    def c3():
        for p in (path, path2):
            out, info = generate(p, prompts, sp, attention_backend="torch", **fp32)
            assert info["backend"] == "torch" and out == base[p]
    c3()

    @check("bf16 CUDA graphs == bf16 eager (batch 8, no padding)")
    def c4():
        g, gi = generate(path, prompts, sp, dtype="bfloat16")
        e, ei = generate(path, prompts, sp, dtype="bfloat16", enforce_eager=True)
        assert gi["graphs"] and not ei["graphs"]
        assert g == e, f"graphs {g} != eager {e}"
        agree = sum(a == b for x, y in zip(g, ref[path]) for a, b in zip(x, y)) / sum(map(len, g))
        return f"bf16 vs fp32-HF token agreement {agree:.0%} (informative)"
    c4()

    @check("full-width block table at max_model_len (nano-vllm #190), graphs == eager == HF")
    def c5():
        long = [[(3 * i + 7) % 250 + 3 for i in range(250)], [5, 6, 7], [9] * 256, [8] * 255]
        spl = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        kw = dict(max_model_len=256, max_num_batched_tokens=1024, **fp32)
        g, gi = generate(path, long, spl, **kw)
        e, _ = generate(path, long, spl, enforce_eager=True, **kw)
        assert gi["graphs"] and g == e, (g, e)
        assert [len(x) for x in g] == [6, 20, 1, 1], [len(x) for x in g]   # 250 + 6 = 256 = max_model_len
        assert g[:2] == [r[:len(x)] for r, x in zip(hf_greedy(path, long[:2], 20), g[:2])]
        # and with the default block size (256): one page per sequence
        g256, _ = generate(path, long, spl, **{**kw, "kvcache_block_size": 256})
        assert g256 == g
    c5()

    @check("preemption under CUDA graphs (tiny pool) == HF")
    def c6():
        out, info = generate(path, prompts, sp, num_kvcache_blocks=20, **fp32)
        assert info["preempted"] > 0, info
        assert out == ref[path]
        return f"{info['preempted']} preemptions"
    c6()

    @check("overlap scheduling (the default on CUDA) == the synchronous loop (fp32 + bf16 graphs, preemption, EOS)")
    def c_overlap():
        for kw in (dict(num_kvcache_blocks=20, **fp32), dict(dtype="bfloat16")):
            on, info = generate(path, prompts, sp, overlap_scheduling=True, **kw)
            off, _ = generate(path, prompts, sp, overlap_scheduling=False, **kw)
            assert info["graphs"] and on == off, (kw, on, off)
        eos = base[path][7][10]              # a token the longest request samples mid-way: several stop early
        spe = SamplingParams(temperature=0, max_tokens=n)
        on, _ = generate(path, prompts, spe, overlap_scheduling=True, eos_token_ids={eos}, **fp32)
        off, _ = generate(path, prompts, spe, overlap_scheduling=False, eos_token_ids={eos}, **fp32)
        assert on == off and sum(len(x) < n for x in on) >= 1, (on, off)
        return f"{sum(len(x) < n for x in on)} requests ended on EOS"
    c_overlap()

    @check("KV cache sized from free GPU memory")
    def c7():
        free, total = torch.cuda.mem_get_info()
        out, info = generate(path, prompts[:2], sp, dtype="bfloat16", kvcache_block_size=256, gpu_memory_utilization=0.3)
        assert info["blocks"] > 100, info
        return f"{info['blocks']} blocks of 256 tokens at utilization 0.3 ({free / 2**30:.0f} of {total / 2**30:.0f} GiB free)"
    c7()

    if args.tp > 1:
        @check(f"TP={args.tp} == TP=1 (fp32; CUDA graphs with preemption, eager)")
        def c8():
            out, info = generate(path, prompts, sp, tensor_parallel_size=args.tp, num_kvcache_blocks=20, **fp32)
            assert info["graphs"] and info["preempted"] > 0 and out == base[path], (info, out, base[path])
            out, info = generate(path2, prompts, sp, tensor_parallel_size=args.tp, **fp32)
            assert info["graphs"] and out == base[path2]
            out, info = generate(path, prompts, sp, tensor_parallel_size=args.tp, enforce_eager=True, **fp32)
            assert not info["graphs"] and out == base[path]
        c8()

        @check(f"TP={args.tp} bf16 CUDA graphs == TP={args.tp} bf16 eager")
        def c9():
            g, _ = generate(path, prompts, sp, tensor_parallel_size=args.tp, dtype="bfloat16")
            e, _ = generate(path, prompts, sp, tensor_parallel_size=args.tp, dtype="bfloat16", enforce_eager=True)
            assert g == e
        c9()

    import triton, transformers
    print("\n=== summary ===")
    print(f"{datetime.date.today()} · {torch.cuda.get_device_name()} × {torch.cuda.device_count()} · torch {torch.__version__} · "
          f"triton {triton.__version__} · transformers {transformers.__version__}")
    for name, ok, dt, msg in RESULTS: print(f"  {'PASS' if ok else 'FAIL'}  {name}  ({dt:.1f} s) {msg}")
    failed = sum(not ok for _, ok, _, _ in RESULTS)
    print(f"{len(RESULTS) - failed}/{len(RESULTS)} passed in {time.perf_counter() - t0:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

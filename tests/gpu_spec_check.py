"""Speculative decoding on one GPU (chapter 08c, issue 13): exactness and speed-up (standalone: torch, triton,
transformers; no pytest, no nbdev; the checkout on PYTHONPATH).

    PYTHONPATH=. python tests/gpu_spec_check.py            # about 2-3 minutes on an H200
    PYTHONPATH=. python tests/gpu_spec_check.py --eps 0.1,0.03,0.01 --draft-layers 4 --k 4
    PYTHONPATH=. python tests/gpu_spec_check.py --smoke      # a tiny model on the CPU: checks the script itself

Target: the Qwen3-0.6B architecture (`assets/qwen3-0.6b`, config only) with random bf16 weights
(`load_format="dummy"`), CUDA graphs on, triton attention backend, synchronous loop (speculation forces it).

1. Greedy tokens with speculation == without, for both methods, at batch 1 and 16 (prints the first mismatch).
2. Speed-up over plain decoding (same engine settings, same target weights) and acceptance rates:
   - n-gram (k drafts, prompt lookup 4..1) on a *repetitive* workload: prompts that repeat a random 48-token
     segment four times;
   - draft model on a *draft* workload (random 128-token prompts).

The draft model. With random weights an independent draft agrees with the target on nothing (acceptance ~0), and
even the target's own first layers are a poor predictor, because every random layer moves the residual stream a
lot. So the draft is a **truncated copy of the target that shares its weights** (its first `--draft-layers`
decoder layers, embedding, final norm and tied LM head, copied in after loading), and the target's *later* layers
are damped: their output projections (`o_proj`, `down_proj`) are scaled by `--eps`, applied identically to every
engine in this script (plain ones included), so the target is "its first layers plus a small correction", the
situation of a trained target and a good small draft. `--eps` is then a dial for the acceptance rate: the draft
rows are run for each value (the same damping is applied to the plain engine, whose tokens they are compared
with); the script reports the acceptance it measured, and the draft's relative cost c follows from its size
(its layers plus the LM head, which it shares in size with the target).
"""
import argparse, datetime, os, shutil, sys, tempfile, time, traceback, json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch

from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.sampling_params import SamplingParams

TARGET = str(ROOT / "assets" / "qwen3-0.6b")


def draft_dir(n: int) -> str:
    "A config-only checkpoint: the target's architecture with `n` decoder layers (weights are copied in later)."
    d = os.path.join(tempfile.mkdtemp(prefix="spec_draft_"), "draft")
    os.makedirs(d)
    cfg = json.load(open(os.path.join(TARGET, "config.json")))
    cfg["num_hidden_layers"] = n
    if "layer_types" in cfg: cfg["layer_types"] = cfg["layer_types"][:n]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    shutil.copy(os.path.join(TARGET, "generation_config.json"), d)
    return d


@torch.no_grad()
def shape_weights(llm, n: int, eps: float, copy_draft: bool = True) -> None:
    "Damp the target's layers >= n (o_proj, down_proj x eps); copy its first n layers, embedding, norm into the draft."
    target = llm.model_runner.model
    for layer in target.model.layers[n:]:
        layer.self_attn.o_proj.weight.mul_(eps)
        layer.mlp.down_proj.weight.mul_(eps)
    drafter = getattr(llm.model_runner, "drafter", None)
    if drafter is None or not copy_draft: return
    draft = drafter.runner.model
    src = dict(target.named_parameters())
    for name, p in draft.named_parameters():   # layers 0..n-1, embed_tokens, norm (the LM head is tied)
        p.copy_(src[name])


def engine(spec, args, n_layers):
    kw = dict(max_model_len=1024, max_num_batched_tokens=4096, max_num_seqs=128, gpu_memory_utilization=0.6,
              attention_backend="triton", dtype=args.dtype, kvcache_block_size=256)
    if args.smoke: kw = dict(device="cpu", max_model_len=256, max_num_batched_tokens=512, max_num_seqs=32)
    llm = LLMEngine(TARGET, load_format="dummy", speculative_config=spec, **kw)
    assert args.smoke or llm.model_runner.graphs, "CUDA graphs expected"
    shape_weights(llm, n_layers, args.eps[0])
    return llm


def timed(llm, prompts, sp):
    "Tokens and seconds of one generate (after a short warm-up); the speculative stats of that run."
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)   # warm-up
    before = llm.speculative_stats() if llm.config.speculative_config else None
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync(); t = time.perf_counter()
    out = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    sync(); dt = time.perf_counter() - t
    stats = None
    if before is not None:
        after = llm.speculative_stats()
        stats = {k: after[k] - before[k] for k in ("proposed", "accepted", "verify_steps", "sequence_steps")}
        stats["per_position"] = [(a - a0) / max(1, p - p0) for a, a0, p, p0 in zip(
            after["per_position"]["accepted"], before["per_position"]["accepted"],
            after["per_position"]["proposed"], before["per_position"]["proposed"])]
    return out, dt, stats


def measure(llm, prompts, sp, reference) -> tuple:
    "(plain tok/s, spec tok/s, speed-up, acceptance, tokens per sequence step, per position, greedy identical?)"
    out, dt, st = timed(llm, prompts, sp)
    ref, dt0, _ = reference
    bad = first_mismatch(ref, out)
    toks = sum(len(o) for o in out)
    return (toks / dt0, toks / dt, dt0 / dt, st["accepted"] / max(1, st["proposed"]),
            (st["accepted"] + st["sequence_steps"]) / max(1, st["sequence_steps"]),
            " ".join(f"{r:.2f}" for r in st["per_position"]), "yes" if bad is None else "NO: " + bad)


def first_mismatch(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            j = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            return f"request {i}: first differing token at position {j} of {len(x)}"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--eps", default="0.1,0.03,0.01", help="damping factors of the target's later layers (draft rows)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script itself")
    ap.add_argument("--dtype", default="bfloat16", help="float32: tells GEMM rounding (bf16) apart from a real mismatch")
    args = ap.parse_args()
    args.eps = [float(e) for e in args.eps.split(",")]
    global TARGET
    if args.smoke:   # a config-only tiny checkpoint: the same code path, in seconds
        from nanovllm_lit.utils.testing import make_tiny_qwen3
        TARGET = make_tiny_qwen3(tempfile.mkdtemp() + "/tiny", num_hidden_layers=6, vocab_size=512, tie_word_embeddings=True)
        args.max_tokens, args.draft_layers = min(args.max_tokens, 24), min(args.draft_layers, 2)
    vocab = json.load(open(os.path.join(TARGET, "config.json")))["vocab_size"]
    g = torch.Generator().manual_seed(0)
    segs = [torch.randint(0, vocab, (48,), generator=g).tolist() for _ in range(16)]
    workloads = {"repetitive": [s * 4 for s in segs],
                 "draft": [torch.randint(0, vocab, (128,), generator=g).tolist() for _ in range(16)]}
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    specs = {"ngram": ({"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
                        "prompt_lookup_min": 1}, "repetitive"),
             "draft_model": ({"method": "draft_model", "model": draft_dir(args.draft_layers),
                              "num_speculative_tokens": args.k}, "draft")}
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU smoke run"
    print(f"{card} · {datetime.date.today()} · torch {torch.__version__} · {'tiny' if args.smoke else 'Qwen3-0.6B'} {args.dtype} "
          f"random weights · k={args.k} · draft = first {args.draft_layers} layers; eps = damping of the target's later layers",
          flush=True)
    t0 = time.perf_counter()
    plain = {}
    llm = engine(None, args, args.draft_layers)
    for e, eps in enumerate(args.eps):
        if e: shape_weights(llm, args.draft_layers, eps / args.eps[e - 1], copy_draft=False)
        for wl, prompts in workloads.items():
            if wl == "repetitive" and e: continue           # n-gram runs at the first damping only
            for bs in (1, 16): plain[wl, bs, eps] = timed(llm, prompts[:bs], sp)
    llm.exit()
    rows, failures = [], 0
    for method, (spec, wl) in specs.items():
        try:
            llm = engine(spec, args, args.draft_layers)
            blocks = llm.config.num_kvcache_blocks
            for e, eps in enumerate(args.eps if method == "draft_model" else args.eps[:1]):
                if e: shape_weights(llm, args.draft_layers, eps / args.eps[e - 1], copy_draft=False)
                for bs in (1, 16):
                    row = measure(llm, workloads[wl][:bs], sp, plain[wl, bs, eps])
                    failures += row[-1] != "yes"
                    rows.append((method, f"{wl} (eps {eps:g})", bs) + row)
                    print(f"  {method} eps {eps:g} batch {bs}: done ({blocks} KV blocks)", flush=True)
            llm.exit()
        except Exception as e:
            failures += 1
            traceback.print_exc()
            rows.append((method, wl, "-", 0, 0, 0, 0, 0, "", f"FAILED: {type(e).__name__}: {e}"))
        if torch.cuda.is_available(): torch.cuda.empty_cache()
    head = ("method", "workload", "batch", "plain tok/s", "spec tok/s", "speed-up", "acceptance", "tok/verify",
            "acceptance per position", "greedy identical")
    # tok/verify: tokens a sequence gains per verify step (accepted drafts + the target's own), on average
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r[0], r[1], str(r[2]), f"{r[3]:,.0f}", f"{r[4]:,.0f}", f"{r[5]:.2f}x", f"{r[6]:.2f}", f"{r[7]:.2f}",
                 r[8], r[9]]
        print("| " + " | ".join(cells) + " |")
    print(f"\n{len(rows)} rows, {failures} failure(s), {time.perf_counter() - t0:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

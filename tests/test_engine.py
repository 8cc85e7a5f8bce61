"""End-to-end engine tests on CPU: greedy output equals HF transformers, prefix-cache hits, preemption,
tensor parallelism with gloo (TP=2 equals TP=1), two engines at once, worker failures, bad input."""
import json, os, subprocess, sys, textwrap, time
import pytest
import torch
from transformers import AutoModelForCausalLM

from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.engine.tp_worker import WorkerError
from nanovllm_lit.llm import LLM
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.testing import make_tiny_qwen3

torch.set_num_threads(1)

SMALL = dict(max_model_len=256, max_num_batched_tokens=512, max_num_seqs=8, device="cpu")  # CPU: 16-token blocks, fp32 (GPU: gpu_engine_check.py)
GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def ckpt_tied(tmp_path_factory):
    # other shapes: tied embeddings, GQA ratio 4, head_dim 32, 3 layers
    return make_tiny_qwen3(tmp_path_factory.mktemp("tied") / "ckpt", seed=1, tie_word_embeddings=True,
                           num_key_value_heads=1, head_dim=32, num_hidden_layers=3)


def hf_greedy(path, prompts, max_tokens, ignore_eos=False):
    "HF transformers reference: generate(do_sample=False), one prompt at a time (no padding)."
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            if ignore_eos:  # plain argmax loop: generate() has no "run past EOS without masking it" switch
                for _ in range(max_tokens): ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            else: ids = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False)
            outs.append(ids[0, len(p):].tolist())
    return outs


def shared_prefix_prompts():
    prefix = [(5 * i + 3) % 250 + 3 for i in range(40)]   # 2 full blocks of 16 + 8 tokens
    return [prefix + [11, 12, 13], prefix + [20], prefix[:32], [7, 8, 9], prefix[:33] + [99] * 20]


def count_preemptions(engine):
    "Instrument the scheduler: returns a list that fills with preempted sequence ids."
    seen, original = [], engine.scheduler.preempt
    def preempt(seq):
        seen.append(seq.seq_id)
        original(seq)
    engine.scheduler.preempt = preempt
    return seen


def run_manually(engine, prompts, sp):
    "add_request + step() until done -> (outputs in input order, {seq_id: num_cached_tokens at first prefill})."
    cached, original = {}, engine.scheduler.schedule
    def schedule():
        seqs, is_prefill = original()
        if is_prefill:
            for s in seqs: cached.setdefault(s.seq_id, s.num_cached_tokens)  # NOTE: deallocate resets it to 0
        return seqs, is_prefill
    engine.scheduler.schedule = schedule
    try:
        ids = [engine.add_request(p, sp) for p in prompts]
        done = {}
        while not engine.is_finished():
            outs, _ = engine.step()
            done.update(outs)
    finally: del engine.scheduler.schedule
    return [done[i] for i in ids], [cached[i] for i in ids]


# ---- single process -------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["ckpt", "ckpt_tied"])
def test_greedy_equals_hf_with_shared_prefixes(which, request):
    path = request.getfixturevalue(which)
    prompts = shared_prefix_prompts()
    with LLMEngine(path, **SMALL, num_kvcache_blocks=128) as llm:
        got = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o["token_ids"] for o in got] == hf_greedy(path, prompts, 16)
        # same prompts again, stepping by hand: their prefixes are now in the cache
        again, cached = run_manually(llm, prompts, GREEDY)
        assert again == [o["token_ids"] for o in got]
        assert cached[:2] == [32, 32]       # 2 full shared blocks each
        assert cached[2] == 16              # all 32 tokens would hit: the last block is recomputed for its logits
        assert cached[3] == 0 and cached[4] == 48   # its own 3rd block was cached by the first run


def test_prefix_hits_within_one_batch(ckpt):
    "The 2nd sequence hits the 1st's blocks in the same prefill step (their KV is written by that same step)."
    prefix = list(range(3, 35))  # 2 blocks
    prompts = [prefix + [40, 41], prefix + [50]]
    with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=64) as llm:
        got, cached = run_manually(llm, prompts, GREEDY)
    assert cached == [0, 32]
    assert got == hf_greedy(ckpt, prompts, 16)


def test_preemption_keeps_greedy_output(ckpt):
    prompts = [[(7 * i + j) % 250 + 3 for j in range(30)] for i in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=7) as llm:
        preempted = count_preemptions(llm)
        got = llm.generate(prompts, sp, use_tqdm=False)
        assert preempted, "the pool of 7 blocks should force preemption"
        assert llm.scheduler.block_manager.num_free_blocks == 7  # everything returned
    assert [o["token_ids"] for o in got] == hf_greedy(ckpt, prompts, 40, ignore_eos=True)


def test_eos_ids_and_lengths(ckpt):
    with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=64) as llm:
        assert llm.config.eos_token_ids == {1, 2}   # generation_config.json lists two
        prompts = [[i % 200 + 3 for i in range(k, k + 9)] for k in range(12)]
        sps = [SamplingParams(temperature=0, max_tokens=m) for m in (30, 3, 17, 1, 8, 25, 2, 12, 30, 5, 9, 20)]
        got = llm.generate(prompts, sps, use_tqdm=False)
        ref = [hf_greedy(ckpt, [p], sp.max_tokens)[0] for p, sp in zip(prompts, sps)]
        assert [o["token_ids"] for o in got] == ref
        # finish reasons: stop at EOS (kept as the last token), otherwise the length
        for o, sp in zip(got, sps):
            assert len(o["token_ids"]) == sp.max_tokens or o["token_ids"][-1] in (1, 2)
        # a prompt of max_model_len tokens gets one token, and so does one a token short (it reaches the limit)
        long = llm.generate([[5] * 256, [6] * 255], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                            use_tqdm=False)
        assert [len(o["token_ids"]) for o in long] == [1, 1]


def test_fit_rule_is_the_schedulers_at_the_boundary(ckpt):
    "60-token prompt, max_tokens 10, max_model_len 65: stops at 65 tokens, the 65th never fed -> 64 = 4 blocks of 16."
    with LLMEngine(ckpt, max_model_len=65, max_num_batched_tokens=512, max_num_seqs=8, kvcache_block_size=16,
                   num_kvcache_blocks=4) as llm:
        prompt = [(3 * j) % 250 + 3 for j in range(60)]
        sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        out = llm.generate([prompt], sp, use_tqdm=False)[0]["token_ids"]   # the engine accepts what the scheduler can run
        assert out == hf_greedy(ckpt, [prompt], 5, ignore_eos=True)[0]
        assert llm.scheduler.block_manager.num_free_blocks == 4
        # a prompt of exactly max_model_len tokens is fed whole: 65 tokens need 5 blocks
        with pytest.raises(ValueError, match="needs 5 KV-cache blocks"): llm.add_request(prompt + [3] * 5, sp)
        with pytest.raises(ValueError, match="max_model_len"): llm.add_request(prompt + [3] * 6, sp)
        assert llm.is_finished()


def test_bad_input_errors_and_engine_keeps_serving(ckpt, tmp_path):
    with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=12) as llm:
        queued = llm.add_request([3, 4, 5], GREEDY)   # a good request already waiting
        cases = [
            (lambda: llm.add_request([], GREEDY), ValueError, "the prompt is empty"),
            (lambda: llm.add_request([5] * 257, GREEDY), ValueError, "257 tokens, more than max_model_len = 256"),
            (lambda: llm.add_request([5, 256], GREEDY), ValueError, "ints in [0, 256)"),
            (lambda: llm.add_request([5, -1], GREEDY), ValueError, "ints in [0, 256)"),
            (lambda: llm.add_request("text", GREEDY), ValueError, "no tokenizer"),
            (lambda: llm.add_request([5] * 200, SamplingParams(max_tokens=100)), ValueError, "the pool has only 12"),
            (lambda: llm.add_request([5], {"temperature": 0}), TypeError, "SamplingParams"),
            (lambda: llm.generate([[1, 2], [3, 4, 5], []], GREEDY), ValueError, "prompt 2: the prompt is empty"),
            (lambda: llm.generate([[1]], [GREEDY, GREEDY]), ValueError, "2 sampling params"),
            (lambda: SamplingParams(temperature=float("nan")), ValueError, "temperature"),
            (lambda: SamplingParams(max_tokens=0), ValueError, "max_tokens"),
            (lambda: LLMEngine(ckpt, block_size=16), TypeError, "unknown option(s) ['block_size']"),
            (lambda: LLMEngine(str(tmp_path / "missing")), FileNotFoundError, "missing"),
            (lambda: LLMEngine(ckpt, kvcache_block_size=24), ValueError, "kvcache_block_size"),
        ]
        for f, exc, msg in cases:
            with pytest.raises(exc) as e: f()
            assert msg in str(e.value), (msg, str(e.value))
        assert len(llm.scheduler.waiting) == 1                # nothing half-queued by the failed batch
        outs = llm.generate([[9, 10, 11]], GREEDY, use_tqdm=False)
        assert outs[0]["token_ids"] == hf_greedy(ckpt, [[9, 10, 11]], 16)[0]
        assert llm.is_finished()
        # the request queued before the errors was served by generate's loop too, and its output was kept
        assert llm.outputs[queued] == hf_greedy(ckpt, [[3, 4, 5]], 16)[0]
    empty = tmp_path / "no_config"; empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"): LLM(str(empty))


def test_interrupted_generate_leaves_engine_clean(ckpt):
    prompts = shared_prefix_prompts()
    with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=64) as llm:
        ref = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        real_step, n = llm.step, []
        def step():
            n.append(1)
            if len(n) == 4: raise KeyboardInterrupt
            return real_step()
        llm.step = step
        with pytest.raises(KeyboardInterrupt): llm.generate(prompts, GREEDY, use_tqdm=False)
        del llm.step
        bm = llm.scheduler.block_manager
        assert llm.is_finished() and bm.num_free_blocks == len(bm.blocks) and not bm.used_block_ids
        assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref


def test_llm_is_the_engine_and_text_with_tokenizer():
    assets = os.path.join(os.path.dirname(__file__), "..", "assets", "tiny-qwen3")
    if not os.path.isfile(os.path.join(assets, "model.safetensors")): pytest.skip("embedded model not built")
    with LLM(assets, max_model_len=128, num_kvcache_blocks=32) as llm:
        assert isinstance(llm, LLMEngine) and llm.tokenizer is not None
        assert llm.tokenizer.eos_token_id in llm.config.eos_token_ids
        outs = llm.generate(["Hello", "The"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert all(isinstance(o["text"], str) and o["token_ids"] for o in outs)
        assert outs[0]["text"] == llm.tokenizer.decode(outs[0]["token_ids"])


# ---- tensor parallelism (gloo on CPU) -------------------------------------------------------------------
TP_SP = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def tp_workload():
    prompts = shared_prefix_prompts() + [[(11 * i + j) % 250 + 3 for j in range(30)] for i in range(3)]
    return prompts


def test_tp2_equals_tp1_with_prefix_hits_and_preemption(ckpt):
    prompts = tp_workload()
    kw = dict(SMALL, num_kvcache_blocks=14)
    with LLMEngine(ckpt, **kw) as one:
        p1 = count_preemptions(one)
        ref = one.generate(prompts, TP_SP, use_tqdm=False)
    t0 = time.perf_counter()
    with LLMEngine(ckpt, tensor_parallel_size=2, **kw) as two:
        p2 = count_preemptions(two)
        got = two.generate(prompts, TP_SP, use_tqdm=False)
        again, cached = run_manually(two, prompts[:3], TP_SP)   # prefix hits under TP
        procs = [p.process for p in two.model_runner.peers]
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in ref]
    assert again == [o["token_ids"] for o in ref[:3]]
    assert cached == [32, 32, 16]
    assert p1 and p2, "the small pool should force preemption (re-prefill of a sequence with completion tokens)"
    assert all(not p.is_alive() for p in procs), "workers stopped on exit"
    assert time.perf_counter() - t0 < 60


def test_compile_in_turn_under_tp_then_serves(ckpt):
    # 08a: rank 0 runs the warm-up prefills alone with its collectives off while rank 1 waits at the barrier.
    # (On a GPU warmup_model does this at start-up; called here on CPU ranks joined by gloo.) No deadlock, and
    # afterwards both ranks all-reduce again: TP=2 still equals TP=1, and nothing was written to the KV cache.
    prompts = tp_workload()[:4]
    with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=64) as one:
        ref = [o["token_ids"] for o in one.generate(prompts, TP_SP, use_tqdm=False)]
    with LLMEngine(ckpt, tensor_parallel_size=2, **SMALL, num_kvcache_blocks=64) as two:
        caches = [m.k_cache.clone() for m in two.model_runner.model.modules() if hasattr(m, "k_cache")]
        t0 = time.perf_counter()
        two.model_runner.call("_compile_in_turn")
        assert time.perf_counter() - t0 < 60
        after = [m.k_cache for m in two.model_runner.model.modules() if hasattr(m, "k_cache")]
        assert caches and all(torch.equal(a, b) for a, b in zip(caches, after)), "warm-up prefills store no KV"
        assert all(m.collectives for m in two.model_runner.model.modules() if hasattr(m, "collectives"))
        got = [o["token_ids"] for o in two.generate(prompts, TP_SP, use_tqdm=False)]
    assert got == ref


_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from nanovllm_lit.engine.llm_engine import LLMEngine
    from nanovllm_lit.sampling_params import SamplingParams
    if __name__ == "__main__":
        path, prompts = sys.argv[1], json.loads(sys.argv[2])
        with LLMEngine(path, tensor_parallel_size=2, max_model_len=256, max_num_batched_tokens=512,
                       max_num_seqs=8, num_kvcache_blocks=64) as llm:
            out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
            print(json.dumps({"port": llm.model_runner.setup.port, "shm": llm.model_runner.setup.shm_name,
                              "tokens": [o["token_ids"] for o in out]}))
""")


def test_two_engines_at_once_and_worker_failures(ckpt, tmp_path):
    prompts = tp_workload()[:4]
    a = LLMEngine(ckpt, tensor_parallel_size=2, **SMALL, num_kvcache_blocks=64)
    try:
        # (1) a second TP engine on the same host, in another process, while `a` holds its port and shm
        script = tmp_path / "child.py"; script.write_text(_CHILD)
        res = subprocess.run([sys.executable, str(script), ckpt, json.dumps(prompts)], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        child = json.loads(res.stdout.strip().splitlines()[-1])
        assert child["port"] != a.model_runner.setup.port and child["shm"] != a.model_runner.setup.shm_name
        # (2) a TP=1 engine in the same process as `a` (whose process group must not leak into it)
        with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=64) as b:
            ref = [o["token_ids"] for o in b.generate(prompts, TP_SP, use_tqdm=False)]
        assert [o["token_ids"] for o in a.generate(prompts, TP_SP, use_tqdm=False)] == ref == child["tokens"]
        # (3) a second TP engine in this process is refused clearly (one default process group per process)
        with pytest.raises(RuntimeError, match="already hosts a tensor-parallel engine"):
            LLMEngine(ckpt, tensor_parallel_size=2, **SMALL, num_kvcache_blocks=64)
        # (4) an exception in a worker surfaces here with its traceback; the engine then refuses work
        with pytest.raises(WorkerError) as e:
            a.model_runner.call("raise_on_rank", 1, "boom from rank 1", True)   # rank 0 waits in an all-reduce
        assert "boom from rank 1" in str(e.value) and "Traceback" in str(e.value)
        with pytest.raises(WorkerError, match="unusable"): a.generate(prompts[:1], TP_SP, use_tqdm=False)
    finally:
        a.exit()
    assert all(not p.process.is_alive() for p in a.model_runner.peers)
    # (5) a worker killed between steps is reported, not waited for
    with LLMEngine(ckpt, tensor_parallel_size=2, **SMALL, num_kvcache_blocks=64) as c:
        assert c.generate(prompts[:1], TP_SP, use_tqdm=False)[0]["token_ids"] == ref[0]
        c.model_runner.peers[0].process.kill()
        c.model_runner.peers[0].process.join()
        with pytest.raises(WorkerError, match="exit code -9"): c.generate(prompts[:1], TP_SP, use_tqdm=False)
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(f"nanovllm_lit_{os.getpid()}_")]
    assert not leftovers, leftovers


def _fail_once_in_run(llm, at_call):
    "Make the model run raise KeyboardInterrupt on its `at_call`-th call, after the step was scheduled."
    real_call, n = llm.model_runner.call, []
    def call(method, *args):
        if method == "run":
            n.append(1)
            if len(n) == at_call: raise KeyboardInterrupt
        return real_call(method, *args)
    llm.model_runner.call = call
    return lambda: setattr(llm.model_runner, "call", real_call)


@pytest.mark.parametrize("at_call", [1, 3])   # the failure hits the prefill, or a decode step
def test_failed_run_leaves_no_stale_prefix_cache(ckpt, at_call):
    "A step whose forward pass fails must not leave hashed blocks without KV, and the engine keeps serving."
    prompts = shared_prefix_prompts()
    with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=64) as llm:
        restore = _fail_once_in_run(llm, at_call)
        with pytest.raises(KeyboardInterrupt): llm.generate(prompts, GREEDY, use_tqdm=False)
        restore()
        bm = llm.scheduler.block_manager
        assert llm.is_finished() and not bm.used_block_ids
        again = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert again == hf_greedy(ckpt, prompts, 16)


def test_failed_step_on_the_step_api_is_rolled_back(ckpt):
    """add_request + step(): a decode that fails at a block boundary leaves the sequence running (its earlier KV is
    written) but un-hashes the block whose last slot it never wrote; the sequence then finishes right."""
    prompt = list(range(3, 3 + 31))          # 31 tokens: the first decode step fills its 2nd block (block size 16)
    with LLMEngine(ckpt, **SMALL, num_kvcache_blocks=64) as llm:
        sid = llm.add_request(prompt, GREEDY)
        llm.step()                           # prefill
        restore = _fail_once_in_run(llm, 1)
        with pytest.raises(KeyboardInterrupt): llm.step()
        restore()
        (seq,) = llm.scheduler.running       # still decoding, nothing half-done
        bm = llm.scheduler.block_manager
        assert not llm.scheduler.waiting and len(seq) == 32 and len(seq.block_table) == 2
        assert bm.blocks[seq.block_table[1]].hash is None and len(bm.hash_to_block_id) == 1   # only the written block
        outs = []
        while not llm.is_finished(): outs += llm.step()[0]
        assert outs == [(sid, hf_greedy(ckpt, [prompt], 16)[0])]


def test_warmup_batches_cover_both_memory_peaks(ckpt):
    "The GPU warm-up prefills: the longest sequences, and max_num_seqs sequences using the whole token budget."
    with LLMEngine(ckpt, max_model_len=200, max_num_batched_tokens=500, max_num_seqs=7) as llm:
        longest, widest = llm.model_runner.warmup_batches()
        assert [len(s) for s in longest] == [200, 200]
        assert len(widest) == 7 and sum(map(len, widest)) == 500 and max(map(len, widest)) <= 200
        for batch in (longest, widest):          # both run (here on the CPU, without a KV cache to write)
            assert len(llm.model_runner.run(batch, True)) == len(batch)
    with LLMEngine(ckpt, max_model_len=200, max_num_batched_tokens=500, max_num_seqs=2) as llm:
        longest, widest = llm.model_runner.warmup_batches()
        assert [len(s) for s in widest] == [200, 200]   # never longer than max_model_len

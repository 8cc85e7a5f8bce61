"""Tensor parallelism (gloo on CPU) when a worker stalls or dies: the caller gets a `WorkerError` within the
configured timeout, `exit()` returns within seconds and leaves no worker process or shared memory behind, and
an interpreter that exits without calling `exit()` does not hang on a stopped worker (chapter 08a)."""
import contextlib, os, signal, subprocess, sys, textwrap, threading, time
import pytest
import torch

from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.engine.tp_worker import WorkerError
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.testing import make_tiny_qwen3

torch.set_num_threads(1)

TIMEOUT = 3   # seconds a rank may lag behind the others in one call (NANOVLLM_LIT_TP_TIMEOUT) in these tests
SMALL = dict(device="cpu", max_model_len=128, max_num_batched_tokens=256, max_num_seqs=4, num_kvcache_blocks=32)
SP = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_tiny_qwen3(tmp_path_factory.mktemp("tprel") / "ckpt"))


def gone(pid: int) -> bool:
    "True when process `pid` no longer runs (absent, or a zombie nobody reaped yet)."
    try: os.kill(pid, 0)
    except ProcessLookupError: return True
    try:
        with open(f"/proc/{pid}/stat") as f: return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError: return True


def kill_quietly(pid: int):
    try: os.kill(pid, signal.SIGKILL)
    except ProcessLookupError: pass


@contextlib.contextmanager
def safety_net(pid: int, after: float = 25.0):
    "Kill `pid` after `after` s, so that code which would wait for a stopped worker (gloo: 30 min) fails, not hangs."
    timer = threading.Timer(after, kill_quietly, (pid,))
    timer.start()
    try: yield
    finally: timer.cancel()


@pytest.fixture
def tp_engine(ckpt, monkeypatch):
    "A TP=2 engine with a short timeout; always torn down (its worker killed if anything is left)."
    monkeypatch.setenv("NANOVLLM_LIT_TP_TIMEOUT", str(TIMEOUT))
    llm = LLMEngine(ckpt, tensor_parallel_size=2, **SMALL)
    pid = llm.model_runner.peers[0].process.pid
    try: yield llm
    finally:
        kill_quietly(pid)
        llm.exit()


def assert_exit_cleans_up(llm):
    "exit() returns within seconds; the worker process and the shared-memory channel are gone."
    runner = llm.model_runner
    proc, shm = runner.peers[0].process, runner.setup.shm_name
    t = time.monotonic()
    llm.exit()
    assert time.monotonic() - t < 5, f"exit() took {time.monotonic() - t:.1f} s"
    assert not proc.is_alive() and gone(proc.pid)
    assert not os.path.exists(f"/dev/shm/{shm}")


def test_stalled_worker_raises_within_timeout(tp_engine):
    llm = tp_engine
    first = llm.generate([[5, 17, 42]], SP, use_tqdm=False)[0]["token_ids"]
    assert len(first) == 3
    pid = llm.model_runner.peers[0].process.pid
    os.kill(pid, signal.SIGSTOP)   # rank 1 stops answering: rank 0 is left alone inside a gloo collective
    with safety_net(pid):
        t = time.monotonic()
        with pytest.raises(WorkerError) as e: llm.generate([[5, 17, 42]], SP, use_tqdm=False)
        waited = time.monotonic() - t
    assert waited < TIMEOUT + 3, f"the stall surfaced after {waited:.1f} s"
    assert f"rank 1 did not answer within {TIMEOUT} s" in str(e.value), str(e.value)
    assert "exit()" in str(e.value)                           # says what to do
    with pytest.raises(WorkerError, match="unusable"): llm.generate([[1, 2]], SP, use_tqdm=False)
    assert_exit_cleans_up(llm)


def test_killed_worker_raises_at_next_step(tp_engine):
    llm = tp_engine
    llm.add_request([5, 17, 42], SP)
    llm.step()                                                 # prefill on both ranks
    pid = llm.model_runner.peers[0].process.pid
    os.kill(pid, signal.SIGKILL)                               # between steps; not joined: rank 0 must notice
    with safety_net(pid):
        t = time.monotonic()
        with pytest.raises(WorkerError, match="rank 1") as e: llm.step()
        waited = time.monotonic() - t
    assert waited < 2, f"the dead worker surfaced after {waited:.1f} s"
    assert "exit code -9" in str(e.value) and "exit()" in str(e.value), str(e.value)   # what happened, what to do
    with pytest.raises(WorkerError, match="unusable"): llm.step()
    assert_exit_cleans_up(llm)


_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from nanovllm_lit.config import Config
    from nanovllm_lit.engine.llm_engine import LLMEngine
    from nanovllm_lit.engine.model_runner import ModelRunner, RunnerSetup, spawn_workers
    from nanovllm_lit.sampling_params import SamplingParams
    if __name__ == "__main__":
        path, api = sys.argv[1:]
        kw = dict(tensor_parallel_size=2, device="cpu", max_model_len=128, max_num_batched_tokens=256,
                  max_num_seqs=4, num_kvcache_blocks=32)
        if api == "engine":       # exited at interpreter exit by its weakref.finalize
            llm = LLMEngine(path, **kw)
            llm.generate([[5, 17, 42]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
            runner = llm.model_runner
        else:                     # a bare runner (chapter 08a's demo): only the tp_worker module's exit hook
            config = Config(path, **kw)
            setup = RunnerSetup.for_engine(config)
            runner = ModelRunner(config, 0, setup=setup, peers=spawn_workers(config, setup))
        print(runner.peers[0].process.pid, runner.setup.shm_name, flush=True)
        os.kill(runner.peers[0].process.pid, signal.SIGSTOP)
        # leave without exit(): the interpreter's exit hooks must not wait for the stopped worker
""")


@pytest.mark.parametrize("api", ["engine", "runner"])
def test_interpreter_exit_with_a_stopped_worker_does_not_hang(ckpt, tmp_path, api):
    script = tmp_path / "stall.py"; script.write_text(_SCRIPT)
    env = {**os.environ, "NANOVLLM_LIT_TP_TIMEOUT": str(TIMEOUT)}
    err = open(tmp_path / "stderr.txt", "w+")                # a file, not a pipe: a full pipe would block the child
    child = subprocess.Popen([sys.executable, str(script), ckpt, api], stdout=subprocess.PIPE, stderr=err,
                             text=True, env=env)
    stderr = lambda: (err.seek(0), err.read()[-3000:])[1]
    pid = shm = None
    try:
        line = child.stdout.readline()                         # the engine is up and its worker stopped
        assert line, stderr()
        pid, shm = int(line.split()[0]), line.split()[1]
        t = time.monotonic()
        try: child.wait(timeout=15)
        except subprocess.TimeoutExpired: pytest.fail("the interpreter did not exit with its TP worker stopped")
        assert time.monotonic() - t < 10 and child.returncode == 0, stderr()
        assert gone(pid) and not os.path.exists(f"/dev/shm/{shm}")
    finally:
        child.kill(); child.wait()
        if pid is not None: kill_quietly(pid)
        if shm is not None and os.path.exists(f"/dev/shm/{shm}"): os.unlink(f"/dev/shm/{shm}")   # a failed run's
        err.close()

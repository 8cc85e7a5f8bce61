"""Checks on a running engine shared by several test files (imported as `engine_checks`: pytest puts tests/ on the path)."""


def footprint_ok(llm):
    "No sequence holds more blocks than `Scheduler.check` reserved for it (rule 3 of chapter 08b; chapter 08c too)."
    sched = llm.scheduler
    bs = sched.block_manager.block_size
    for s in sched.requests.values():
        n, m = s.num_prompt_tokens, s.max_tokens
        kv_tokens = max(n, min(n + m - 1, sched.max_model_len - 1))
        assert len(s.block_table) <= -(-kv_tokens // bs), (s, kv_tokens)

"""BlockManager properties: random allocate / decode / free sequences over shared prefixes keep every invariant
(`check_invariants` after every operation), prefix caching hits exactly what a shadow model predicts when nothing
is evicted, and the named cases: a prefix hit reuses the same block id, a full-prefix hit still leaves tokens to
compute (nano-vllm #144), freed blocks are re-hit, eviction drops the stale hash, collisions are caught."""
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nanovllm_lit.engine.block_manager import Block, BlockManager, check_invariants
from nanovllm_lit.engine.sequence import Sequence

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

PREFIXES = [list(range(1000 + 100 * k, 1000 + 100 * k + 70)) for k in range(3)]   # shared prefix material


def make_prompt(rng, bs):
    "A prompt that often shares a prefix with others (sometimes a whole multiple of the block size)."
    r = rng.random()
    if r < 0.3: base = []
    else:
        p = rng.choice(PREFIXES)
        base = p[:rng.choice([bs, 2 * bs, rng.randint(1, len(p))])]
    tail = [rng.randint(0, 9) for _ in range(rng.choice([0, 0, rng.randint(1, 40)]))]
    prompt = base + tail
    return prompt or [rng.randint(0, 9)]


def simulate(seed, num_blocks, bs, num_ops, shadow=False):
    """Random ops on one BlockManager; check invariants after each. With `shadow`, also predict every allocation's
    cached prefix from the set of registered full-block prefixes (exact when the pool never reuses a hashed block)."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, bs)
    live, everyone = [], []
    registered = set()                     # token prefixes (tuples) whose last full block was hashed
    stats = dict(hits=0, full_prefix=0, rehits=0)
    for _ in range(num_ops):
        op = rng.random()
        if op < 0.35 or not live:
            seq = Sequence(make_prompt(rng, bs), block_size=bs)
            if not bm.can_allocate(seq): 
                if live:
                    victim = live.pop(rng.randrange(len(live)))
                    bm.deallocate(victim)
                    check_invariants(bm, everyone)
                continue
            free_before = set(bm.free_block_ids)
            bm.allocate(seq)
            live.append(seq); everyone.append(seq)
            n = seq.num_blocks
            assert len(seq.block_table) == n and seq.num_cached_tokens < len(seq)
            assert seq.num_cached_tokens % bs == 0
            stats["hits"] += seq.num_cached_blocks > 0
            stats["rehits"] += any(b in free_before and bm.blocks[b].hash is not None
                                   for b in seq.block_table[:seq.num_cached_blocks])
            if len(seq) % bs == 0 and tuple(seq.token_ids) in registered: stats["full_prefix"] += 1
            if shadow:
                k = 0
                while k + 1 <= n - 1 and tuple(seq.token_ids[:(k + 1) * bs]) in registered: k += 1
                assert seq.num_cached_blocks == k, (seq.num_cached_blocks, k)
            for i in range(len(seq) // bs): registered.add(tuple(seq.token_ids[:(i + 1) * bs]))
        elif op < 0.85:
            seq = rng.choice(live)
            seq.append_token(rng.randint(0, 9))
            if bm.can_append(seq):
                bm.may_append(seq)
                assert len(seq.block_table) == seq.num_blocks
                if len(seq) % bs == 0: registered.add(tuple(seq.token_ids))
            else:                                   # no room: what the scheduler does, preempt (here: itself)
                assert bm.num_free_blocks == 0
                live.remove(seq)
                bm.deallocate(seq)
        else:
            seq = live.pop(rng.randrange(len(live)))
            bm.deallocate(seq)
        check_invariants(bm, everyone)
    for seq in live: bm.deallocate(seq)
    check_invariants(bm, everyone)
    assert bm.num_free_blocks == num_blocks and not bm.used_block_ids
    assert all(b.ref_count == 0 for b in bm.blocks)
    return stats


@settings(max_examples=1500, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(3, 24), bs=st.sampled_from([16, 32]),
       num_ops=st.integers(1, 60))
def test_random_ops_keep_invariants(seed, num_blocks, bs, num_ops):
    simulate(seed, num_blocks, bs, num_ops)


def test_random_ops_exercise_the_interesting_paths():
    total = dict(hits=0, full_prefix=0, rehits=0)
    for seed in range(150):
        for k, v in simulate(seed, num_blocks=12, bs=16, num_ops=40).items(): total[k] += v
    assert total["hits"] > 50 and total["full_prefix"] > 5 and total["rehits"] > 5, total


@settings(max_examples=300, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), bs=st.sampled_from([16, 32]), num_ops=st.integers(1, 40))
def test_prefix_hits_match_a_shadow_model_without_eviction(seed, bs, num_ops):
    # a pool so large that fresh blocks always come from never-used ones: nothing hashed is ever evicted
    simulate(seed, num_blocks=320, bs=bs, num_ops=num_ops, shadow=True)


# ---------------------------------------------------------------- named cases
@pytest.mark.parametrize("bs", [16, 32, 256])
def test_prefix_hit_reuses_the_same_block(bs):
    bm = BlockManager(32, bs)
    shared = list(range(2 * bs))
    a, b = Sequence(shared + [1, 2, 3], block_size=bs), Sequence(shared + [4], block_size=bs)
    bm.allocate(a); bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 2 * bs and a.num_cached_tokens == 0
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    check_invariants(bm, [a, b])


@pytest.mark.parametrize("nblocks", [1, 2, 5])
def test_full_prefix_hit_leaves_the_last_block_to_compute(nblocks):
    bs = 16
    bm = BlockManager(32, bs)
    prompt = list(range(nblocks * bs))                  # a whole number of blocks
    a, b = Sequence(prompt), Sequence(prompt)
    bm.allocate(a); bm.allocate(b)
    assert b.num_cached_tokens == (nblocks - 1) * bs < len(b)
    assert b.block_table[:-1] == a.block_table[:-1] and b.block_table[-1] != a.block_table[-1]
    assert bm.blocks[b.block_table[-1]].ref_count == 1   # the recomputed block is b's alone
    check_invariants(bm, [a, b])
    bm.deallocate(a); bm.deallocate(b)                  # and again from freed blocks only
    c = Sequence(prompt)
    bm.allocate(c)
    assert c.num_cached_tokens == (nblocks - 1) * bs < len(c)
    check_invariants(bm, [a, b, c])


def test_freed_blocks_are_rehit_until_reused():
    bm = BlockManager(6, 16)
    prompt = list(range(40))
    a = Sequence(prompt)
    bm.allocate(a)
    ids = list(a.block_table)
    bm.deallocate(a)
    assert bm.num_free_blocks == 6 and all(bm.blocks[i].hash is not None for i in ids[:2])
    b = Sequence(prompt)
    bm.allocate(b)
    assert b.block_table[:2] == ids[:2] and b.num_cached_tokens == 32
    check_invariants(bm, [a, b])


def test_reuse_evicts_tail_first_and_drops_the_stale_hash():
    bm = BlockManager(5, 16)
    a = Sequence(list(range(48)))                      # 3 full blocks
    bm.allocate(a)
    h = [bm.blocks[i].hash for i in a.block_table]
    bm.deallocate(a)
    assert list(bm.free_block_ids) == [3, 4, 2, 1, 0]   # never-used first, then a's blocks tail first
    d = Sequence(list(range(500, 564)))                 # 4 blocks: takes 3, 4, then a's blocks 2 and 1
    bm.allocate(d)
    assert d.block_table == [3, 4, 2, 1]
    assert h[0] in bm.hash_to_block_id and h[1] not in bm.hash_to_block_id and h[2] not in bm.hash_to_block_id
    check_invariants(bm, [a, d])


class CollidingBlockManager(BlockManager):
    "Every block hashes alike: only the token check stands between us and a wrong hit."
    compute_hash = staticmethod(lambda token_ids, prefix=None: 42)


def test_hash_collisions_are_caught_by_the_token_check():
    bm = CollidingBlockManager(16, 16)
    a, b = Sequence(list(range(40))), Sequence(list(range(100, 140)))
    bm.allocate(a); bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    check_invariants(bm, [a, b])


def test_may_append_boundaries():
    bm = BlockManager(4, 16)
    s = Sequence(list(range(15)))
    bm.allocate(s)
    s.append_token(1); bm.may_append(s)                # 16 tokens: the step fills block 0 → hashed
    assert len(s.block_table) == 1 and bm.blocks[s.block_table[0]].hash in bm.hash_to_block_id
    s.append_token(2); bm.may_append(s)                # 17: a new block
    assert len(s.block_table) == 2 and bm.blocks[s.block_table[1]].hash is None
    check_invariants(bm, [s])


def test_can_append_only_fails_at_a_boundary_with_an_empty_pool():
    bm = BlockManager(2, 16)
    s = Sequence(list(range(31)))
    bm.allocate(s)
    s.append_token(0)                                  # 32 tokens: fits in the 2 blocks
    assert bm.num_free_blocks == 0 and bm.can_append(s)
    bm.may_append(s)
    s.append_token(0)                                  # 33: needs a third block
    assert not bm.can_append(s)


def test_block_and_constructor_basics():
    b = Block(5)
    assert (b.block_id, b.ref_count, b.hash, b.token_ids) == (5, 0, None, [])
    with pytest.raises(ValueError, match="num_blocks"): BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"): BlockManager(4, 0)
    assert BlockManager.compute_hash([1, 2]) == BlockManager.compute_hash([1, 2])
    assert BlockManager.compute_hash([1, 2], 7) != BlockManager.compute_hash([1, 2], 8)


def test_check_invariants_catches_corruption():
    bm = BlockManager(4, 16)
    a = Sequence(list(range(20)))
    bm.allocate(a)
    bm.blocks[a.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count"): check_invariants(bm, [a])
    bm.blocks[a.block_table[0]].ref_count -= 1
    bm.free_block_ids.append(a.block_table[0])
    with pytest.raises(AssertionError, match="free"): check_invariants(bm, [a])
    bm.free_block_ids.pop()
    a.block_table.append(a.block_table[0])
    with pytest.raises(AssertionError, match="twice in its table"): check_invariants(bm, [a])

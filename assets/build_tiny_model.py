"""Rebuild the embedded tiny Qwen3 model in `assets/tiny-qwen3/` from nothing.

    python assets/build_tiny_model.py            # full build (about 15-20 min on 2 CPU cores)
    python assets/build_tiny_model.py --steps 20 --out /tmp/tiny   # smoke run

What it does, in order (every random choice is seeded, so a rerun on the same Python/torch/tokenizers
versions and the same thread count gives the same files):

1. **Corpus.** Parse (never import) every source file of the Python standard library this interpreter
   ships, and collect the docstrings of modules, classes and functions with `ast`. Test packages are
   skipped and docstrings are deduplicated. About 5% of the documents, picked by a hash of their text (so
   the split does not depend on file order), are held out for validation. Besides the plain docstrings,
   named objects also give a short chat exchange ("What does json.dumps do?" -> first paragraph of its
   docstring) so that the chat template produces sensible answers.
2. **Tokenizer.** A byte-level BPE (`tokenizers`) trained on the training documents, special tokens
   `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, saved as a HF fast tokenizer with a Qwen-style chat template.
3. **Model.** A small `Qwen3ForCausalLM` (transformers) trained with AdamW and a cosine schedule on packed
   windows of the training stream, on CPU.
4. **Report.** Held-out loss (nats/token) against a unigram baseline, a few greedy samples, timings, written
   to `assets/tiny_model_card.md`; the corpus word list used by `tests/test_assets.py` goes to
   `assets/tiny_model_words.txt`.

Nothing is downloaded: the corpus is the interpreter's own standard library.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

# The tokenizers trainer runs on a rayon thread pool; keep it small on shared machines.
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOT, IM_START, IM_END = SPECIAL_TOKENS

# Qwen-style chat template (no system prompt injected, no tool calls): each message is
# `<|im_start|>{role}\n{content}<|im_end|>\n`; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QUESTIONS = ["What does {name} do?", "Explain {name}.", "What is {name}?", "Describe {name}."]
MODULE_QUESTIONS = ["What is the {name} module for?", "Describe the {name} module."]


# --------------------------------------------------------------------------------------------- corpus
def stdlib_source_files() -> list[Path]:
    """All `.py` files of the standard library modules named in `sys.stdlib_module_names`, tests skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("test") or name.startswith("_"):  # `test` package; private C-accelerator shims
            continue
        p = root / name
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                # subtle: prune in place so os.walk never descends into test directories; sort for determinism
                dirnames[:] = sorted(d for d in dirnames if not (d.startswith("test") or d.endswith("_test")
                                                                 or d == "__pycache__"))
                files += [Path(dirpath) / f for f in sorted(filenames)
                          if f.endswith(".py") and not f.startswith("test")]
        elif (root / f"{name}.py").is_file():
            files.append(root / f"{name}.py")
    return files


def module_name(path: Path) -> str:
    rel = path.relative_to(Path(sysconfig.get_paths()["stdlib"])).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def docstrings_of(path: Path) -> list[tuple[str, str, str]]:
    """(kind, qualified name, docstring) for the module and every class/function in it, source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    mod = module_name(path)
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    out.append(("class" if isinstance(child, ast.ClassDef) else "function", qual, doc))
                visit(child, qual)

    doc = ast.get_docstring(tree, clean=True)
    if doc:
        out.append(("module", mod, doc))
    visit(tree, mod)
    return out


def collect_documents(min_chars: int = 20) -> list[tuple[str, str, str]]:
    seen, docs = set(), []
    for path in stdlib_source_files():
        for kind, qual, doc in docstrings_of(path):
            doc = doc.strip()
            if len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            docs.append((kind, qual, doc))
    return docs


def is_heldout(doc: str, frac: float) -> bool:
    """Stable split by content hash: independent of file order and of the Python version's other files."""
    h = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "little")
    return (h % 10_000) < frac * 10_000


def chat_sample(kind: str, qual: str, doc: str, rng: random.Random) -> str | None:
    if kind == "module":
        q = rng.choice(MODULE_QUESTIONS).format(name=qual)
    else:
        if qual.split(".")[-1].startswith("_"):
            return None  # private helpers make poor questions
        q = rng.choice(QUESTIONS).format(name=qual)
    answer = doc.split("\n\n")[0].strip()
    if len(answer) < 20 or len(answer) > 600:
        return None
    return f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"


WORD_RE = re.compile(r"[A-Za-z]+")


def normalize_word(w: str) -> str | None:
    """The test's notion of a word: strip surrounding punctuation, lower-case, letters only."""
    w = w.strip("`'\".,;:!?()[]{}<>*_-=/\\|#~")
    return w.lower() if w.isalpha() and w.isascii() else None


# ------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_hf_tokenizer(tok, out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json by hand so both transformers 4.57 and 5.x load them."""
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": EOT,  # like Qwen3-Base; generation_config.json lists <|im_end|> too
        "pad_token": EOT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": EOT, "pad_token": EOT, "additional_special_tokens": [IM_START, IM_END]}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- model
def model_config_dict(a, vocab_size: int, eot: int, im_end: int) -> dict:
    # Written in transformers-4.57 style (rope_theta, torch_dtype); transformers 5.x reads these keys too.
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": a.max_pos,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": a.layers,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "torch_dtype": a.save_dtype,
    }


def lr_at(step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * p))


@torch.no_grad()
def eval_stream(model, stream: torch.Tensor, seq_len: int, batch: int = 16):
    """Mean next-token loss over `stream` cut into non-overlapping windows; also returns the targets."""
    model.eval()
    n = (len(stream) - 1) // seq_len
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1: n * seq_len + 1].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        logits = model(input_ids=x[i:i + batch]).logits.float()  # (b, T, V)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(),
                                                   reduction="sum").item()
        count += y[i:i + batch].numel()
    model.train()
    return total / count, y.flatten()


def unigram_loss(train_ids: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the add-one-smoothed train-set unigram distribution on `targets`."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return -logp[targets].mean().item()


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "tiny-qwen3"))
    ap.add_argument("--card", default=str(HERE / "tiny_model_card.md"))
    ap.add_argument("--words", default=str(HERE / "tiny_model_words.txt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", type=float, default=0.05)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--chat-frac", type=float, default=0.3)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=576)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=48)
    ap.add_argument("--max-pos", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-minutes", type=float, default=19.0,
                    help="safety stop: end training early (and say so in the card) past this wall time")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="end after this many steps, the LR schedule still spanning --steps; reproduces a "
                         "build that the time limit stopped (its card names the value)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=250)
    a = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. corpus ------------------------------------------------------------------------------------------
    docs = collect_documents()
    train_docs = [d for d in docs if not is_heldout(d[2], a.heldout)]
    val_docs = [d for d in docs if is_heldout(d[2], a.heldout)]
    # A sample of named objects also becomes a chat exchange (kept to a minority of the tokens).
    chats = [c for d in train_docs if rng.random() < a.chat_frac and (c := chat_sample(*d, rng)) is not None]
    train_texts = [d[2] for d in train_docs]
    print(f"corpus: {len(docs)} docstrings ({sum(len(d[2]) for d in docs)/1e6:.2f} M chars) from "
          f"{len(stdlib_source_files())} files; train {len(train_docs)}, held out {len(val_docs)}; "
          f"{len(chats)} chat samples", flush=True)

    word_counts = Counter(w for t in train_texts for raw in t.split() if (w := normalize_word(raw)))
    words = sorted(word_counts)
    Path(a.words).write_text("\n".join(words) + "\n")

    # 2. tokenizer ---------------------------------------------------------------------------------------
    t0 = time.time()
    tok = train_tokenizer(train_texts + chats, a.vocab)
    save_hf_tokenizer(tok, out)
    eot, im_end = tok.token_to_id(EOT), tok.token_to_id(IM_END)
    vocab_size = tok.get_vocab_size()
    print(f"tokenizer: vocab {vocab_size} in {time.time()-t0:.1f}s", flush=True)

    def encode_docs(texts):
        ids = []
        for enc in tok.encode_batch(texts):
            ids += enc.ids + [eot]
        return torch.tensor(ids, dtype=torch.long)

    samples = train_texts + chats
    rng.shuffle(samples)
    train_ids = encode_docs(samples)
    val_ids = encode_docs([d[2] for d in val_docs])
    print(f"tokens: train {len(train_ids)}, held out {len(val_ids)} "
          f"({sum(map(len, train_texts))/max(1, len(train_ids)):.2f} chars/token)", flush=True)

    # 3. model -------------------------------------------------------------------------------------------
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg_dict = model_config_dict(a, vocab_size, eot, im_end)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params/1e6:.2f} M params", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(a.seed)
    model.train()
    t_train, steps_done, stopped_early, smooth, curve = time.time(), 0, False, None, []
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        starts = torch.randint(0, len(train_ids) - a.seq_len - 1, (a.batch,), generator=g)
        idx = starts[:, None] + torch.arange(a.seq_len + 1)
        chunk = train_ids[idx]  # (batch, seq_len + 1)
        logits = model(input_ids=chunk[:, :-1]).logits  # (batch, seq_len, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % a.log_every == 0 or step == a.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d}/{a.steps} loss {loss.item():.3f} (ema {smooth:.3f}) lr {lr_at(step, a):.2e} "
                  f"{el:.0f}s elapsed, eta {el/(step+1)*(a.steps-step-1):.0f}s", flush=True)
        if (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
            vl, _ = eval_stream(model, val_ids, a.seq_len)
            curve.append((step + 1, smooth, vl))
            print(f"  eval @ {step+1}: held-out {vl:.3f}", flush=True)
        if a.stop_after is not None and steps_done >= a.stop_after:
            break
        if time.time() - t_train > a.max_minutes * 60:
            stopped_early = True
            print(f"safety stop after {steps_done} steps ({a.max_minutes} min)", flush=True)
            break
    train_time = time.time() - t_train
    # torch RNG state is not consumed by eval, so periodic evals do not change the trained weights.

    # 4. report ------------------------------------------------------------------------------------------
    val_loss, val_targets = eval_stream(model, val_ids, a.seq_len)
    train_loss, _ = eval_stream(model, train_ids[: len(val_ids)], a.seq_len)
    uni = unigram_loss(train_ids, val_targets, vocab_size)
    curve.append((steps_done, smooth, val_loss))
    print(f"held-out loss {val_loss:.3f} nats/token (ppl {math.exp(val_loss):.1f}); unigram {uni:.3f} "
          f"(ppl {math.exp(uni):.1f}); train-slice loss {train_loss:.3f}", flush=True)

    save_dtype = getattr(torch, a.save_dtype)
    model.to(save_dtype).save_pretrained(out, safe_serialization=True)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")  # keep our 4.57-style keys
    gen = {"bos_token_id": eot, "eos_token_id": [eot, im_end], "pad_token_id": eot, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    GenerationConfig.from_pretrained(out)  # validates

    # Greedy samples from the saved files (exercises the on-disk checkpoint, fp32 compute).
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(out)
    m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = ["Return the", "This module provides", "Raise ValueError if", "Create a new"]
    chat_q = ["What does json.dumps do?", "What is the os.path module for?"]
    lines = []
    with torch.no_grad():
        for p in prompts:
            ids = tk(p, return_tensors="pt").input_ids
            o = m2.generate(ids, max_new_tokens=40, do_sample=False)
            lines.append((p, tk.decode(o[0, ids.shape[1]:], skip_special_tokens=False)))
        for q in chat_q:
            text = tk.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True)
            ids = tk(text, return_tensors="pt").input_ids
            o = m2.generate(ids, max_new_tokens=48, do_sample=False)
            lines.append((f"[chat] {q}", tk.decode(o[0, ids.shape[1]:], skip_special_tokens=False)))
    for p, c in lines:
        print(f"--- {p!r} -> {c!r}", flush=True)

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    total_time = time.time() - t_start
    card = f"""# tiny-qwen3: the embedded model

A small Qwen3-architecture causal LM with its own byte-level BPE tokenizer, trained briefly on CPU on the
docstrings of Python's standard library. It exists so the README demo, the notebooks and the tests can run
real generation with no download; its output reads like docstring English, not like a useful assistant.
Rebuild with `python assets/build_tiny_model.py` (seeded; same versions and thread count → same files).

## Result

| | nats/token | perplexity |
|---|---|---|
| **held-out loss** (model, {len(val_targets):,} tokens, windows of {a.seq_len}) | **{val_loss:.3f}** | {math.exp(val_loss):.1f} |
| unigram baseline (train-set token frequencies, add-one smoothing, same tokens) | {uni:.3f} | {math.exp(uni):.1f} |
| train-slice loss (model, first {len(val_ids):,} train tokens) | {train_loss:.3f} | {math.exp(train_loss):.1f} |

The model beats the unigram baseline by {uni - val_loss:.2f} nats/token (perplexity ÷{math.exp(uni - val_loss):.1f}).

## Data
- Corpus: docstrings (module, class, function) parsed with `ast` from {len(stdlib_source_files())} source files of
  the Python {platform.python_version()} standard library (test packages skipped), deduplicated, ≥ 20 characters:
  {len(docs)} documents, {sum(len(d[2]) for d in docs)/1e6:.2f} M characters.
- Split by SHA-256 of the text: {len(train_docs)} train / {len(val_docs)} held-out documents ({a.heldout:.0%}).
- Plus {len(chats)} chat exchanges built from train documents (question about a named object → first paragraph
  of its docstring) in the chat template's format.
- Tokens: {len(train_ids):,} train, {len(val_ids):,} held out; each document ends with `<|endoftext|>`.
- `tiny_model_words.txt`: the {len(words):,} words (letters only, lower-cased) of the train
  documents; `tests/test_assets.py` checks that greedy output is made of them.

## Tokenizer
Byte-level BPE (`tokenizers`), vocabulary {vocab_size} including the special tokens
`<|endoftext|>` = {eot}, `<|im_start|>` = {tok.token_to_id(IM_START)}, `<|im_end|>` = {im_end}. Qwen-style chat template:
`<|im_start|>role\\ncontent<|im_end|>\\n` per message, `add_generation_prompt` appends `<|im_start|>assistant\\n`.
EOS for generation: `[{eot}, {im_end}]` (generation_config.json).

## Model
`Qwen3ForCausalLM`: hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads / {a.kv_heads} KV heads,
head_dim {a.head_dim}, tied embeddings, max_position_embeddings {a.max_pos}, rope_theta 10000;
{n_params:,} parameters, stored as {a.save_dtype} safetensors; directory size {size/1e6:.2f} MB.

## Training
AdamW (β = 0.9, 0.95; weight decay {a.weight_decay} on matrices), peak LR {a.lr} with {a.warmup} warm-up steps and cosine
decay to {a.min_lr}, gradient clipping 1.0, batch {a.batch} × {a.seq_len} tokens sampled at random offsets of the packed
train stream, {steps_done} steps (≈ {steps_done*a.batch*a.seq_len/len(train_ids):.1f} epochs), fp32 on CPU with
`torch.set_num_threads({a.threads})`{f" — stopped by the {a.max_minutes:g}-minute limit after {steps_done} of {a.steps} steps (LR already {lr_at(steps_done - 1, a):.2e}); `--stop-after {steps_done}` reproduces this build" if stopped_early else ""}.
Training time {train_time/60:.1f} min; whole build {total_time/60:.1f} min.

Built {datetime.date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} CPU cores visible, shared with other jobs),
Python {platform.python_version()}, torch {torch.__version__}, transformers {__import__('transformers').__version__},
tokenizers {__import__('tokenizers').__version__}.

Held-out loss during training (train loss = running mean of batch losses):

| step | train loss | held-out loss |
|---|---|---|
""" + "\n".join(f"| {s} | {tl:.3f} | {vl:.3f} |" for s, tl, vl in curve) + """

## Greedy samples (HF transformers, fp32, from the saved files; at most 40 new tokens, 48 for chat, stopping at EOS; shown as Python strings)

```
""" + "\n".join(f"{p!r}\n    -> {c!r}" for p, c in lines) + "\n```\n"
    Path(a.card).write_text(card)
    print(f"wrote {out} ({size/1e6:.2f} MB) and {a.card}; total {total_time/60:.1f} min", flush=True)


if __name__ == "__main__":
    main()

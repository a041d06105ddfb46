#!/usr/bin/env python3
"""Tiny random GGUFs of every architecture the engine loads, and llama.cpp's
logits on them: the proof, against an independent implementation, that each
architecture's block (biases, q/k norms, RoPE layout and frequency factors)
runs as its authors meant (Gemma 3's: scaled embeddings, GELU, post-norms
and sliding-window layers with their own RoPE base).

  scripts/arch_goldens.py write TOKENIZER_GGUF OUT_DIR
      writes OUT_DIR/<name>.gguf for every entry of ARCHS (2 layers, hidden
      64, f32 weights from a counter-based hash, so the same bytes on every
      machine and numpy version; the tokenizer's metadata copied from
      TOKENIZER_GGUF, the default model). tests/archs.rs runs this.
  scripts/arch_goldens.py record TOKENIZER_GGUF OUT_DIR
      also runs llama.cpp (llama-cpp-python 0.3.36, see
      scripts/golden_reference.py for the build) on each file and writes
      tests/golden/archs_llamacpp.json: per architecture the file's SHA-256,
      the top 8 logits at every position of TOKENS, and how llama.cpp
      tokenizes TEXTS with the file's pre-tokenizer.

Needs `gguf==0.17.1` and numpy.
"""
import hashlib
import json
import os
import sys

import gguf
import numpy as np

HIDDEN, HEADS, KV_HEADS, FF, LAYERS, CONTEXT = 64, 4, 2, 128, 2, 512
HEAD_DIM = HIDDEN // HEADS

# name: (general.architecture, what it adds to the llama block)
ARCHS = {
    "llama": ("llama", {}),
    "llama3": ("llama", {"rope_freqs": True, "output": True, "pre": "llama-bpe"}),
    # The plain llama block with F16 matrices: what each weight format costs
    # on a float file.
    "llama_f16": ("llama", {"f16": True}),
    "qwen2": ("qwen2", {"qkv_bias": True, "output": True, "pre": "qwen2"}),
    "qwen3": ("qwen3", {"qk_norm": True, "pre": "qwen2", "key_length": 2 * HIDDEN // HEADS, "template": "qwen3"}),
    # Six layers: five in an 8-token sliding window (RoPE base 10,000), the
    # sixth global (base 1,000,000); TOKENS is longer than the window.
    "gemma3": ("gemma3", {"qk_norm": True, "post_norms": True, "key_length": 2 * HIDDEN // HEADS, "layers": 6,
                          "sliding_window": 8, "rope_base": 1_000_000.0}),
}
# The Python string methods Qwen3's chat template calls (`startswith`,
# `split`, `lstrip`, `rstrip`), in its turn format.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' and message.content.startswith('<tool_response>') %}"
    "{{- '<|im_start|>tool\\n' }}{%- else %}{{- '<|im_start|>' + message.role + '\\n' }}{%- endif %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{{- content.rstrip() + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Tokenized by llama.cpp with each file's pre-tokenizer (the default
# model's vocabulary and merges under Llama 3's and Qwen2's splits).
TEXTS = [
    "Hello, world! I'm here; you're there, they'll go.",
    "The year 2024 had 366 days and 12345678 seconds or so.",
    "def f(x):\n    return x  +  1\n\n\nprint(f(41))",
    "naïve café — 東京 🚀   trailing spaces   ",
    "  leading\twhitespace\r\nand CRLF",
]
TOKENS = [504, 3458, 282, 4649, 314, 7042, 30, 378, 2365, 1056, 29, 3135, 28, 253, 1345, 43, 10, 4481, 2003, 325,
          1812, 5217, 18, 30, 217, 7, 4009, 19, 3391, 28, 4044, 17]
TOP = 8


def noise(seed, shape, scale):
    """Uniform in [-scale, scale): splitmix64 of (seed, index), in uint64
    arithmetic (the same on every machine)."""
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed * 0xD1B54A32D192ED03 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return ((u * 2.0 - 1.0) * scale).astype(np.float32).reshape(shape)


def write(tokenizer_path, out_dir, name):
    arch, extra = ARCHS[name]
    src = gguf.GGUFReader(tokenizer_path)
    field = lambda k: src.fields[k].contents()
    tokens = field("tokenizer.ggml.tokens")
    vocab = len(tokens)
    path = os.path.join(out_dir, f"{name}.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"heterospec tiny {name}")
    layers = extra.get("layers", LAYERS)
    w.add_block_count(layers)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(extra.get("rope_base", 10000.0))
    if "sliding_window" in extra:
        w.add_sliding_window(extra["sliding_window"])
    w.add_layer_norm_rms_eps(1e-6)
    if "key_length" in extra:
        # Qwen3's smaller models: heads wider than hidden / heads.
        w.add_key_length(extra["key_length"])
        w.add_value_length(extra["key_length"])
    w.add_file_type(1 if extra.get("f16") else 0)
    w.add_tokenizer_model(field("tokenizer.ggml.model"))
    w.add_tokenizer_pre(extra.get("pre", field("tokenizer.ggml.pre")))
    w.add_token_list(tokens)
    w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    w.add_add_bos_token(False)
    w.add_chat_template(QWEN3_TEMPLATE if extra.get("template") == "qwen3" else field("tokenizer.chat_template"))
    seed = iter(range(1, 1000))
    dtype = np.float16 if extra.get("f16") else np.float32
    mat = lambda rows, cols: noise(next(seed), (rows, cols), 1.5 / np.sqrt(cols)).astype(dtype)
    norm = lambda n: 1.0 + noise(next(seed), (n,), 0.3)
    w.add_tensor("token_embd.weight", noise(next(seed), (vocab, HIDDEN), 1.0))
    w.add_tensor("output_norm.weight", norm(HIDDEN))
    if extra.get("output"):
        w.add_tensor("output.weight", mat(vocab, HIDDEN))
    if extra.get("rope_freqs"):
        # Llama 3.1's shape: the low frequencies divided by up to 8.
        w.add_tensor("rope_freqs.weight", np.linspace(1.0, 8.0, HEAD_DIM // 2, dtype=np.float32))
    head_dim = extra.get("key_length", HEAD_DIM)
    q, kv = HEADS * head_dim, KV_HEADS * head_dim
    for i in range(layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm(HIDDEN))
        w.add_tensor(b + "attn_q.weight", mat(q, HIDDEN))
        w.add_tensor(b + "attn_k.weight", mat(kv, HIDDEN))
        w.add_tensor(b + "attn_v.weight", mat(kv, HIDDEN))
        if extra.get("qkv_bias"):
            w.add_tensor(b + "attn_q.bias", noise(next(seed), (q,), 0.5))
            w.add_tensor(b + "attn_k.bias", noise(next(seed), (kv,), 0.5))
            w.add_tensor(b + "attn_v.bias", noise(next(seed), (kv,), 0.5))
        if extra.get("qk_norm"):
            w.add_tensor(b + "attn_q_norm.weight", norm(head_dim))
            w.add_tensor(b + "attn_k_norm.weight", norm(head_dim))
        w.add_tensor(b + "attn_output.weight", mat(HIDDEN, q))
        w.add_tensor(b + "ffn_norm.weight", norm(HIDDEN))
        w.add_tensor(b + "ffn_gate.weight", mat(FF, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", mat(FF, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", mat(HIDDEN, FF))
        if extra.get("post_norms"):
            w.add_tensor(b + "post_attention_norm.weight", norm(HIDDEN))
            w.add_tensor(b + "post_ffw_norm.weight", norm(HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def record(path):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=CONTEXT, logits_all=True, verbose=False, n_threads=2)
    llm.eval(TOKENS)
    scores = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    top = []
    for row in scores:
        ids = np.argsort(-row, kind="stable")[:TOP]
        top.append([[int(i), float(row[i])] for i in ids])
    tokens = {t: llm.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS}
    return top, tokens


def main():
    mode, tokenizer, out_dir = sys.argv[1:4]
    os.makedirs(out_dir, exist_ok=True)
    golden = {"tokens": TOKENS, "architectures": {}}
    for name in ARCHS:
        path = write(tokenizer, out_dir, name)
        print(f"{path}: {sha256(path)}", file=sys.stderr)
        if mode == "record":
            top, tokens = record(path)
            golden["architectures"][name] = {"sha256": sha256(path), "top": top, "tokenized": tokens}
    if mode == "record":
        with open("tests/golden/archs_llamacpp.json", "w") as f:
            json.dump(golden, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

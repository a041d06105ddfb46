#!/usr/bin/env python3
"""Produces tests/golden/smollm2_llamacpp.json (the default GGUF) and
tests/golden/gemma3_llamacpp.json (`heterospec fetch-model gemma3-270m`):
greedy continuations, top-5 logits and tokenizations of fixed inputs by
llama.cpp (llama-cpp-python), an implementation independent of ours.

Run once when the prompts change (not in CI; llama-cpp-python compiles for
~10 minutes):

  python3 -m venv /tmp/llvenv
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" /tmp/llvenv/bin/pip install llama-cpp-python==0.3.36 numpy
  /tmp/llvenv/bin/python scripts/golden_reference.py models/SmolLM2-135M-Instruct.Q4_1.gguf
  /tmp/llvenv/bin/python scripts/golden_reference.py models/gemma-3-270m-q4_k_m.gguf gemma3
  heterospec quantize --dtype f16 --out /tmp/smollm2-f16.gguf
  /tmp/llvenv/bin/python scripts/golden_reference.py /tmp/smollm2-f16.gguf smollm2_f16

The last is the default model's weights in F16 (`heterospec quantize`
writes the same bytes every time; the test makes the file again and checks
its sha256): llama.cpp at the file's own precision.
"""
import hashlib
import json
import sys

import numpy as np
from llama_cpp import Llama

NEW_TOKENS = 32
TOP = 5


def chat(user):
    return (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


PROMPTS = [
    chat("What is the capital of France?"),
    chat("Write a Python function that returns the sum of a list."),
    chat("Explain photosynthesis in two sentences."),
    chat("What is 12 times 7?"),
    chat("Give me three tips for sleeping better."),
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5, 6,",
    chat("Translate 'good morning' into Spanish."),
]


def gemma_chat(user):
    return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"


GEMMA_PROMPTS = [
    gemma_chat("What is the capital of France?"),
    gemma_chat("Write a Python function that returns the sum of a list."),
    gemma_chat("Explain photosynthesis in two sentences."),
    gemma_chat("Give me three tips for sleeping better."),
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5, 6,",
]

TOKENIZE = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\n\tindented",
    "héllo wörld — naïve café",
    "日本語のテキストと中文",
    "emoji: 🎉🚀👍🏽",
    "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi<|im_end|>\n",
]
# Gemma's user-defined pieces (runs of spaces and newlines, HTML tags) and
# turn markup.
GEMMA_TOKENIZE = TOKENIZE[:-1] + [
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "a  b   c\n\n\nd\t\te",
    "<b>bold</b> and <i>italic</i>   ",
    "Привет, мир! 1234567890 ½ x² ∑",
]


# A conversation with system messages before and between turns.
CHAT = [
    ("system", " Be brief. "),
    ("user", "Hi there\n"),
    ("assistant", "Hello."),
    ("system", "Use French."),
    ("user", "Name a colour."),
]


def chat_by_llama_cpp(family):
    """CHAT rendered by llama.cpp's built-in template of the family (Gemma's
    GGUFs without a template of their own get it); None for the others."""
    if family != "gemma3":
        return None
    import ctypes

    import llama_cpp

    msgs = (llama_cpp.llama_chat_message * len(CHAT))(
        *[llama_cpp.llama_chat_message(role=r.encode(), content=c.encode()) for r, c in CHAT]
    )
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(b"gemma", msgs, len(CHAT), True, buf, len(buf))
    return {"messages": [{"role": r, "content": c} for r, c in CHAT], "text": buf.raw[:n].decode()}


def main():
    path = sys.argv[1]
    family = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
    prompts, texts = (GEMMA_PROMPTS, GEMMA_TOKENIZE) if family == "gemma3" else (PROMPTS, TOKENIZE)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_batch=512, logits_all=True, verbose=False, seed=0)
    cases = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        generated, top5 = [], []
        for _ in range(NEW_TOKENS):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-row, kind="stable")[:TOP]
            top5.append([[int(i), float(row[i])] for i in order])
            tok = int(order[0])
            generated.append(tok)
            llm.eval([tok])
        cases.append({"prompt": prompt, "prompt_token_ids": ids, "greedy_token_ids": generated, "top5": top5})
        print(repr(llm.detokenize(generated).decode("utf-8", "replace")), file=sys.stderr)
    tokenizations = [
        {"text": t, "token_ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in texts
    ]
    out = {
        "reference": "llama-cpp-python 0.3.36, n_threads=2",
        "chat": chat_by_llama_cpp(family),
        "model_sha256": sha,
        "new_tokens": NEW_TOKENS,
        "cases": cases,
        "tokenizations": tokenizations,
    }
    with open(f"tests/golden/{family}_llamacpp.json", "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""llama.cpp side of `heterospec bench forward`: the same measurements on the
same GGUF and token ids, printed as one JSON object on stdout.

Input (stdin, JSON): {"model", "threads", "prefill_ids", "context_ids",
"decode_prompt_ids", "decode_tokens", "ts", "repeats"}.
Needs llama-cpp-python (see scripts/golden_reference.py for how to build it).
"""
import json
import statistics
import sys
import time

from llama_cpp import Llama


def main():
    cfg = json.load(sys.stdin)
    def load(logits_all):
        return Llama(model_path=cfg["model"], n_ctx=1024, n_threads=cfg["threads"], n_threads_batch=cfg["threads"],
                     n_batch=1024, n_ubatch=1024, logits_all=logits_all, verbose=False)

    # prefill and decode need the last row's logits; a verify forward needs them all
    llm = load(False)
    reps = cfg["repeats"]

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def prefill():
        llm.reset()
        llm.eval(cfg["prefill_ids"])

    prefill()  # warm-up
    prefill_s = statistics.median(timed(prefill) for _ in range(reps))

    llm.reset()
    llm.eval(cfg["decode_prompt_ids"])
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    t = time.perf_counter()
    for _ in range(cfg["decode_tokens"]):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    decode_s = time.perf_counter() - t

    llm = load(True)
    ctx = cfg["context_ids"]
    llm.eval(ctx)
    forward_ms = {}
    for T in cfg["ts"]:
        new = cfg["prefill_ids"][:T]

        def run():
            llm.n_tokens = len(ctx)
            llm.eval(new)

        run()
        forward_ms[str(T)] = 1000 * statistics.median(timed(run) for _ in range(reps))
    json.dump({
        "prefill_tokens_per_second": len(cfg["prefill_ids"]) / prefill_s,
        "decode_tokens_per_second": cfg["decode_tokens"] / decode_s,
        "forward_ms": forward_ms,
    }, sys.stdout)


if __name__ == "__main__":
    main()

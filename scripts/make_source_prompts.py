#!/usr/bin/env python3
"""Writes prompts made from real text at hand, for `heterospec draft-data`:

- code: functions from the Python standard library and from the Rust crates
  the build downloaded (~/.cargo/registry/src), each asked to be explained,
  continued (its first half given), reviewed for bugs or documented;
- long-context: passages of 150-450 words from the crates' READMEs and the
  standard library's module docstrings, to summarise or answer about;
- multi-turn: the template prompts of bench/draft_train_prompts.jsonl with a
  follow-up turn (asked after the target's greedy answer).

None is a benchmark or calibration prompt (`draft-data` refuses those too).
Deterministic for a given machine (sorted file lists, seeded choices).

usage: scripts/make_source_prompts.py OUT.jsonl [--code N] [--long N] [--multiturn N]
"""
import argparse, ast, glob, json, os, random, re, sys, sysconfig

rng = random.Random(11)

def python_functions():
    stdlib = sysconfig.get_paths()["stdlib"]
    out = []
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        try:
            src = open(path, encoding="utf-8").read()
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                body = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if 4 <= body.count("\n") <= 40 and len(body) <= 1800:
                    out.append(("Python", os.path.basename(path), body))
    return out

def rust_functions():
    roots = sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/*/src")))
    out = []
    start = re.compile(r"^(\s*)(pub(\([a-z]+\))? )?(const )?(unsafe )?fn [a-z_0-9]+")
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**/*.rs"), recursive=True))[:40]:
            try:
                lines = open(path, encoding="utf-8").read().splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            i = 0
            while i < len(lines):
                m = start.match(lines[i])
                if m and lines[i].rstrip().endswith("{"):
                    indent = m.group(1)
                    for j in range(i + 1, min(i + 41, len(lines))):
                        if lines[j] == indent + "}":
                            body = "\n".join(lines[i:j + 1])
                            if j - i >= 4 and len(body) <= 1800:
                                out.append(("Rust", path.split("/src/")[-2].split("/")[-1], body))
                            i = j
                            break
                i += 1
    return out

def prose_passages():
    out = []
    for path in sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/*/README.md"))):
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        # Paragraphs of prose: no code blocks, tables, badges or headings.
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        paras = [p.strip() for p in re.split(r"\n\s*\n", text)]
        paras = [re.sub(r"\s+", " ", p) for p in paras
                 if len(p) > 80 and not p.startswith(("#", "|", "[!", "<", "![", "-", "*")) and "](http" not in p]
        out.extend(join_paras(paras, path))
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        try:
            doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc:
            paras = [re.sub(r"\s+", " ", p.strip()) for p in re.split(r"\n\s*\n", doc) if len(p.strip()) > 80]
            out.extend(join_paras(paras, path))
    return out

def join_paras(paras, path):
    out, cur = [], []
    for p in paras:
        cur.append(p)
        words = sum(len(c.split()) for c in cur)
        if words >= 150:
            if words <= 450:
                out.append(" ".join(cur))
            cur = []
    return out

code_asks = [
    "Explain what this {l} function does:\n\n{c}",
    "Continue this {l} function:\n\n{h}",
    "Is there a bug in this {l} function? If so, fix it.\n\n{c}",
    "Write a docstring or doc comment for this {l} function:\n\n{c}",
    "How could this {l} function be simplified?\n\n{c}",
    "Write a unit test for this {l} function:\n\n{c}",
]
long_asks = [
    "Summarize the following text in a few sentences:\n\n{x}",
    "What are the main points of this text?\n\n{x}",
    "Read the text below and list its key ideas.\n\n{x}",
    "{x}\n\nSummarize the text above in one paragraph.",
    "Explain the following to a beginner:\n\n{x}",
]
followups = [
    "Can you make that shorter?", "Can you explain that in simpler words?", "Give me an example.",
    "Why is that?", "What else should I know?", "Can you say more about the first point?",
    "Thanks! Can you summarize that in one sentence?", "Can you put that in a list?",
    "Is there another way to do it?", "What would be a common mistake here?",
]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--code", type=int, default=3000)
    ap.add_argument("--long", type=int, default=800)
    ap.add_argument("--multiturn", type=int, default=1500)
    a = ap.parse_args()
    held = set()
    for path in ["bench/prompts.jsonl", "bench/calibration_prompts.jsonl"]:
        held |= {json.loads(l)["prompt"] for l in open(path) if l.strip()}
    funcs = python_functions() + rust_functions()
    rng.shuffle(funcs)
    rows = []
    for lang, _, body in funcs[:a.code]:
        lines = body.splitlines()
        ask = rng.choice(code_asks)
        rows.append({"category": "code-source",
                     "prompt": ask.format(l=lang, c=body, h="\n".join(lines[:max(2, len(lines) // 2)]))})
    passages = sorted(set(prose_passages()))
    rng.shuffle(passages)
    for x in passages[:a.long]:
        rows.append({"category": "long-context", "prompt": rng.choice(long_asks).format(x=x)})
    templated = [json.loads(l) for l in open("bench/draft_train_prompts.jsonl") if l.strip()]
    rng.shuffle(templated)
    for r in templated[:a.multiturn]:
        rows.append({"category": r["category"], "prompt": r["prompt"], "followup": rng.choice(followups)})
    seen, out = set(), []
    for r in rows:
        key = (r["prompt"], r.get("followup"))
        if r["prompt"] not in held and key not in seen:
            seen.add(key)
            out.append(r)
    with open(a.out, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    counts = {}
    for r in out:
        c = r["category"] if "followup" not in r else "multiturn"
        counts[c] = counts.get(c, 0) + 1
    print(len(out), "prompts", counts, f"({len(funcs)} functions, {len(passages)} passages found)", file=sys.stderr)

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The official `openai` client against a router's --http-listen port, for
tests/openai.rs. Prints one JSON object of what it got.

usage: openai_client.py BASE_URL SCENARIO [API_KEY]

Scenarios:
  main    models, chat and completions (whole and streamed, greedy and
          seeded sampling, logprobs, stop) and refused requests
  cancel  starts a long stream, reads three chunks and hangs up
  fill    a chat request without max_tokens (it runs to the context's end)
  busy    holds one long stream open while a second request is made
  one     one short chat request (its error, if any)
"""
import json
import sys
import urllib.error
import urllib.request

import openai

base, scenario = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=sys.argv[3] if len(sys.argv) > 3 else "unused", max_retries=0)
MESSAGES = [{"role": "user", "content": "Name three colors."}]


def error(call):
    """The status and error object of a refused call (None if it passed)."""
    try:
        call()
        return None
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"status": e.status_code, "error": body.get("error", body)}


def stream_chat(**kw):
    text, finish, usage, spec, roles, chunks = "", None, None, None, [], 0
    for ch in client.chat.completions.create(stream=True, **kw):
        chunks += 1
        if ch.usage:
            usage = ch.usage.model_dump()
        spec = (ch.model_extra or {}).get("speculation") or spec
        for c in ch.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return {"text": text, "finish": finish, "usage": usage, "speculation": spec, "roles": roles, "chunks": chunks}


def main(model):
    out = {"models": [m.id for m in client.models.list().data]}
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=24,
                                       logprobs=True, top_logprobs=3)
    c = r.choices[0]
    out["chat"] = {
        "text": c.message.content, "finish": c.finish_reason, "usage": r.usage.model_dump(),
        "speculation": (r.model_extra or {}).get("speculation"), "id": r.id, "object": r.object,
        "logprobs": [{"token": t.token, "logprob": t.logprob,
                      "top": [[a.token, a.logprob] for a in t.top_logprobs]} for t in c.logprobs.content],
    }
    out["chat_stream"] = stream_chat(model=model, messages=MESSAGES, temperature=0, max_tokens=24,
                                     stream_options={"include_usage": True})
    sampled = dict(model=model, messages=MESSAGES, temperature=0.8, top_p=0.9, seed=7, max_tokens=24)
    out["sampled"] = client.chat.completions.create(**sampled).choices[0].message.content
    out["sampled_stream"] = stream_chat(**sampled)["text"]
    out["off"] = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=24,
                                                extra_body={"speculation": "off"}).choices[0].message.content
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=24, stop=["\n"])
    out["stopped"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason}
    r = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=12,
                                  logprobs=2)
    c = r.choices[0]
    out["completion"] = {"text": c.text, "finish": c.finish_reason, "tokens": c.logprobs.tokens,
                         "token_logprobs": c.logprobs.token_logprobs, "top": c.logprobs.top_logprobs,
                         "object": r.object}
    out["completion_stream"] = "".join(
        ch.choices[0].text for ch in client.completions.create(
            model=model, prompt="The capital of France is", temperature=0, max_tokens=12, stream=True)
        if ch.choices)
    chat = client.chat.completions.create
    out["errors"] = {
        "n": error(lambda: chat(model=model, messages=MESSAGES, n=2)),
        "model": error(lambda: chat(model="no-such-model", messages=MESSAGES)),
        "temperature": error(lambda: chat(model=model, messages=MESSAGES, temperature=-1)),
        "max_tokens": error(lambda: chat(model=model, messages=MESSAGES, max_tokens=10 ** 7)),
        "top_logprobs": error(lambda: chat(model=model, messages=MESSAGES, logprobs=True, top_logprobs=21)),
        "messages": error(lambda: chat(model=model, messages=[])),
        "body": error(lambda: chat(model=model, messages=MESSAGES, extra_body={"temperature": "hot"})),
        "too_big": error(lambda: chat(model=model, messages=[{"role": "user", "content": "x" * (5 << 20)}])),
    }
    try:
        urllib.request.urlopen(base + "/v1/nowhere")
    except urllib.error.HTTPError as e:
        out["errors"]["route"] = {"status": e.code, "error": json.load(e)["error"]}
    return out


def cancel(model):
    # No max_tokens: up to the end of the context.
    stream = client.chat.completions.create(model=model, messages=[
        {"role": "user", "content": "Tell me a long story about a dragon."}], temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    got = 0
    for _ in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    return {"chunks": got}


def fill(model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                       extra_body={"ignore_eos": True})
    return {"usage": r.usage.model_dump(), "finish": r.choices[0].finish_reason}


def busy(model):
    stream = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=400,
                                            stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    second = error(lambda: client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4))
    stream.close()
    return {"second": second}


def one(model):
    return {"error": error(lambda: client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4))}


if __name__ == "__main__":
    # The one model a router serves (listing models needs the token too:
    # without it the request below is refused before its model is read).
    try:
        model = client.models.list().data[0].id
    except openai.APIStatusError:
        model = "unlisted"
    print(json.dumps({"main": main, "cancel": cancel, "fill": fill, "busy": busy, "one": one}[scenario](model)))

"""Real clients against a running candle-moe-server (see serve_check.sh).

gsm8k: runs vLLM's own tests/evals/gsm8k/gsm8k_eval.py (unmodified, imported from the vLLM
sdist; its data files are pre-placed where it caches them, and `vllm.assets.base` is given the
one constant it imports), records each question's answer as the server returned it, and
compares accuracy and answers with the in-process `gsm8k --out` report.

openai: the `openai` client, streamed and not, on both endpoints.
"""

import argparse
import importlib.util
import json
import sys
import tempfile
import types


def gsm8k(a):
    # the only name the script takes from vllm; the data is already in its cache dir
    for name in ["vllm", "vllm.assets"]:
        sys.modules.setdefault(name, types.ModuleType(name))
    base = types.ModuleType("vllm.assets.base")
    base.VLLM_S3_BUCKET_URL = "file:///not-used"
    sys.modules["vllm.assets.base"] = base
    tempfile.tempdir = a.data_dir
    spec = importlib.util.spec_from_file_location("gsm8k_eval", a.eval_script)
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    answers = {}
    original = ev.call_vllm_api

    async def recording(*args, **kw):
        text, tokens = await original(*args, **kw)
        answers[kw["prompt"]] = text
        return text, tokens

    ev.call_vllm_api = recording
    res = ev.evaluate_gsm8k(num_questions=a.num_questions, num_shots=a.num_shots,
                            max_tokens=a.max_tokens, port=a.port, temperature=0.0)
    prompts, _ = ev._build_gsm8k_prompts(a.num_questions, a.num_shots)
    ours = json.load(open(a.inprocess))
    served = [answers[p] for p in prompts]
    local = [q["generated"] for q in ours["per_question"]]
    print(f"vLLM gsm8k_eval.py: accuracy {res['accuracy']:.3f} invalid {res['invalid_rate']:.3f} "
          f"tokens {res['total_output_tokens']}; in-process accuracy {ours['accuracy']:.3f}")
    assert len(served) == len(local) == a.num_questions, (len(served), len(local))
    for i, (s, l) in enumerate(zip(served, local)):
        assert s == l, f"question {i}: server {s!r} != in-process {l!r}"
    assert abs(res["accuracy"] - ours["accuracy"]) < 1e-9, (res["accuracy"], ours["accuracy"])
    assert res["total_output_tokens"] > 0
    print(f"  {a.num_questions} answers identical to the in-process evaluation")


def openai_client(a):
    from openai import OpenAI
    c = OpenAI(base_url=f"http://127.0.0.1:{a.port}/v1", api_key=a.api_key or "none")
    model = c.models.list().data[0].id
    r = c.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                             temperature=0)
    text = r.choices[0].text
    assert r.usage.completion_tokens == 12 and text, r
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True)
        if ch.choices)
    assert streamed == text, (streamed, text)
    msgs = [{"role": "user", "content": "Say hi"}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text, r
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=model, messages=msgs, max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == text, (streamed, text)
    try:
        c.completions.create(model=model, prompt="x", max_tokens=-1)
        raise AssertionError("max_tokens=-1 was accepted")
    except Exception as e:  # openai.BadRequestError
        assert getattr(e, "status_code", None) == 400, e
    print(f"  openai client: completions and chat, streamed and not, agree ({model})")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["gsm8k", "openai"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--eval-script")
    p.add_argument("--data-dir")
    p.add_argument("--inprocess")
    p.add_argument("--num-questions", type=int, default=6)
    p.add_argument("--num-shots", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key")
    a = p.parse_args()
    gsm8k(a) if a.what == "gsm8k" else openai_client(a)

"""The prompts transformers renders from tests/fixtures/tiny-qwen3-moe-chat's chat
template, for the server's template test (needs transformers, no torch):

    /tmp/venv/bin/python scripts/make_chat_expected.py tests/fixtures/tiny-qwen3-moe-chat
"""

import json
import os
import sys

from transformers import AutoTokenizer

CASES = [
    {"messages": [{"role": "user", "content": "  What is 2+2?  "}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "Think?"}], "add_generation_prompt": True,
     "kwargs": {"enable_thinking": False}},
]

if __name__ == "__main__":
    d = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(d)
    for c in CASES:
        c["rendered"] = tok.apply_chat_template(c["messages"], tokenize=False,
                                                add_generation_prompt=c["add_generation_prompt"],
                                                **c.get("kwargs", {}))
    with open(os.path.join(d, "expected_chat.json"), "w") as f:
        json.dump({"transformers_version": __import__("transformers").__version__, "cases": CASES}, f,
                  indent=1)
    print(json.dumps(CASES, indent=1))

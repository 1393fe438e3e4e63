"""Tiny Qwen-MoE checkpoints and their HF transformers outputs, for the parity tests.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers
    /tmp/venv/bin/python scripts/make_fixtures.py tests/fixtures
    /tmp/venv/bin/python scripts/make_fixtures.py - --bundled models/tiny-qwen2-moe \
        ../shared/data/qwen2-tokenizer/tokenizer.json
    /tmp/venv/bin/python scripts/make_fixtures.py - --chat-qwen3 tests/fixtures/tiny-qwen3-moe-chat \
        ../shared/data/qwen2-tokenizer/tokenizer.json

Each fixture directory holds what `save_pretrained` writes (config.json, safetensors,
possibly sharded with an index) plus `expected.json`: for a few prompts, the f32 logits at
every prompt position and a greedy continuation with the top-2 logit margin of each step,
all computed by transformers in float32 (eager attention).
"""

import json
import os
import sys

import torch
import transformers
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

PROMPTS = [[1, 17, 42, 99, 3, 250, 7], [5, 9, 200, 31], [77]]
NEW_TOKENS = 24


def scale_weights(model, seed):
    """transformers' init (std 0.02) gives near-uniform routing: use larger weights so the
    router is decisive and logits are well separated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight") and "shared" not in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def reference(model):
    out = []
    for ids in PROMPTS:
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0].float()
        gen, margins = [], []
        cur = list(ids)
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                last = model(torch.tensor([cur])).logits[0, -1].float()
                top2 = torch.topk(last, 2)
                gen.append(int(top2.indices[0]))
                margins.append(float(top2.values[0] - top2.values[1]))
                cur.append(gen[-1])
        out.append({
            "prompt_ids": ids,
            "prompt_logits": logits.tolist(),
            "generated_ids": gen,
            "top2_margins": margins,
        })
    return out


def build(kind, cfg_kwargs, seed, storage_dtype):
    torch.manual_seed(seed)
    cls = Qwen2MoeForCausalLM if kind == "qwen2_moe" else Qwen3MoeForCausalLM
    cfg = (Qwen2MoeConfig if kind == "qwen2_moe" else Qwen3MoeConfig)(**cfg_kwargs)
    model = cls(cfg)
    scale_weights(model, seed)
    return cls, model.to(storage_dtype).eval()


def main(out_dir):
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-6, eos_token_id=255, bos_token_id=254)
    fixtures = {
        # shared expert + sigmoid gate, a dense MLP layer, separate lm_head, sharded, f32
        "qwen2_moe_f32": ("qwen2_moe", dict(common, num_key_value_heads=2, intermediate_size=96,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                              mlp_only_layers=[1], decoder_sparse_step=1,
                                              tie_word_embeddings=False, rope_theta=10000.0),
                          11, torch.float32, "40KB"),
        # bf16 storage, renormalised top-k, tied embeddings, sparse step 2 (layer 0 dense)
        "qwen2_moe_bf16": ("qwen2_moe", dict(common, num_key_value_heads=4, intermediate_size=80,
                                               moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                               num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                               mlp_only_layers=[], decoder_sparse_step=2,
                                               tie_word_embeddings=True, rope_theta=1000000.0),
                           12, torch.bfloat16, None),
        # GQA 4:1, head_dim 24 != 64/4, q/k norm, 12 experts top-3 renormalised, f32
        "qwen3_moe_f32": ("qwen3_moe", dict(common, num_key_value_heads=1, head_dim=24, intermediate_size=96,
                                              moe_intermediate_size=32, num_experts=12, num_experts_per_tok=3,
                                              norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1,
                                              tie_word_embeddings=False, rope_theta=10000.0),
                          13, torch.float32, None),
        # bf16 storage, no renormalisation, tied embeddings, a dense layer
        "qwen3_moe_bf16": ("qwen3_moe", dict(common, num_key_value_heads=2, head_dim=32, intermediate_size=64,
                                               moe_intermediate_size=16, num_experts=16, num_experts_per_tok=4,
                                               norm_topk_prob=False, mlp_only_layers=[2], decoder_sparse_step=1,
                                               tie_word_embeddings=True, rope_theta=10000.0),
                           14, torch.bfloat16, None),
    }
    for name, (kind, kw, seed, dt, shard) in fixtures.items():
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        cls, model = build(kind, kw, seed, dt)
        if shard:
            model.save_pretrained(d, max_shard_size=shard)
        else:
            model.save_pretrained(d)
        # the reference: transformers loading the saved checkpoint in float32
        ref_model = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        exp = reference(ref_model)
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "storage_dtype": str(dt), "cases": exp}, f)
        print(name, sorted(os.listdir(d)))




def make_bundled(out_dir, tokenizer_json):
    """The tiny random Qwen2-MoE the generate example runs by default: the real Qwen2
    tokenizer (151,646 ids), 2 layers, hidden 32, 8 experts top-2 plus a shared expert,
    bf16, tied embeddings (~10 MB)."""
    import shutil
    cfg = Qwen2MoeConfig(vocab_size=151646, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=False, tie_word_embeddings=True, max_position_embeddings=2048,
                         rope_theta=1000000.0, bos_token_id=151643, eos_token_id=[151643, 151645])
    torch.manual_seed(7)
    model = Qwen2MoeForCausalLM(cfg)
    scale_weights(model, 7)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    shutil.copy(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))


# A ChatML template with a default system turn, written for this fixture; it uses
# Python string methods and trim_blocks/lstrip_blocks as real templates do.
CHAT_TEMPLATE = """{%- if messages[0].role != 'system' %}
<|im_start|>system
You are a careful assistant.<|im_end|>
{% endif %}
{%- for m in messages %}
<|im_start|>{{ m.role }}
{{ m.content.strip() }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}
{%- endif %}"""


def make_chat_qwen3(out_dir, tokenizer_json):
    """A transformers-made tiny Qwen3-MoE with the real Qwen2 tokenizer and a chat template
    in tokenizer_config.json, for the server checks: 2 layers, hidden 16, 8 experts top-2,
    bf16, tied embeddings (~5 MB)."""
    import shutil
    cfg = Qwen3MoeConfig(vocab_size=151646, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, intermediate_size=32, moe_intermediate_size=16,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=True,
                         max_position_embeddings=4096, rope_theta=1000000.0, bos_token_id=151643,
                         eos_token_id=151645)
    torch.manual_seed(11)
    model = Qwen3MoeForCausalLM(cfg)
    scale_weights(model, 11)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    shutil.copy(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None,
                   "tokenizer_class": "Qwen2Tokenizer"}, f, indent=1)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [151645, 151643], "bos_token_id": 151643}, f, indent=1)


if __name__ == "__main__":
    # make_fixtures.py [tests/fixtures] [--bundled models/tiny-qwen2-moe TOKENIZER_JSON]
    #                  [--chat-qwen3 tests/fixtures/tiny-qwen3-moe-chat TOKENIZER_JSON]
    if len(sys.argv) > 2 and sys.argv[2] == "--bundled":
        make_bundled(sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 2 and sys.argv[2] == "--chat-qwen3":
        make_chat_qwen3(sys.argv[3], sys.argv[4])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")

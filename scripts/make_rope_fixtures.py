"""RoPE scaling references from transformers: for each config.json variant,
the inverse frequencies and attention factor transformers' own
`ROPE_INIT_FUNCTIONS` compute. Writes tests/fixtures/rope/rope_scaling.json.

    python scripts/make_rope_fixtures.py   # needs torch + transformers
"""
import copy
import json
import os

import transformers
from transformers import Qwen2MoeConfig, Qwen3MoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

BASE = {
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 1,
    "vocab_size": 64,
}

CASES = [
    ("qwen2_moe", {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("qwen2_moe", {"rope_theta": 1000000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    (
        "qwen3_moe",
        {
            "rope_theta": 1000000.0,
            "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        },
    ),
    # Qwen3's YaRN recipe: factor 4 over 32768 while max_position_embeddings is
    # 40960 (an explicit factor wins over max_pos / original in transformers 5.x)
    (
        "qwen3_moe",
        {
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        },
    ),
    (
        "qwen3_moe",
        {
            "rope_theta": 10000.0,
            "max_position_embeddings": 16384,
            "rope_scaling": {
                "type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 2048,
                "beta_fast": 16,
                "beta_slow": 2,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
                "truncate": False,
            },
        },
    ),
    (
        "qwen3_moe",
        {
            "rope_theta": 10000.0,
            "max_position_embeddings": 8192,
            "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.25},
        },
    ),
    (
        "qwen3_moe",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 500000.0,
                "factor": 16.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
]


def main():
    out = []
    for model_type, extra in CASES:
        cfg_json = dict(BASE, model_type=model_type, **extra)
        cls = Qwen2MoeConfig if model_type == "qwen2_moe" else Qwen3MoeConfig
        kwargs = {k: v for k, v in copy.deepcopy(cfg_json).items() if k != "model_type"}
        config = cls(**kwargs)
        config.standardize_rope_params()
        rope_type = config.rope_parameters["rope_type"]
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        out.append(
            {
                "config": cfg_json,
                "inv_freq": [float(x) for x in inv_freq.tolist()],
                "attention_factor": float(attention_factor),
            }
        )
    root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "rope")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "rope_scaling.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": out}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()

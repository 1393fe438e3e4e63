"""Tiny quantized Qwen-MoE checkpoints made by llm-compressor, with the outputs of
llm-compressor's in-memory quantized model (compressed-tensors' own fake-quantized
forward) as the reference, for tests/quant_parity.rs.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers llmcompressor
    /tmp/venv/bin/python scripts/make_quant_fixtures.py tests/fixtures

Writes:
- qwen3_moe_base_f32: the float Qwen3-MoE every Qwen3 fixture below comes from, with
  expected_onload_fp8.json / expected_onload_mxfp4.json: the reference when only the
  routed experts are quantized (FP8_BLOCK / MXFP4A16), i.e. what `--quant` does on load,
  and layer0_experts_{fp8,mxfp4}.safetensors: the expert bytes and scales llm-compressor
  wrote for layer 0 in those runs;
- qwen3_moe_fp8_block: compressed-tensors float-quantized (FP8_BLOCK: 128x128 weight
  blocks, dynamic per-token-group-128 activations) on every Linear but router and lm_head;
- qwen3_moe_fp8_native: the same tensors in the Qwen3-*-FP8 layout (`weight_scale_inv`,
  `quant_method: fp8`, `weight_block_size: [128, 128]`), same expected outputs;
- qwen2_moe_mxfp4: compressed-tensors mxfp4-pack-quantized (MXFP4A16) Qwen2-MoE with a
  shared expert and a dense MLP layer.
"""

import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import reference, scale_weights  # noqa: E402

import llmcompressor  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              eos_token_id=255, bos_token_id=254, tie_word_embeddings=False, rope_theta=10000.0)
IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
EXPERTS_ONLY = ["re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$"]


def versions():
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "llmcompressor": llmcompressor.__version__}


def quantize(base_dir, cls, scheme, targets, ignore):
    model = cls.from_pretrained(base_dir, dtype=torch.float32).eval()
    oneshot(model=model, recipe=QuantizationModifier(targets=targets, scheme=scheme, ignore=ignore))
    return model.eval()


def write_expected(path, model, extra):
    with open(path, "w") as f:
        json.dump({**versions(), **extra, "cases": reference(model)}, f)


def main(out):
    # the float Qwen3-MoE source
    base = os.path.join(out, "qwen3_moe_base_f32")
    os.makedirs(base, exist_ok=True)
    torch.manual_seed(21)
    cfg = Qwen3MoeConfig(**COMMON, head_dim=32, intermediate_size=256, moe_intermediate_size=128,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                         mlp_only_layers=[], decoder_sparse_step=1)
    m = Qwen3MoeForCausalLM(cfg)
    scale_weights(m, 21)
    m.eval().save_pretrained(base)

    # on-load references: experts only
    for q, scheme in [("fp8", "FP8_BLOCK"), ("mxfp4", "MXFP4A16")]:
        qm = quantize(base, Qwen3MoeForCausalLM, scheme, EXPERTS_ONLY, ["lm_head"])
        write_expected(os.path.join(base, f"expected_onload_{q}.json"), qm, {"scheme": scheme,
                                                                            "targets": EXPERTS_ONLY})
        # the bytes llm-compressor writes for layer 0's experts, to compare with ours exactly
        tmp = os.path.join("/tmp", f"qwen3_onload_{q}")
        qm.save_pretrained(tmp, save_compressed=True)
        t = load_file(os.path.join(tmp, "model.safetensors"))
        save_file({k: v for k, v in t.items() if k.startswith("model.layers.0.mlp.experts.")},
                  os.path.join(base, f"layer0_experts_{q}.safetensors"), metadata={"format": "pt"})

    # FP8_BLOCK checkpoint (compressed-tensors)
    d = os.path.join(out, "qwen3_moe_fp8_block")
    qm = quantize(base, Qwen3MoeForCausalLM, "FP8_BLOCK", ["Linear"], IGNORE)
    write_expected(os.path.join(d + ".expected.json"), qm, {"scheme": "FP8_BLOCK"})
    qm.save_pretrained(d, save_compressed=True)
    shutil.move(d + ".expected.json", os.path.join(d, "expected.json"))

    # the same weights in the Qwen3-*-FP8 layout
    n = os.path.join(out, "qwen3_moe_fp8_native")
    os.makedirs(n, exist_ok=True)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    renamed = {(k[: -len("weight_scale")] + "weight_scale_inv" if k.endswith("weight_scale") else k): v
               for k, v in tensors.items()}
    save_file(renamed, os.path.join(n, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128],
                                "modules_to_not_convert": ["lm_head", "gate"]}
    with open(os.path.join(n, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    shutil.copy(os.path.join(d, "expected.json"), os.path.join(n, "expected.json"))

    # MXFP4A16 Qwen2-MoE with a shared expert and a dense layer
    b2 = os.path.join("/tmp", "qwen2_moe_base_f32")
    torch.manual_seed(22)
    cfg = Qwen2MoeConfig(**COMMON, intermediate_size=256, moe_intermediate_size=128,
                         shared_expert_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=False, mlp_only_layers=[1], decoder_sparse_step=1)
    m = Qwen2MoeForCausalLM(cfg)
    scale_weights(m, 22)
    m.eval().save_pretrained(b2)
    d = os.path.join(out, "qwen2_moe_mxfp4")
    qm = quantize(b2, Qwen2MoeForCausalLM, "MXFP4A16", ["Linear"], IGNORE)
    write_expected(d + ".expected.json", qm, {"scheme": "MXFP4A16"})
    qm.save_pretrained(d, save_compressed=True)
    shutil.move(d + ".expected.json", os.path.join(d, "expected.json"))
    for x in (base, d, n, os.path.join(out, "qwen3_moe_fp8_block")):
        print(x, sorted(os.listdir(x)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")

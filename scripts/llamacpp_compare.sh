#!/usr/bin/env bash
# Whole-model speed against llama.cpp (the CPU anchor) on the same weights:
# the random Qwen1.5-MoE-A2.7B-shaped checkpoint that bench_generate writes,
# converted to GGUF BF16, Q8_0 and MXFP4_MOE, timed with llama-bench (2
# threads), right after our bench_generate on the same checkpoint.
#
#   bash scripts/llamacpp_compare.sh [LAYERS (4)] [WORKDIR (/tmp/llamacpp)]
#
# Needs: python3 with venv + pip (registry access), cmake from pip, a C++
# compiler. llama.cpp comes from the llama-cpp-python sdist on PyPI (it vendors
# llama.cpp and its convert script). Prints one JSON object per engine/format
# and a table of ratios (ours / llama.cpp) for prompt and generation tok/s.
set -euo pipefail
LAYERS=${1:-4}
WORK=${2:-/tmp/llamacpp}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOKENIZER=${TOKENIZER:-$ROOT/models/tiny-qwen2-moe/tokenizer.json}
mkdir -p "$WORK"
cd "$WORK"

if [ ! -x venv/bin/python ]; then
  python3 -m venv venv
  venv/bin/pip install -q cmake gguf transformers torch safetensors numpy sentencepiece
fi
if [ ! -d llama.cpp ]; then
  venv/bin/pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python -d .
  tar xzf llama_cpp_python-*.tar.gz
  mv llama_cpp_python-*/vendor/llama.cpp llama.cpp
fi
if [ ! -x llama.cpp/build/bin/llama-bench ]; then
  (cd llama.cpp && ../venv/bin/cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    && ../venv/bin/cmake --build build -j2 --target llama-bench llama-quantize)
fi

# our benchmark first: it writes the checkpoint if missing
(cd "$ROOT" && cargo run --release --example bench_generate -- --layers "$LAYERS" --json) | tee ours.txt
CKPT=${TMPDIR:-/tmp}/candle-moe-bench-qwen15-${LAYERS}l

# a directory convert_hf_to_gguf.py accepts: architectures, torch_dtype, and
# the tokenizer as vocab.json / merges.txt next to tokenizer.json
HF=$WORK/hf-${LAYERS}l
mkdir -p "$HF"
ln -sf "$CKPT/model.safetensors" "$HF/model.safetensors"
venv/bin/python - "$CKPT/config.json" "$HF" "$TOKENIZER" <<'EOF'
import json, sys
from transformers import PreTrainedTokenizerFast
cfg = json.load(open(sys.argv[1]))
cfg["architectures"] = ["Qwen2MoeForCausalLM"]
cfg["torch_dtype"] = "bfloat16"
cfg.setdefault("bos_token_id", 151643)
cfg.setdefault("eos_token_id", 151645)
json.dump(cfg, open(sys.argv[2] + "/config.json", "w"))
tok = PreTrainedTokenizerFast(tokenizer_file=sys.argv[3], eos_token="<|im_end|>", pad_token="<|endoftext|>")
tok.save_pretrained(sys.argv[2])
EOF
for t in bf16 q8_0; do
  [ -f m-${LAYERS}l-$t.gguf ] || venv/bin/python llama.cpp/convert_hf_to_gguf.py "$HF" --outtype $t --outfile m-${LAYERS}l-$t.gguf
done
[ -f m-${LAYERS}l-mxfp4_moe.gguf ] || llama.cpp/build/bin/llama-quantize m-${LAYERS}l-bf16.gguf m-${LAYERS}l-mxfp4_moe.gguf MXFP4_MOE 2

for t in bf16 q8_0 mxfp4_moe; do
  llama.cpp/build/bin/llama-bench -m m-${LAYERS}l-$t.gguf -t 2 -p 64 -n 32 -r 3 -o json > llama-$t.json
done

# ratios: ours bf16 / llama BF16, ours fp8 (everything) / Q8_0, ours mxfp4-fp8 / MXFP4_MOE
venv/bin/python - ours.txt llama-bf16.json llama-q8_0.json llama-mxfp4_moe.json <<'EOF'
import json, sys
ours = {r["weights"]: r for r in json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]) if r["model"] == "candle-moe"}
def llama(path):
    rows = json.load(open(path))
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return pp, tg
print(f"{'ours':<12} {'llama.cpp':<10} {'prompt ours':>11} {'llama':>7} {'ratio':>6} {'gen ours':>9} {'llama':>7} {'ratio':>6}")
out = []
for mine, theirs, path in [("bf16", "BF16", sys.argv[2]), ("fp8", "Q8_0", sys.argv[3]), ("mxfp4-fp8", "MXFP4_MOE", sys.argv[4])]:
    pp, tg = llama(path)
    o = ours[mine]
    row = {"ours": mine, "llama_cpp": theirs, "prompt_ours": o["prompt_tok_s"], "prompt_llama": pp,
           "prompt_ratio": o["prompt_tok_s"] / pp, "gen_ours": o["gen_tok_s"], "gen_llama": tg,
           "gen_ratio": o["gen_tok_s"] / tg}
    out.append(row)
    print(f"{mine:<12} {theirs:<10} {row['prompt_ours']:>11.1f} {pp:>7.1f} {row['prompt_ratio']:>6.2f} {row['gen_ours']:>9.2f} {tg:>7.2f} {row['gen_ratio']:>6.2f}")
print(json.dumps(out))
EOF

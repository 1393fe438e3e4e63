#!/usr/bin/env bash
# Whole-model speed against llama.cpp (the CPU anchor) on the same weights:
# the random Qwen1.5-MoE-A2.7B-shaped checkpoint that bench_generate writes,
# converted to GGUF BF16, Q8_0 and MXFP4_MOE, timed with llama-bench (2
# threads) in rounds interleaved with our bench_generate on the same checkpoint.
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

# ratios: ours bf16 / llama BF16, ours fp8 (everything) / Q8_0, ours mxfp4-fp8 /
# MXFP4_MOE, each pair run back to back for ROUNDS rounds: the machine's speed drifts by
# up to 25 % over the minutes a whole sequence takes, and medians of interleaved runs
# keep the drift out of the ratios
ROUNDS=${ROUNDS:-3} venv/bin/python - "$ROOT/target/release/examples/bench_generate" "$LAYERS" <<'EOF'
import json, os, statistics, subprocess, sys
ours_bin, layers = sys.argv[1], sys.argv[2]
pairs = [("bf16", "BF16", "bf16"), ("fp8", "Q8_0", "q8_0"), ("mxfp4-fp8", "MXFP4_MOE", "mxfp4_moe")]
runs = {p[0]: {"po": [], "go": [], "pl": [], "gl": []} for p in pairs}
for _ in range(int(os.environ["ROUNDS"])):
    for mine, _, gguf in pairs:
        out = subprocess.run([ours_bin, "--layers", layers, "--variants", mine, "--no-candle", "--json"],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])[0]
        runs[mine]["po"].append(row["prompt_tok_s"])
        runs[mine]["go"].append(row["gen_tok_s"])
        out = subprocess.run(["llama.cpp/build/bin/llama-bench", "-m", f"m-{layers}l-{gguf}.gguf", "-t", "2",
                              "-p", "64", "-n", "32", "-r", "3", "-o", "json"],
                             capture_output=True, text=True, check=True).stdout
        rows = json.loads(out)
        runs[mine]["pl"].append(next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0))
        runs[mine]["gl"].append(next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0))
rounds = os.environ["ROUNDS"]
print(f"{'ours':<12} {'llama.cpp':<10} {'prompt ours':>11} {'llama':>7} {'ratio':>6} "
      f"{'gen ours':>9} {'llama':>7} {'ratio':>6}  (medians of {rounds} interleaved rounds)")
out = []
for mine, theirs, _ in pairs:
    m = {k: statistics.median(v) for k, v in runs[mine].items()}
    row = {"ours": mine, "llama_cpp": theirs, "prompt_ours": m["po"], "prompt_llama": m["pl"],
           "prompt_ratio": m["po"] / m["pl"], "gen_ours": m["go"], "gen_llama": m["gl"],
           "gen_ratio": m["go"] / m["gl"], "rounds": runs[mine]}
    out.append(row)
    print(f"{mine:<12} {theirs:<10} {m['po']:>11.1f} {m['pl']:>7.1f} {row['prompt_ratio']:>6.2f} "
          f"{m['go']:>9.2f} {m['gl']:>7.2f} {row['gen_ratio']:>6.2f}")
print(json.dumps(out))
EOF

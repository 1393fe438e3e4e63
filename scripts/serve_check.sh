#!/usr/bin/env bash
# Real clients against candle-moe-server, on the bundled model and on a
# transformers-made tiny Qwen3-MoE with a chat template:
#  - vLLM's own tests/evals/gsm8k/gsm8k_eval.py (taken unmodified from the vLLM
#    sdist on PyPI): its accuracy and every answer equal the in-process gsm8k
#    example's (both --batch-invariant, greedy, same prompts);
#  - the openai Python client, streamed and not, completions and chat.
# Needs python3 and a package index (a venv gets aiohttp numpy regex requests
# tqdm openai; no torch); skips with a note otherwise. CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "serve_check: no python3, skipped"; exit 0; }
VLLM_VERSION=${VLLM_VERSION:-0.33.0}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/candle-moe
venv=${SERVE_CHECK_VENV:-$cache/serve-check-venv}
mkdir -p "$cache"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import aiohttp, numpy, regex, requests, tqdm, openai' 2>/dev/null; then
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q aiohttp numpy regex requests tqdm openai; }; then
    echo "serve_check: cannot install the python clients (no package index?), skipped"; exit 0
  fi
fi
py="$venv/bin/python"
sdist="$cache/vllm-$VLLM_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  url=$("$py" -c "
import json, urllib.request
r = urllib.request.Request('https://pypi.org/simple/vllm/', headers={'Accept': 'application/vnd.pypi.simple.v1+json'})
d = json.load(urllib.request.urlopen(r))
print([f['url'] for f in d['files'] if f['filename'] == 'vllm-$VLLM_VERSION.tar.gz'][0])") \
    && "$py" -c "import sys,urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "$url" "$sdist.part" \
    && mv "$sdist.part" "$sdist" \
    || { echo "serve_check: cannot download the vLLM $VLLM_VERSION sdist, skipped"; exit 0; }
fi
work=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
tar -xzf "$sdist" -C "$work" "vllm-$VLLM_VERSION/tests/evals/gsm8k/gsm8k_eval.py"
script="$work/vllm-$VLLM_VERSION/tests/evals/gsm8k/gsm8k_eval.py"
mkdir -p "$work/data"
cp tests/fixtures/gsm8k/train.jsonl tests/fixtures/gsm8k/test.jsonl "$work/data/"
cargo build --release -p candle-moe-server -q
cargo build --release --example gsm8k -q
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
nq=6 shots=3 maxt=32
for model in models/tiny-qwen2-moe tests/fixtures/tiny-qwen3-moe-chat; do
  echo "== $model"
  target/release/examples/gsm8k --model "$model" --data-dir tests/fixtures/gsm8k --limit $nq \
    --num-fewshot $shots --max-new-tokens $maxt --batch-invariant --out "$work/inprocess.json" >/dev/null 2>&1
  target/release/candle-moe-server --model "$model" --port "$port" --batch-invariant 2>"$work/server.log" &
  server_pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
  "$py" scripts/serve_check.py gsm8k --port "$port" --eval-script "$script" --data-dir "$work/data" \
    --inprocess "$work/inprocess.json" --num-questions $nq --num-shots $shots --max-tokens $maxt 2>&1 | grep -v "^Evaluating"
  "$py" scripts/serve_check.py openai --port "$port"
  kill -TERM "$server_pid"; wait "$server_pid" || true; server_pid=
done
echo "serve_check: ok"

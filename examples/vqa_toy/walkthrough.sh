#!/usr/bin/env bash
# The whole path of docs/vqa.md on the toy task, nothing downloaded:
#     bash examples/vqa_toy/walkthrough.sh [SEED] [FOLDER]
# writes the task, a tiny random CLIP, starts the stand-in VLM on a free port of
# 127.0.0.1, then embed -> collect -> train (RCE, then judge-rank) -> select -> evaluate,
# all judged over HTTP by the openai-vlm environment. About a minute on 2 CPU cores.
# Needs: pip install -e '.[clip,vlm]' (from the repository root).
set -euo pipefail

seed=${1:-0}
out=${2:-vqa-toy-$seed}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$out"
cd "$out"

python "$here/make_task.py" task --seed "$seed"
[[ -d clip ]] || python "$here/tiny_clip.py" clip

python "$here/standin_vlm.py" --manifest task/manifest.jsonl --port 0 >server.log &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 50); do [[ -s server.log ]] && break; sleep 0.1; done
url=$(sed -n 's/.* on \(http[^ ]*\) .*/\1/p' server.log)
echo "stand-in VLM at $url"

judge=(--judge openai-vlm --vlm-url "$url" --vlm-model toy-vlm
       --vlm-manifest task/manifest.jsonl --store verdicts.sqlite)

lever-train embed task/manifest.jsonl --model clip --modality both \
    --output emb.safetensors --overwrite
lever-train collect task/train_pools.json "${judge[@]}" --img-emb emb.safetensors \
    --shots 2 --beam-size 4 --beam-candidates 8 --cosine --random 4 --output rl.json
lever-train --beam-data rl.json --img-emb emb.safetensors "${judge[@]}" \
    --plugin judge-rank --output-dir run --overwrite
lever-train select --ckpt run/judge-rank_epoch30.safetensors \
    --queries task/test_pools.json --img-emb emb.safetensors --output picks.json
lever-train evaluate run/judge-rank_epoch30.safetensors --queries task/test_pools.json \
    --img-emb emb.safetensors "${judge[@]}" --baselines cosine,cosine-reversed \
    --output eval.json
echo "stand-in's requests: $(python -c "import json, urllib.request; print(json.load(urllib.request.urlopen('${url%/v1}/stats')))")"

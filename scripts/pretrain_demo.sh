#!/usr/bin/env bash
# Pretrain a model from scratch on real text on this machine: the Python standard library's sources (code) and
# pydoc_data.topics (English prose), as reported in docs/training.md.
# Usage: bash scripts/pretrain_demo.sh [OUT_DIR] [extra `gpt4 pretrain` flags...]   (default OUT_DIR: runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
shift || true
GPT4=.venv/bin/gpt4
mkdir -p "$OUT/corpus"
# The corpus: every stdlib .py file outside test folders, and one JSONL record per pydoc topic.
.venv/bin/python - "$OUT/corpus" <<'EOF'
import json, shutil, sys, sysconfig
from pathlib import Path
from pydoc_data.topics import topics

out = Path(sys.argv[1])
stdlib = Path(sysconfig.get_paths()["stdlib"])
skip = {"test", "tests", "idle_test", "site-packages", "lib2to3"}
files = [p for p in sorted(stdlib.rglob("*.py")) if not skip & set(p.relative_to(stdlib).parts)]
for p in files:
    target = out / "stdlib" / p.relative_to(stdlib)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(p, target)
with open(out / "pydoc_topics.jsonl", "w") as f:
    for name in sorted(topics):
        f.write(json.dumps({"text": topics[name]}) + "\n")
print(f"corpus: {len(files)} stdlib files, {len(topics)} pydoc topics -> {out}")
EOF
$GPT4 train-tokenizer "$OUT/corpus" --out "$OUT/tok8k" --vocab-size 8192
$GPT4 prepare "$OUT/corpus" --tokenizer "$OUT/tok8k" --out "$OUT/data" --val-fraction 0.02
$GPT4 pretrain --data "$OUT/data" --out "$OUT/pretrain" --preset small --steps 500 --batch-size 16 --seq-len 256 \
    --lr 2e-3 --warmup-steps 30 --eval-interval 50 --eval-batches 8 --checkpoint-interval 100 --precision auto \
    --threads 2 --sample-prompt "def " "$@"

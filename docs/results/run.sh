#!/usr/bin/env bash
# Reproduces docs/evaluation.md's table: fixed subsets (the first --limit examples of each task's file),
# sized for a shared 2-core CPU. Each command writes its results and per-example records to docs/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
G="nice -n 10 .venv/bin/gpt4"
Q=qwen2.5-coder-0.5b-instruct   # after: gpt4 pull qwen2.5-coder-0.5b-instruct
$G eval --model gpt4 --task arc_easy --limit 40 -o docs/results/gpt4_arc_easy.json
$G eval --model $Q --task arc_easy --limit 40 -o docs/results/qwen_arc_easy.json
$G eval --model gpt4 --task piqa --limit 40 -o docs/results/gpt4_piqa.json
$G eval --model gpt4 --task lambada --limit 40 -o docs/results/gpt4_lambada.json
$G eval --model $Q --task piqa --limit 40 -o docs/results/qwen_piqa.json
$G eval --model gpt4 --task winogrande --limit 40 -o docs/results/gpt4_winogrande.json
$G eval --model gpt4 --task humaneval --limit 5 -o docs/results/gpt4_humaneval.json
$G eval --model $Q --task humaneval --limit 5 -o docs/results/qwen_humaneval.json
$G eval --model gpt4 --task hellaswag --limit 20 -o docs/results/gpt4_hellaswag.json
$G eval --model gpt4 --task squad --limit 10 -o docs/results/gpt4_squad.json

#!/usr/bin/env bash
# The GPU check: at most eight minutes on one CUDA GPU with torch, transformers, peft and matplotlib (no install, no
# network).
#
#     bash benchmarks/gpu_check.sh [REPORT_DIR]           (default: gpu_check_report/)
#     bash benchmarks/gpu_check.sh --smoke [REPORT_DIR]   the same code paths on the CPU, tiny sizes, in about a minute
#                                                         (default: gpu_check_smoke/)
#
# Runs, each part in its own process and time limit: the CUDA tests (CPU vs CUDA equality of log-probs, loss and
# gradients; demo steps in bf16 and fp16 + GradScaler), the phi-2-sized model through train_step per layout (with
# gradient checkpointing; padded also without: step time, tokens/s, MFU, peak CUDA memory), the LoRA recipe's peak
# memory, sampling tokens/s, the demo end to end, and a profile of one step (where its time goes; then the
# checkpointed step at micro 16). Every part's output goes to REPORT_DIR/<part>.log, the JSON lines of the
# measurements to REPORT_DIR/results.jsonl; the summary (`gpu_check.py summary`) is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=()
DEMO=()
REPORT_DEFAULT=gpu_check_report
if [[ ${1:-} == --smoke ]]; then  # the parts on the CPU at tiny sizes, the demo for 2 steps: checks the script
  SMOKE=(--smoke)
  DEMO=(--max-steps 2 --eval-steps 2 --eval-generate 0 --device cpu)
  REPORT_DEFAULT=gpu_check_smoke  # never over a GPU's report
  shift
fi
REPORT=${1:-$REPORT_DEFAULT}
mkdir -p "$REPORT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
: > "$REPORT/results.jsonl"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  # SIGTERM first (train.py then checkpoints after its step), SIGKILL 5 s later: no part outlives its limit
  timeout -k 5 "$seconds" "$@" > "$REPORT/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$REPORT/$name.log" >> "$REPORT/results.jsonl"
  echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$REPORT/summary.txt"
}

: > "$REPORT/summary.txt"
{ if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader; else echo "no nvidia-smi"; fi
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee -a "$REPORT/summary.txt"
# the limits add up to 440 s: with the kills' grace and the three Python starts around them, within 8 minutes
part phi2 160 $PY benchmarks/gpu_check.py phi2 ${SMOKE[@]+"${SMOKE[@]}"}
part lora 55 $PY benchmarks/gpu_check.py lora ${SMOKE[@]+"${SMOKE[@]}"}
if $PY -c "import pytest" 2> /dev/null; then
part cuda_tests 70 $PY -m pytest -q -s -p no:cacheprovider -m cuda tests/test_cuda.py
elif [[ ${#SMOKE[@]} == 0 ]]; then  # no pytest on the machine: the CPU vs CUDA comparison without the tests
part equality 70 $PY benchmarks/gpu_check.py equality
fi
part generate 40 $PY benchmarks/gpu_check.py generate ${SMOKE[@]+"${SMOKE[@]}"}
part demo 60 $PY train.py --output-dir "${TMPDIR:-/tmp}/dpo-gpu-demo" --overwrite --no-progress ${DEMO[@]+"${DEMO[@]}"}
part profile 55 $PY benchmarks/gpu_check.py profile ${SMOKE[@]+"${SMOKE[@]}"}
tail -n 25 "$REPORT/demo.log" >> "$REPORT/summary.txt"
$PY benchmarks/gpu_check.py summary "$REPORT/results.jsonl" | tee -a "$REPORT/summary.txt"

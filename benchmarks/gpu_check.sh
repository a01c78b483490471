#!/usr/bin/env bash
# The GPU check: at most eight minutes on one CUDA GPU with torch, transformers and peft (no install, no network).
#
#     bash benchmarks/gpu_check.sh [REPORT_DIR]        (default: gpu_check_report/)
#
# Runs, each part in its own process and time limit: the CUDA tests (CPU vs CUDA equality of log-probs, loss and
# gradients; demo steps in bf16 and fp16 + GradScaler), the phi-2-sized model through train_step per layout (with
# gradient checkpointing; padded also without) (step time, tokens/s, MFU, peak CUDA memory), the LoRA recipe's peak memory,
# sampling tokens/s, the demo end to end, and a profile of one step (where its time goes). Every part's output goes to REPORT_DIR/<part>.log; the JSON lines
# of the measurements to REPORT_DIR/results.jsonl; a summary is printed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-gpu_check_report}
mkdir -p "$REPORT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
: > "$REPORT/results.jsonl"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" > "$REPORT/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$REPORT/$name.log" >> "$REPORT/results.jsonl"
  echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$REPORT/summary.txt"
}

: > "$REPORT/summary.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee -a "$REPORT/summary.txt"
part phi2 170 $PY benchmarks/gpu_check.py phi2
part lora 70 $PY benchmarks/gpu_check.py lora
part cuda_tests 90 $PY -m pytest -q -s -p no:cacheprovider -m cuda tests/test_cuda.py
part generate 35 $PY benchmarks/gpu_check.py generate
part demo 75 $PY train.py --output-dir "${TMPDIR:-/tmp}/dpo-gpu-demo" --overwrite --no-progress
part profile 40 $PY benchmarks/gpu_check.py profile
tail -n 25 "$REPORT/demo.log" >> "$REPORT/summary.txt"
$PY - "$REPORT/results.jsonl" <<'PYEOF' | tee -a "$REPORT/summary.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("part") in ("phi2", "lora"):
        if "error" in r:
            print(f"{r['part']:5} {r['layout']:13} {r['precision']:4} gc={r['gradient_checkpointing']!s:5} {r['error']}")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{r['part']:5} {r['layout']:13} {r['precision']:4} gc={r['gradient_checkpointing']!s:5} "
              f"step {sum(r['step_s'][1:]) / len(r['step_s'][1:]):6.2f} s  {r['tokens_per_s']:9.0f} tok/s  "
              f"MFU {mfu}  peak {r['peak_memory_gb']:6.1f} GB  reference pass {r['reference_pass_s']} s")
    elif r.get("part") == "generate":
        print(f"generate {r['model']:28} {r['tokens_per_s']:9.0f} new tok/s ({r['rows']} rows x {r['new_tokens']})")
    elif r.get("part") == "equality":
        print(f"equality {r['precision']:4} loss diff {r['loss_abs_diff']:.2e}  log-prob rel diff "
              f"{r['logps_max_rel_diff']:.2e}  grad rel error {r['grad_rel_error']:.2e}  cosine {r['grad_cosine']:.6f}")
PYEOF

#!/usr/bin/env bash
# FlowServe A/B in one device call: a baseline engine against the working tree's, same model,
# same machine, runs alternating (base, new, base, new, ...) so that drift hits both sides.
#   git archive BASE_COMMIT platform/deepflow/__init__.py platform/deepflow/engine bench \
#     | tar -x -C .ab_base              # here, beforehand (.ab_base ignored via .git/info/exclude;
#                                       #  name it in the device call's `carry`)
#   bash bench/engine_ab.sh [ROUNDS [SECONDS]]   # on the device (default 2 rounds; results
#                                                #  under $OUT)
# Each side runs its own bench/engine_throughput.py --systems flowserve (the 1b test model, 256
# requests x 256 + 256 tokens, then batch-1 latency) with PYTHONPATH at its own platform/.
# Rounds after the first start only while the last round's length still fits in SECONDS
# (default 480), so a short lease still brings back whole rounds; then the decode-graph device
# test (tests/engine/test_decode_graphs_device.py) if time is left.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/flowserve-ab}
ROUNDS=${1:-2}
BUDGET=${2:-480}
BASE=${BASE:-.ab_base}
MODEL=/tmp/flowserve-llama-1b
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  [ -f "$BASE/platform/deepflow/engine/llm_engine.py" ] || { echo "no baseline engine under $BASE"; exit 1; }
  start=$SECONDS
  PYTHONPATH=platform python3 -c "from deepflow.engine.testmodel import make_test_model; make_test_model('$MODEL', 'llama', '1b')" || exit 1
  echo "built the 1b test model in $((SECONDS - start)) s"
  round_s=0
  for round in $(seq 1 "$ROUNDS"); do
    if [ "$round" -gt 1 ] && [ $((SECONDS + round_s)) -gt "$BUDGET" ]; then
      echo "no time for round $round"; break
    fi
    round_start=$SECONDS
    for side in base new; do
      root=.
      [ "$side" = base ] && root=$BASE
      start=$SECONDS
      PYTHONPATH="$root/platform" python3 "$root/bench/engine_throughput.py" --model "$MODEL" \
        --systems flowserve --timeout 240 --out "$OUT/$side-$round.json"
      echo "$side, round $round: $((SECONDS - start)) s"
    done
    round_s=$((SECONDS - round_start))
  done
  python3 bench/engine_ab.py "$OUT"
  left=$((BUDGET - SECONDS))
  if [ "$left" -gt 30 ]; then
    PYTHONPATH=platform timeout "$left" python3 -m pytest -q -p no:cacheprovider \
      --confcutdir=tests/engine -W ignore::pytest.PytestConfigWarning \
      tests/engine/test_decode_graphs_device.py
  else
    echo "no time for the decode-graph device test"
  fi
} 2>&1 | tee "$OUT/log.txt"

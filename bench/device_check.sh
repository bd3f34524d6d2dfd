#!/usr/bin/env bash
# Everything FlowServe's fast path needs checked on the accelerator, in one device call:
#   bash bench/device_check.sh [checks|bench|all]      (default all; results under $OUT)
# Runs on the device machine's own python3 with nothing installed (PYTHONPATH=platform).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=platform TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/flowserve-check}
WHAT=${1:-all}
PROFILE=${PROFILE:-}  # PROFILE=--no-profile skips the decode-step profile
SYSTEMS=${SYSTEMS:-flowserve,hf_static,hf_compiled,hf_cb}  # bench rows (engine_throughput.py)
MODEL=/tmp/flowserve-llama-1b
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "
import sys
import deepflow.engine, deepflow.engine.model_runner, deepflow.engine.llm_engine, deepflow.engine.async_engine
web = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'pydantic', 'prefect', 'celery', 'sqlalchemy')]
print('deepflow.engine imports with PYTHONPATH=platform; platform-only modules loaded:', web)
" || exit 1
  start=$SECONDS
  python3 -c "from deepflow.engine.testmodel import make_test_model; make_test_model('$MODEL', 'llama', '1b')" || exit 1
  echo "built the 1b test model in $((SECONDS - start)) s"
  if [ "$WHAT" != checks ]; then
    python3 bench/engine_throughput.py --model "$MODEL" --systems "$SYSTEMS" --timeout 200 --profile-host \
      --out "$OUT/bench.json"
  fi
  if [ "$WHAT" != bench ]; then
    timeout 200 python3 bench/device_check.py --model "$MODEL" $PROFILE
    # The kernel tests compiled, and the decode graphs replayed against eager steps (the root
    # conftest needs the platform's packages: cut it off).
    timeout 300 python3 -m pytest -q -x -p no:cacheprovider --confcutdir=tests/engine \
      -W ignore::pytest.PytestConfigWarning tests/engine/test_kernels.py tests/engine/test_gemv.py \
      tests/engine/test_overlap.py tests/engine/test_decode_graphs_device.py
  fi
} 2>&1 | tee "$OUT/log.txt"

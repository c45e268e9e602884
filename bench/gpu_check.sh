#!/usr/bin/env bash
# GPU check, for a lent GPU machine (run from the repository root). Installs what that machine
# lacks from wheels carried in .whl/ (see DEVELOPERS.md), then runs bench/gpu_check.py.
#   device run: bash bench/gpu_check.sh      (carry: .whl, and coco-photos: ~1,000 COCO photos copied
#   into that ignored folder from ../shared/data, for the real-photo throughput; issue 22)
set -uo pipefail
export PYTHONUNBUFFERED=1
site=/tmp/sat-site
mkdir -p "$site"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
ln -sfn "$PWD/plugins" "$site/sat_cli_plugins"   # what pip install -e maps
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
python3 bench/gpu_check.py --out "$out" 2>&1 | tee "$out/gpu_check.log"
rc="${PIPESTATUS[0]}"
# issue 22: the rerun figures with the model on CUDA (small and big parts; the 100k tree is CPU-bound)
if [ -d ../shared/data ]; then
  python3 bench/rerun_bench.py --device cuda --only small,big --photos 235 2>&1 | tee "$out/rerun_bench.log"
fi
exit "$rc"

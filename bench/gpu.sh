#!/usr/bin/env bash
# The GPU figures of issue 20 in ONE device call (<= 10 minutes on a bare machine with CPython 3.12 and no network),
# in the order that keeps the most important ones if the call is cut off: gpu-marked tests, bench/shapes.py,
# bench/engine.py on both bundles, bench/http.py, bench/memory.py (the step limits sum to 585 s; --cpu multiplies
# them by CPU_SCALE, default 4). Writes under $OUT (at most 8 files come back):
#   results.jsonl   one line per step: {"step", "rc", "seconds", "figures": the step's --json object or null}
#   log.txt         every step's output
#   http_results.md the HTTP tables (bench/http.py's results.md)
#   card.txt        nvidia-smi -L and the installed onnxruntime's providers
#
#   bash bench/gpu.sh --stage   on the device: keep the carried .gpu/ort/part-* on the machine (see bench/gpu_prep.sh)
#   bash bench/gpu.sh           on the device: install the carried wheels and wrk into /tmp, then run every step
#   bash bench/gpu.sh --cpu     here: the same steps with .venv and the CPU provider (proves the script end to end)
# Nothing is downloaded here: bench/gpu_prep.sh fetched everything beforehand.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --stage) mkdir -p /tmp/mixinfer-gpu/ort && cp -v .gpu/ort/part-* /tmp/mixinfer-gpu/ort/; exit $? ;;
  "") ;;
  *) echo "usage: $0 [--cpu|--stage]" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/gpu-$MODE}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
: > "$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)

MNIST=$(ls -d model_store/mnist-mixup/*/manifest.json | xargs -n1 dirname | sort -t/ -k3 -n | tail -n 1)  # served: highest with a manifest
RESNET=runs/bench/store/resnet18-bench/1
SCALE=1
if [[ $MODE == gpu ]]; then
  PY=python3
  PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
  TORCH_DEVICE=cuda
  THREADS=8
  RESNET_ENGINE=(--repeats 3 --batches 1,16,64 --reference-images 8)
  SHAPES_BUNDLES=("$MNIST" "$RESNET")
  mkdir -p /tmp/mixinfer-gpu/ort
  cp .gpu/ort/part-* /tmp/mixinfer-gpu/ort/ 2>/dev/null
  wheel=/tmp/mixinfer-gpu/$(awk '{print $2}' .gpu/ort.sha256)
  cat /tmp/mixinfer-gpu/ort/part-* > "$wheel"
  (cd /tmp/mixinfer-gpu && sha256sum -c "$OLDPWD/.gpu/ort.sha256") >> "$OUT/log.txt" 2>&1 \
    || { echo "onnxruntime-gpu parts missing or corrupt: stage every part first" | tee -a "$OUT/log.txt"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/whl/*.whl "$wheel" >> "$OUT/log.txt" 2>&1 || { echo "wheel install failed" | tee -a "$OUT/log.txt"; exit 1; }
  export PYTHONPATH=$PWD:/tmp/site
  # CUDA and cuDNN come from the image's nvidia-* Python packages (the ones torch uses)
  nvlibs=$($PY -c 'import glob, site; print(":".join(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/*/lib"))))')
  export LD_LIBRARY_PATH=${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  for deb in .gpu/deb/*.deb; do dpkg -x "$deb" /tmp/wrk-root; done
  export PATH=/tmp/wrk-root/usr/bin:$PATH
  export LD_LIBRARY_PATH=/tmp/wrk-root/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH
  nvidia-smi -L > "$OUT/card.txt" 2>&1
else
  PY=.venv/bin/python
  PROVIDERS=CPUExecutionProvider
  TORCH_DEVICE=cpu
  THREADS=$(nproc)
  SCALE=${CPU_SCALE:-4}  # a 2-core CPU runs the ResNet-18 steps far slower than a GPU
  RESNET_ENGINE=(--repeats 1 --batches 1 --reference-images 1 --min-seconds 0.1)  # proves the step, not a figure
  SHAPES_BUNDLES=("$MNIST")  # ResNet-18 static-shape calls take seconds each on a CPU
  echo "cpu run on $(nproc) cores" > "$OUT/card.txt"
fi
$PY -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())' >> "$OUT/card.txt" 2>&1
if [ "$MODE" != cpu ] && ! $PY -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
  echo "FATAL: onnxruntime offers no CUDAExecutionProvider: the gpu tests would only skip and every figure would be CPU's" | tee -a "$OUT/log.txt"
  exit 3
fi
echo "setup: $(( $(date +%s) - T0 )) s" | tee -a "$OUT/log.txt"

# step NAME TIMEOUT_S CMD...: run it, keep its output, record rc, seconds and its last-line JSON (if any)
step() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s) tmp
  tmp=$(mktemp)
  echo "=== $name: $*" >> "$OUT/log.txt"
  timeout --kill-after=10 $(( limit * SCALE )) "$@" > "$tmp" 2>> "$OUT/log.txt"
  local rc=$?
  cat "$tmp" >> "$OUT/log.txt"
  $PY - "$name" "$rc" "$(( $(date +%s) - t ))" "$tmp" >> "$OUT/results.jsonl" <<'PYEOF'
import json, sys
name, rc, seconds, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = [ln for ln in open(path, encoding="utf-8", errors="replace").read().splitlines() if ln.strip()]
try:
    figures = json.loads(lines[-1]) if lines else None
except json.JSONDecodeError:
    figures = None
print(json.dumps({"step": name, "rc": rc, "seconds": seconds, "figures": figures}))
PYEOF
  rm -f "$tmp"
  echo "$name: rc $rc, $(( $(date +%s) - t )) s (total $(( $(date +%s) - T0 )) s)" | tee -a "$OUT/log.txt"
}

step gpu_tests 60 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu
step throughput_bundle 75 $PY bench/throughput_bundle.py
step shapes 60 $PY bench/shapes.py --providers $PROVIDERS --bundle "${SHAPES_BUNDLES[@]}" --seconds 0.5 --json
step engine_mnist 60 $PY bench/engine.py --providers $PROVIDERS --torch-device $TORCH_DEVICE --threads $THREADS \
  --repeats 3 --batches 1,16,64,256 --json
step engine_resnet 75 $PY bench/engine.py --bundle $RESNET --providers $PROVIDERS --torch-device $TORCH_DEVICE \
  --threads $THREADS "${RESNET_ENGINE[@]}" --json
# the throughput bundle first, alone: its http_vs_naive (>= 2x on a GPU) is the figure a cut-off run must not lose
step http_throughput 110 $PY bench/http.py --providers $PROVIDERS --bundles throughput --no-open-loop --duration 3 \
  --throughput-factor 1 --warmup 2 --connections 1,32,64 --out "$OUT/http_throughput.md" --json
step http_default 100 $PY bench/http.py --providers $PROVIDERS --bundles default --duration 3 --warmup 2 \
  --connections 1,32,64 --open-loop-duration 2 --out "$OUT/http_results.md" --json
step memory 45 $PY bench/memory.py --providers $PROVIDERS --bundle $MNIST $RESNET --json
echo "total: $(( $(date +%s) - T0 )) s" | tee -a "$OUT/log.txt"

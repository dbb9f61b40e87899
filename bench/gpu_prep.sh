#!/usr/bin/env bash
# Prepare, on a machine with network, what bench/gpu.sh carries to a bare GPU machine (CPython 3.12, no network):
#   .gpu/whl/   the server's dependencies that the device image lacks, as locked in deploy/requirements/gpu.txt
#               (cp312 manylinux wheels, no onnxruntime-gpu)
#   .gpu/ort/   onnxruntime-gpu split into parts of PART_MIB (its wheel is ~250 MB, over the 64 MiB a device call
#               carries: each part travels in its own call and `bench/gpu.sh --stage` keeps it on the warm machine)
#   .gpu/deb/   wrk and the LuaJIT library it links, as Debian .debs (unpacked into /tmp there, never into /)
# Usage: bench/gpu_prep.sh   (prints what each device call must carry and its size)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu
PART_MIB=${PART_MIB:-48}
PY=${PYTHON:-.venv/bin/python}
LOCK=deploy/requirements/gpu.txt
# The device image (docs: /work/.library/device/KINDS.md) has numpy, onnx, pillow, prometheus-client, anyio, click,
# uvloop and torch; these it lacks or may hold in older versions than the lock's (small, so carried anyway):
NEED=(annotated-types fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
      uvicorn httptools orjson python-multipart tritonclient python-rapidjson grpcio grpcio-status
      googleapis-common-protos protobuf opentelemetry-api annotated-doc anyio typing-extensions h11 click idna)
PLATFORMS=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
pins=()
for name in "${NEED[@]}"; do
  pin=$(grep -E "^${name}==" "$LOCK" | cut -d' ' -f1)
  [[ -n $pin ]] || { echo "no pin for $name in $LOCK" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf "$DEST"
mkdir -p "$DEST/whl" "$DEST/ort" "$DEST/deb"
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$1" "${@:2}"
}
download "$DEST/whl" "${pins[@]}"
ort_pin=$(grep -E "^onnxruntime-gpu==" "$LOCK" | cut -d' ' -f1)
download "$DEST/ort" "$ort_pin"
wheel=$(cd "$DEST/ort" && ls onnxruntime_gpu-*.whl)
(cd "$DEST/ort" && sha256sum "$wheel" > ../ort.sha256 && split -b "${PART_MIB}M" -d -a 2 "$wheel" part- && rm "$wheel")
(cd "$DEST/deb" && apt-get download wrk libluajit2-5.1-2 libluajit2-5.1-common >/dev/null)
echo "prepared $DEST:"
du -sh "$DEST"/whl "$DEST"/deb "$DEST"/ort/part-* | sed 's/^/  /'
tree_mib=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f", $1/1048576}')
echo "tracked tree: ${tree_mib} MiB (travels with every call; each call carries at most 64 MiB in all)"
parts=("$DEST"/ort/part-*)
last=$(( ${#parts[@]} - 1 ))
echo "device calls, back to back while the machine stays warm:"
for i in $(seq 0 $(( last - 1 ))); do
  echo "  run(command='bash bench/gpu.sh --stage', carry=['${parts[$i]}'], timeout_s=120)"
done
echo "  run(command='bash bench/gpu.sh', carry=['$DEST/whl', '$DEST/deb', '$DEST/ort.sha256', '${parts[$last]}'], timeout_s=600)"

#!/usr/bin/env bash
# Every GPU check the README reports, in one run, for a machine with a GPU (each step has its
# own time limit, 20 minutes in all). Each benchmark's stdout goes to OUT/<name>.stdout, its stderr
# to OUT/<name>.log, and its JSON line (stdout's last) to OUT/<name>.json.
#
#   benchmarks/gpu_checks.sh OUT [CKPT]      # CKPT: a trained checkpoint (make train's best.ckpt)
#                                            # for the scene side by side; default: a fresh network
#   CHECKS="scene" benchmarks/gpu_checks.sh OUT CKPT   # only the checks named (space-separated)
#
# On a machine whose Python has torch and Lightning but not changecam's other dependencies, put
# their wheels in .whl/ first (on a machine with the package index, for the GPU machine's Python):
#   pip download --dest .whl --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     hydra-core==1.3.8 omegaconf==2.3.1 rasterio==1.4.4 affine cligj click-plugins shapely==2.2.0 \
#     captum==0.9.0 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types typing-inspection simsimd stringzilla
#   pip wheel --no-deps --wheel-dir .whl antlr4-python3-runtime==4.9.3    # sdist only
# and this script installs them beside the machine's own packages.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_checks.sh OUT [CKPT]}
ckpt=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # both taken relative to where the script is started, before the cd
if [ -n "$ckpt" ]; then ckpt=$(cd "$(dirname "$ckpt")" && pwd)/$(basename "$ckpt"); fi
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
if compgen -G ".whl/*.whl" > /dev/null; then
    site=${TMPDIR:-/tmp}/changecam-site
    "$python" -m pip install --quiet --no-deps --no-index --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "import torch; assert torch.cuda.is_available(), 'no GPU: these are the GPU checks'" \
    || exit 1

status=0
check() {  # name, timeout in seconds, script and arguments
    local name=$1 limit=$2
    shift 2
    if [ -n "${CHECKS:-}" ] && [[ " $CHECKS " != *" $name "* ]]; then
        return 0  # not asked for
    fi
    local started=$SECONDS
    # the JSON line is the last line of stdout; stderr (warnings, progress) goes to the log alone
    timeout "$limit" "$python" "$@" > "$out/$name.stdout" 2> "$out/$name.log"
    local rc=$?
    tail -n 1 "$out/$name.stdout" > "$out/$name.json"
    echo "$name: exit $rc in $((SECONDS - started)) s: $(cut -c 1-300 "$out/$name.json")"
    [ "$rc" -eq 0 ] || status=1
}

check gpu_precision 180 benchmarks/gpu_precision.py
check cam_work 120 benchmarks/cam_work.py --width 32 --repeats 5
check full_scale_inline 180 benchmarks/full_scale.py --train-batches 10 --val-batches 5 \
    --override callbacks.cam_panels.mode=inline
check full_scale_background_gpu 240 benchmarks/full_scale.py --train-batches 10 --val-batches 5 \
    --override callbacks.cam_panels.mode=background callbacks.cam_panels.worker_device=training
check scene 240 benchmarks/scene.py --side-by-side-only --repeats 5 ${ckpt:+--weights "$ckpt"}
# where the GeoTIFF path's time goes on the GPU, thread by thread; then again with a 0.5 ms GIL
# switch interval (does the network's thread queue for the GIL behind the others?)
check scene_timeline 120 benchmarks/scene_timeline.py ${ckpt:+--weights "$ckpt"}
check scene_timeline_switch 120 benchmarks/scene_timeline.py --switch-interval 0.0005 \
    ${ckpt:+--weights "$ckpt"}
exit $status

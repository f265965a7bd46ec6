#!/usr/bin/env bash
# The main job on the embedded default: start the local stack (embedded Redis,
# local-directory store, one worker per queue), index a folder of real photos,
# search by one of them, print the ranked results, stop everything.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PHOTOS=${PHOTOS:-../shared/data/photos}
export PUPYL_DATA_DIR=${PUPYL_DATA_DIR:-$(mktemp -d)/pupyl-queue}
export KERAS_HOME=${KERAS_HOME:-$PUPYL_DATA_DIR/keras}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p "$PUPYL_DATA_DIR"
[ -d "$PHOTOS" ] || { echo "no photo folder at $PHOTOS: run 'make demo PHOTOS=/some/folder'" >&2; exit 2; }

# Weights: Keras fetches MobileNet's ImageNet weights on first use. On a machine
# without internet, the pretrained MobileNet 0.25 in ../shared/data/models is used
# instead, as the collection's own model (see README, "Weights offline").
SHARED_H5=${SHARED_H5:-../shared/data/models/mobilenet_2_5_224_tf_no_top.h5}
if [ -z "${PUPYL_WEIGHTS:-}${PUPYL_MODEL:-}" ] && [ -f "$SHARED_H5" ]; then
  export PUPYL_MODEL="$PUPYL_DATA_DIR/mobilenet025.keras"
  "$PY" -c "from pupyl_queue.models import wrap_mobilenet; wrap_mobilenet('$SHARED_H5', '$PUPYL_MODEL', alpha=0.25)" 2>/dev/null
  echo "weights: $SHARED_H5 (as own model $PUPYL_MODEL)"
fi

"$PY" -m pupyl_queue.cli up &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 300); do [ -f "$PUPYL_DATA_DIR/stack.json" ] && break; sleep 0.2; done
[ -f "$PUPYL_DATA_DIR/stack.json" ] || { echo "the stack did not start; see $PUPYL_DATA_DIR/logs" >&2; exit 1; }

"$PY" -m pupyl_queue.cli index "$PHOTOS" --wait || true
QUERY=${QUERY:-$(find "$PHOTOS" -type f -iname '*cat*' | sort | head -n 1)}
echo "query: $QUERY"
"$PY" -m pupyl_queue.cli search "$QUERY" --top 5 --metadata

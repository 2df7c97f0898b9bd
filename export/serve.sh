#!/usr/bin/env bash
# Serve msdn-tf exports with TensorFlow Serving in Docker: gRPC on 8500, REST on 8501.
#
#   export/serve.sh                         # uses export/models.config
#   MODEL_CONFIG=export/models.config IMAGE=tensorflow/serving:2.19.0 export/serve.sh
#
# Needs docker. Where docker is unavailable, run the local TEST DOUBLE instead (NOT TF Serving):
#   python -m msdn_tf.serve_local --model_base_path export/models/msdn_cub \
#       --model_name msdn_cub --port 8500 --rest_api_port 8501
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODELS_DIR="${MODELS_DIR:-$HERE/models}"
MODEL_CONFIG="${MODEL_CONFIG:-$HERE/models.config}"
IMAGE="${IMAGE:-tensorflow/serving}"
MAX_MESSAGE_BYTES="${MAX_MESSAGE_BYTES:-268435456}"   # 256 MiB: a CUB batch of 64 (196x2048 float32) is ~103 MB

if [ ! -d "$MODELS_DIR" ]; then
  echo "error: $MODELS_DIR not found; export a model first (python -m msdn_tf.export --run RUN --out $MODELS_DIR/msdn_cub)" >&2
  exit 2
fi

exec docker run --rm -p 8500:8500 -p 8501:8501 \
  --mount "type=bind,source=$MODELS_DIR,target=/models,readonly" \
  --mount "type=bind,source=$MODEL_CONFIG,target=/models.config,readonly" \
  "$IMAGE" \
  --port=8500 --rest_api_port=8501 \
  --model_config_file=/models.config \
  --model_config_file_poll_wait_seconds=60 \
  --grpc_max_threads=8 \
  --grpc_channel_arguments="grpc.max_receive_message_length=${MAX_MESSAGE_BYTES},grpc.max_send_message_length=${MAX_MESSAGE_BYTES}"

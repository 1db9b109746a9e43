#!/usr/bin/env bash
# Pin the ModelApp to the image digest CI just pushed, then wait for the operator's rollout.
# This patch is the only thing CI does to the cluster; the operator does the rest.
#
#   APP_NAME, NAMESPACE   the ModelApp
#   IMAGE_DIGEST          sha256:... (from build-push.sh)
#   IMAGE_REPOSITORY      optional: also set spec.image.repository
#   AKS_RESOURCE_GROUP, AKS_NAME   optional: fetch cluster credentials with the Azure CLI (aks-kubeconfig.sh)
#   WAIT_TIMEOUT          seconds to wait for Ready (default 600; 0: do not wait)
#   KUBECONFIG            used as is when AKS_NAME is not set
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${APP_NAME:?set APP_NAME}" "${NAMESPACE:?set NAMESPACE}" "${IMAGE_DIGEST:?set IMAGE_DIGEST}"
modelapp=$(command -v modelapp || echo .venv/bin/modelapp)

# shellcheck source=deploy/pipeline/aks-kubeconfig.sh
source deploy/pipeline/aks-kubeconfig.sh

repository=()
if [[ -n ${IMAGE_REPOSITORY:-} ]]; then
  repository=(--repository "$IMAGE_REPOSITORY")
fi
"$modelapp" set-image "$APP_NAME" --namespace "$NAMESPACE" --digest "$IMAGE_DIGEST" "${repository[@]}" --output json
if (( ${WAIT_TIMEOUT:-600} > 0 )); then
  "$modelapp" wait "$APP_NAME" --namespace "$NAMESPACE" --digest "$IMAGE_DIGEST" --timeout "${WAIT_TIMEOUT:-600}" \
    --output json --no-progress
fi

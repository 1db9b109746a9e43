#!/usr/bin/env bash
# Publish a model file to Blob Storage (modelapp publish-model) and, optionally, pin a ModelApp to it.
# The model pipeline (azure-pipelines-model.yml) and local runs use this same script.
#
#   MODEL_FILE                       the model file (.onnx, .skops)
#   MODEL_CONTAINER, MODEL_BLOB      where it goes
#   STORAGE_ACCOUNT_URL              https://<account>.blob.core.windows.net (Entra ID: the step's az login)
#   AZURE_STORAGE_CONNECTION_STRING  instead of STORAGE_ACCOUNT_URL (local runs, Azurite)
#   OVERWRITE                        true to replace a different model at that name
#   PIN_APP_NAME, NAMESPACE          optional: pin this ModelApp to the published version (set-model)
#   AKS_RESOURCE_GROUP, AKS_NAME     optional, with PIN_APP_NAME: cluster credentials from the Azure CLI
#
# Sets the pipeline output variables modelVersion (the ETag) and modelSha256.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MODEL_FILE:?set MODEL_FILE}" "${MODEL_CONTAINER:?set MODEL_CONTAINER}" "${MODEL_BLOB:?set MODEL_BLOB}"
modelapp=$(command -v modelapp || echo .venv/bin/modelapp)
python=$(command -v python3)

options=(--container "$MODEL_CONTAINER" --blob "$MODEL_BLOB" --output json --no-progress)
if [[ -n ${STORAGE_ACCOUNT_URL:-} ]]; then
  options+=(--account-url "$STORAGE_ACCOUNT_URL")
fi
if [[ ${OVERWRITE:-false} == true ]]; then
  options+=(--overwrite)
fi
result=$("$modelapp" publish-model "$MODEL_FILE" "${options[@]}")
echo "$result"
etag=$("$python" -c 'import json, sys; print(json.load(sys.stdin)["etag"])' <<<"$result")
sha256=$("$python" -c 'import json, sys; print(json.load(sys.stdin)["sha256"])' <<<"$result")
echo "##vso[task.setvariable variable=modelVersion;isOutput=true]$etag"
echo "##vso[task.setvariable variable=modelSha256;isOutput=true]$sha256"

if [[ -n ${PIN_APP_NAME:-} ]]; then
  # shellcheck source=deploy/pipeline/aks-kubeconfig.sh
  source deploy/pipeline/aks-kubeconfig.sh
  "$modelapp" set-model "$PIN_APP_NAME" --namespace "${NAMESPACE:?set NAMESPACE}" --version "$etag" \
    --sha256 "$sha256" --output json
fi

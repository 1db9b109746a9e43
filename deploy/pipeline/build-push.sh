#!/usr/bin/env bash
# Build one image with buildah, push it, and record its digest. The pipeline and the local tests
# (tests/cluster/test_pipeline_steps.py) run this same script; only the environment differs.
#
#   IMAGE_REPOSITORY    registry host and path, e.g. myregistry.azurecr.io/modelapp/iris-server
#   IMAGE_TAG           tag to push; in CI $(Build.BuildId)
#   DOCKERFILE          default Dockerfile.app
#   BUILD_CONTEXT       default: the repository root
#   DIGEST_FILE         where the pushed digest is written (default: image-digest.txt)
#   BASE_IMAGE          optional: the Dockerfile's BASE_IMAGE build argument (default: the Dockerfile's own,
#                       python:3.11-slim); the local stack passes its Debian base (modelapp_localstack/images.py)
#   BUILD_OPTIONS       optional extra `buildah bud` options, e.g. --pull=never and read-only --volume mounts
#                       of the machine's CA bundle and pip configuration (never baked into the image)
#   ACR_NAME            optional: log in to this ACR with the Azure CLI's identity first (AzureCLI@2 step)
#   BUILDAH_OPTIONS     optional global buildah options, e.g. a storage root and --storage-driver=vfs
#   REGISTRY_AUTH_FILE  optional credentials file (buildah's own variable)
#   REGISTRY_CERT_DIR   optional folder with the CA of a private registry (ca.crt)
#
# Prints `pushed <image>@<digest>` and sets the pipeline output variable imageDigest.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${IMAGE_REPOSITORY:?set IMAGE_REPOSITORY (registry host and path)}"
: "${IMAGE_TAG:?set IMAGE_TAG (in CI the build id)}"
dockerfile=${DOCKERFILE:-Dockerfile.app}
context=${BUILD_CONTEXT:-.}
digest_file=${DIGEST_FILE:-image-digest.txt}
read -r -a buildah_options <<<"${BUILDAH_OPTIONS:-}"
buildah=(buildah "${buildah_options[@]}")
image="$IMAGE_REPOSITORY:$IMAGE_TAG"

if [[ -n ${ACR_NAME:-} ]]; then
  # An ACR refresh token for the pipeline's identity; the fixed user name is ACR's convention for tokens.
  az acr login --name "$ACR_NAME" --expose-token --output tsv --query accessToken \
    | "${buildah[@]}" login --username 00000000-0000-0000-0000-000000000000 --password-stdin "${IMAGE_REPOSITORY%%/*}"
fi

build_options=()
if [[ -n ${BASE_IMAGE:-} ]]; then
  build_options+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
read -r -a extra_build_options <<<"${BUILD_OPTIONS:-}"
build_options+=("${extra_build_options[@]}")

started=$SECONDS
"${buildah[@]}" bud --isolation=chroot --layers=false "${build_options[@]}" --file "$dockerfile" --tag "$image" "$context"
push_options=(--digestfile "$digest_file")
if [[ -n ${REGISTRY_CERT_DIR:-} ]]; then
  push_options+=(--cert-dir "$REGISTRY_CERT_DIR")
fi
"${buildah[@]}" push "${push_options[@]}" "$image" "docker://$image"
digest=$(<"$digest_file")
if [[ ! $digest =~ ^sha256:[a-f0-9]{64}$ ]]; then
  echo "build-push: unexpected digest '$digest' in $digest_file" >&2
  exit 1
fi
echo "pushed $image@$digest in $((SECONDS - started))s"
echo "##vso[task.setvariable variable=imageDigest;isOutput=true]$digest"

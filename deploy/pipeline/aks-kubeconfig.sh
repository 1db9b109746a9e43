# Sourced by set-image.sh and publish-model.sh: with AKS_NAME set, fetch the cluster's kubeconfig
# with the Azure CLI login of the current (AzureCLI@2) step and export KUBECONFIG; else keep KUBECONFIG.
if [[ -n ${AKS_NAME:-} ]]; then
  export KUBECONFIG="${AGENT_TEMPDIRECTORY:-$(mktemp -d)}/kubeconfig"
  az aks get-credentials --resource-group "${AKS_RESOURCE_GROUP:?set AKS_RESOURCE_GROUP}" --name "$AKS_NAME" \
    --file "$KUBECONFIG" --overwrite-existing --only-show-errors
  # Entra ID clusters: kubelogin (run by the modelapp CLI as an exec plugin) reuses this az login.
  command -v kubelogin >/dev/null || az aks install-cli --only-show-errors >/dev/null
  kubelogin convert-kubeconfig --login azurecli --kubeconfig "$KUBECONFIG"
fi

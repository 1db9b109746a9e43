"""A reconcile's reads of the cluster: the ModelApp's newest copy, its children (from the watch where it can
be trusted), and the pods of a rollout that is not complete. Apart from reconciler.py only for its size."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from modelapp_operator.api.modelapp_types import ModelApp
from modelapp_operator.clients.kube import KubeClient, KubeError
from modelapp_operator.names import API_VERSION, KIND
from modelapp_operator.plan.pods import PodDiagnosis, diagnose_pods, needs_pod_check, pod_selector, pods_needing_events
from modelapp_operator.reconcile.deps import Dependencies
from modelapp_operator.watch.keys import AppKey

_log = logging.getLogger(__name__)


async def read_modelapp(deps: Dependencies, key: AppKey, *, fresh: bool = False) -> Mapping[str, Any] | None:
    """The newest copy of the ModelApp: the watch's, or a GET when there is none or `fresh` is asked."""
    modelapps = deps.state.modelapps
    cached = None if fresh else modelapps.get(key)
    if cached is not None:
        return cached
    body = await deps.clients.kube.get(API_VERSION, KIND, *key)
    if body is None:
        modelapps.forget(key)
        return None
    modelapps.observe(key, body)
    return modelapps.get(key)


async def read_child(deps: Dependencies, api_version: str, kind: str, key: AppKey) -> Mapping[str, Any] | None:
    """The child as the watch saw it, or a GET when there is no watch or it cannot be trusted.

    The watch sees only objects labelled as ours. A child it does not know is created without
    force (`_apply`): an unlabelled object of someone else's under that name makes that apply
    conflict instead of being changed, and the next read of that name GETs it (a name conflict)."""
    children = deps.state.children
    if children.enabled and children.trusted(kind, *key):
        return children.get(kind, *key)
    return await deps.clients.kube.get(api_version, kind, *key)


async def pod_diagnosis(kube: KubeClient, app: ModelApp, deployment: Mapping[str, Any] | None) -> PodDiagnosis | None:
    """What the pods of the Deployment's pair show; they are listed only while its rollout is not
    complete, and the events of a few restarted pods are read only when their exit alone cannot say
    why (a probe's kill). A failed read is logged and ignored (the rollout verdict does not need it)."""
    if deployment is None or not needs_pod_check(deployment, app.spec.replicas):
        return None
    selector = pod_selector(deployment)
    if selector is None:
        return None
    try:
        pods = await kube.list_pods(app.namespace, selector)
        events = {
            name: await kube.list_pod_events(app.namespace, name) for name in pods_needing_events(deployment, pods)
        }
    except KubeError as error:
        _log.warning("%s/%s: cannot read the pods of the rollout: %s", app.namespace, app.name, error)
        return None
    return diagnose_pods(deployment, pods, events)

"""ModelApp's local stack: a real Kubernetes control plane (kwok nodes), Azurite and a registry.

Loopback only; every file and process lives in one run folder and goes away on stop.
"""

from .azurite import Azurite
from .buildah import Buildah
from .kube import KubeCluster
from .procs import StackError
from .registry import Registry
from .stack import Stack

__all__ = ["Azurite", "Buildah", "KubeCluster", "Registry", "Stack", "StackError"]

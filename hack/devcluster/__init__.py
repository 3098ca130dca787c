"""A local Kubernetes dev cluster without Docker: real etcd, kube-apiserver and kube-controller-manager
processes (:mod:`hack.devcluster.controlplane`) plus a node agent that runs pods as local processes.

Used by ``make cluster-up`` / ``python -m hack.devcluster`` and by the pytest fixtures in tests/kube_cluster.py.
"""

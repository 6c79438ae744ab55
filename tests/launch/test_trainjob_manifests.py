"""manifests/overlays/trainer-v2: what `kubectl apply -k manifests/overlays/trainer-v2`
applies (rendered by `kubectl kustomize`, as the README's commands do) validates like the
other overlays, and grants the launcher exactly what it calls for a TrainJob."""

from __future__ import annotations

from cnnflow.launch.validate import pod_specs, validate_documents

from .test_manifests import by_kind, render


def test_trainer_v2_overlay_renders_and_validates():
    docs = render("overlays/trainer-v2")
    assert validate_documents(docs) == len(docs)  # schemas, TrainJob rules, pod security
    kinds = by_kind(docs)
    assert not [k for k in kinds if k[0] == "PyTorchJob" or k[1] == "cnnflow-train-example"
                "-params"]  # no training operator on such a cluster
    job = kinds[("TrainJob", "cnnflow-trainjob-example")]
    # a reference to the runtime the Trainer installs, which the overlay does not ship
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    assert not [k for k in kinds if k[0] == "ClusterTrainingRuntime"]
    assert ("ConfigMap", "cnnflow-trainjob-example-params") in kinds
    assert all(d["metadata"].get("namespace") == "cnnflow" for d in docs
               if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"))
    for where, spec in pod_specs(job):
        (c,) = spec["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where


def test_trainer_v2_rbac_is_what_the_launcher_calls():
    kinds = by_kind(render("overlays/trainer-v2"))
    role = kinds[("Role", "cnnflow-launcher")]
    rules = {(r["apiGroups"][0], res): sorted(r["verbs"]) for r in role["rules"]
             for res in r["resources"]}
    assert rules == {
        ("trainer.kubeflow.org", "trainjobs"): ["create", "delete", "get", "list", "watch"],
        ("", "configmaps"): ["create", "delete"],
        ("", "pods"): ["get", "list"],
        ("", "pods/log"): ["get"],
    }
    cluster_role = kinds[("ClusterRole", "cnnflow-launcher-runtimes")]
    assert cluster_role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"],
                                      "resources": ["clustertrainingruntimes"],
                                      "verbs": ["get", "list"]}]
    for binding in (kinds[("RoleBinding", "cnnflow-launcher")],
                    kinds[("ClusterRoleBinding", "cnnflow-launcher-runtimes")]):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cnnflow-launcher",
                                        "namespace": "cnnflow"}]


def test_network_policies_select_the_training_pods_of_both_kinds():
    """The training policies select cnnflow's own pod labels, which the pod templates of
    both renderers carry: the TrainJob's (through runtimePatches) and the PyTorchJob's."""
    docs = by_kind(render("overlays/trainer-v2"))
    trainjob = next(d for (kind, _), d in docs.items() if kind == "TrainJob")
    patch = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod_labels = patch["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["labels"]
    base = by_kind(render("base"))
    job = next(d for (kind, _), d in base.items() if kind == "PyTorchJob")
    master_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    for name in ("training-peers", "training-egress"):
        selector = docs[("NetworkPolicy", name)]["spec"]["podSelector"]
        assert selector == base[("NetworkPolicy", name)]["spec"]["podSelector"]
        assert selector["matchLabels"].items() <= pod_labels.items(), name
        assert selector["matchLabels"].items() <= master_labels.items(), name

"""Validates Kubeflow Trainer v2 and JobSet objects offline, strictly.

    validate_crds.py RENDERED.yaml [--same RUNTIME.yaml JOBSET.yaml]

Each TrainJob and ClusterTrainingRuntime (trainer.kubeflow.org/v1alpha1, the API version pinned
here) and JobSet (jobset.x-k8s.io/v1alpha2) in RENDERED.yaml is parsed by the Trainer API's own
models (the kubeflow-trainer-api wheel: types, required fields, the Kubernetes pod spec inside).
Those models drop unknown fields silently, so every key of the input must also come back out of
the parsed model, recursively: a misspelt or misplaced field is an error naming its path. The
other documents are written to RENDERED.yaml.core for kubernetes-validate. With --same, the
runtime's replicated jobs must equal the JobSet's (but for the node count and the Trainer's
label), so that the two deployments cannot drift apart.
"""

import sys

import yaml
from kubeflow_trainer_api.models.jobset_v1alpha2_job_set import JobsetV1alpha2JobSet
from kubeflow_trainer_api.models.trainer_v1alpha1_cluster_training_runtime import (
    TrainerV1alpha1ClusterTrainingRuntime,
)
from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

MODELS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): TrainerV1alpha1TrainJob,
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): TrainerV1alpha1ClusterTrainingRuntime,
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): JobsetV1alpha2JobSet,
}
CUSTOM_GROUPS = ("trainer.kubeflow.org/", "jobset.x-k8s.io/")


def unknown_keys(given, parsed, path):
    """The paths of keys in `given` that the parsed model does not have."""
    out = []
    if isinstance(given, dict):
        if not isinstance(parsed, dict):
            return [f"{path}: an object where the schema has {type(parsed).__name__}"]
        for k, v in given.items():
            if k not in parsed:
                out.append(f"{path}.{k}: not a field of the schema")
            else:
                out += unknown_keys(v, parsed[k], f"{path}.{k}")
    elif isinstance(given, list):
        if not isinstance(parsed, list) or len(parsed) != len(given):
            return [f"{path}: a list where the schema has {type(parsed).__name__}"]
        for i, (g, p) in enumerate(zip(given, parsed)):
            out += unknown_keys(g, p, f"{path}[{i}]")
    return out


def validate(doc):
    """Errors of one custom resource (an empty list: valid)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    model = MODELS.get(key)
    if model is None:
        return [f"{key[1]} of {key[0]}: not a pinned API version ({', '.join(f'{k} {a}' for a, k in MODELS)})"]
    try:
        parsed = model.from_dict(doc).to_dict()
    except Exception as e:  # pydantic's ValidationError, with every field that is wrong
        return [f"{key[1]} {doc.get('metadata', {}).get('name')}: {e}"]
    return unknown_keys(doc, parsed, f"{key[1]} {doc['metadata']['name']}")


def same_replicated_jobs(runtime_path, jobset_path):
    runtime = yaml.safe_load(open(runtime_path))["spec"]["template"]["spec"]
    jobset = yaml.safe_load(open(jobset_path))["spec"]

    def normal(spec):
        jobs = []
        for rj in spec["replicatedJobs"]:
            rj = yaml.safe_load(yaml.safe_dump(rj))
            if rj["name"] == "node":
                rj.pop("replicas", None)
                labels = rj["template"].get("metadata", {}).get("labels", {})
                labels.pop("trainer.kubeflow.org/trainjob-ancestor-step", None)
                if not labels:
                    rj["template"].pop("metadata", None)
            jobs.append(rj)
        rest = {k: v for k, v in spec.items() if k != "replicatedJobs"}
        return jobs, rest

    if normal(runtime) != normal(jobset):
        return [f"{jobset_path}: its replicated jobs differ from the runtime's in {runtime_path}"]
    return []


def main():
    rendered = sys.argv[1]
    errors, core, checked = [], [], 0
    for doc in yaml.safe_load_all(open(rendered)):
        if not doc:
            continue
        if doc.get("apiVersion", "").startswith(CUSTOM_GROUPS):
            checked += 1
            errors += validate(doc)
        else:
            core.append(doc)
    if "--same" in sys.argv:
        i = sys.argv.index("--same")
        errors += same_replicated_jobs(sys.argv[i + 1], sys.argv[i + 2])
    with open(rendered + ".core", "w") as f:
        yaml.safe_dump_all(core, f)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print(f"validate_crds: {checked} Trainer / JobSet objects of {rendered.rsplit('/', 1)[-1]} are valid")


if __name__ == "__main__":
    main()

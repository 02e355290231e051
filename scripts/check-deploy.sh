#!/usr/bin/env bash
# Checks deploy/ without a cluster: the Dockerfile passes hadolint, every kustomize overlay builds (`kubectl kustomize`), its
# output validates against the Kubernetes API schemas offline (kubernetes-validate --strict,
# from scripts/fetch-test-tools.sh), and every flag and environment variable the manifests
# pass to `coordinator` and `worker` appears in that binary's --help. Then it checks that the
# checks can fail: a manifest with a schema error and one with an unknown flag are refused.
#
#   scripts/check-deploy.sh [BIN_DIR]     # BIN_DIR holds coordinator and worker (target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir=${1:-target/debug}
py=.cache/pytools/bin/python
k8s_version=1.32.0
command -v kubectl >/dev/null || { echo "check-deploy: kubectl is required (kubectl kustomize)" >&2; exit 1; }
[ -x "$py" ] || { echo "check-deploy: $py is missing: run scripts/fetch-test-tools.sh" >&2; exit 1; }
for b in coordinator worker; do
  [ -x "$bin_dir/$b" ] || { echo "check-deploy: $bin_dir/$b is missing: cargo build" >&2; exit 1; }
done
"${py%/python}/hadolint" --no-color deploy/Dockerfile
echo "check-deploy: deploy/Dockerfile passes hadolint"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r deploy/k8s deploy/kubeflow deploy/jobset "$tmp/"
# The token and TLS files are the user's (deploy/k8s/make-secrets.sh; kept out of git); any
# content renders the same manifests.
echo "placeholder-token-for-validation" > "$tmp/k8s/common/job-token.txt"
mkdir -p "$tmp/k8s/common/tls"
for f in ca.pem tls.crt tls.key; do echo "placeholder $f" > "$tmp/k8s/common/tls/$f"; done

# Flags and variables the manifests pass vs the binaries' --help. POD_IP only feeds
# $(POD_IP) in TANDEM_RING_ADVERTISE.
check_flags() {
  "$py" - "$bin_dir" "$1" <<'PY'
import json, re, subprocess, sys, yaml
bin_dir, rendered = sys.argv[1], sys.argv[2]
helper_only = {"POD_IP", "JOBSET_NAME"}
helps, bad, seen = {}, [], 0

def pod_specs(doc):
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind in ("Job", "Deployment", "StatefulSet"):
        yield spec["template"]["spec"]
    elif kind == "Pod":
        yield spec
    elif kind in ("JobSet", "ClusterTrainingRuntime"):
        js = spec if kind == "JobSet" else spec["template"]["spec"]
        for rj in js["replicatedJobs"]:
            yield rj["template"]["spec"]["template"]["spec"]

for doc in yaml.safe_load_all(open(rendered)):
  if not doc:
    continue
  for spec in pod_specs(doc):
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if not c.get("image", "").startswith("tandem"):
            continue  # a helper (the init container that reads the JobSet)
        exe = (c.get("command") or [None])[0]
        if exe not in ("coordinator", "worker"):
            bad.append(f"{doc['metadata']['name']}/{c['name']}: runs {exe!r}, not coordinator or worker")
            continue
        if exe not in helps:
            helps[exe] = subprocess.run([f"{bin_dir}/{exe}", "--help"], check=True, capture_output=True, text=True).stdout
        h = helps[exe]
        for a in c.get("args", []):
            if a.startswith("--"):
                seen += 1
                flag = a.split("=", 1)[0]
                if not re.search(r"(^|\s)" + re.escape(flag) + r"([\s,=<]|$)", h, re.M):
                    bad.append(f"{doc['metadata']['name']}/{c['name']}: {flag} is not in `{exe} --help`")
        for e in c.get("env", []):
            seen += 1
            if e["name"] not in helper_only and not re.search(r"\b" + re.escape(e["name"]) + r"\b", h):
                bad.append(f"{doc['metadata']['name']}/{c['name']}: ${e['name']} is not in `{exe} --help`")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
print(f"check-deploy: {seen} flags and variables of {rendered.rsplit('/', 1)[-1]} are in the binaries' --help")
PY
}

# Kubeflow Trainer v2 and JobSet: the custom resources parsed by the Trainer API's models, every
# key checked (scripts/validate_crds.py), the rest against the Kubernetes schemas; the runtime's
# replicated jobs and the JobSet's must be the same.
check_crds() {  # (chained: `set -e` does not hold inside a function called by `if`)
  kubectl kustomize "$tmp/$1" > "$tmp/$1.yaml" &&
    "$py" scripts/validate_crds.py "$tmp/$1.yaml" "${@:2}" &&
    "$py" -m kubernetes_validate --strict --quiet -k "$k8s_version" "$tmp/$1.yaml.core" &&
    check_flags "$tmp/$1.yaml"
}
check_crds kubeflow --same deploy/kubeflow/cluster-training-runtime.yaml deploy/jobset/jobset.yaml
check_crds jobset
echo "check-deploy: deploy/kubeflow and deploy/jobset validate (Trainer trainer.kubeflow.org/v1alpha1, JobSet v1alpha2)"
for broken in 's/numNodes: 2/numNodes: "two"/' 's/numNodes: 2/numNode: 2/'; do
  cp deploy/kubeflow/trainjob.yaml "$tmp/trainjob.yaml"
  sed "$broken" "$tmp/trainjob.yaml" > "$tmp/kubeflow/trainjob.yaml"
  if check_crds kubeflow >/dev/null 2>&1; then
    echo "check-deploy: a TrainJob edited by $broken passed validation" >&2; exit 1
  fi
done
cp deploy/kubeflow/trainjob.yaml "$tmp/kubeflow/trainjob.yaml"
sed 's/--world-size-file=/--no-such-flag=/' deploy/kubeflow/cluster-training-runtime.yaml > "$tmp/kubeflow/cluster-training-runtime.yaml"
if check_crds kubeflow >/dev/null 2>&1; then
  echo "check-deploy: a runtime passing --no-such-flag passed the --help check" >&2; exit 1
fi
cp deploy/kubeflow/cluster-training-runtime.yaml "$tmp/kubeflow/cluster-training-runtime.yaml"

for overlay in "$tmp"/k8s/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" > "$tmp/$name.yaml"
  "$py" -m kubernetes_validate --strict --quiet -k "$k8s_version" "$tmp/$name.yaml"
  check_flags "$tmp/$name.yaml"
  echo "check-deploy: overlay $name builds and validates against Kubernetes $k8s_version"
done

# The checks can fail: a schema error, and a flag the binary does not have.
sed 's/completions: 2/completions: "two"/' "$tmp/k8s/base/workers.yaml" > "$tmp/w.yaml"
mv "$tmp/w.yaml" "$tmp/k8s/base/workers.yaml"
kubectl kustomize "$tmp/k8s/overlays/cpu" > "$tmp/broken.yaml"
if "$py" -m kubernetes_validate --strict --quiet -k "$k8s_version" "$tmp/broken.yaml" >/dev/null 2>&1; then
  echo "check-deploy: a manifest with completions: \"two\" passed validation" >&2; exit 1
fi
sed 's/--no-progress/--no-such-flag/' "$tmp/cpu.yaml" > "$tmp/unknown.yaml"
if check_flags "$tmp/unknown.yaml" >/dev/null 2>&1; then
  echo "check-deploy: a manifest passing --no-such-flag passed the --help check" >&2; exit 1
fi

# Slurm: the script parses (bash -n), and its dry run (fake SLURM_* variables, TANDEM_DRY_RUN=1:
# the commands are printed, not run) passes only flags the binaries have.
check_slurm() {  # (chained: `set -e` does not hold inside a function called by `if`)
  bash -n "$1" &&
    SLURM_JOB_ID=7 SLURM_JOB_NUM_NODES=2 SLURM_JOB_NODELIST=node-a,node-b SLURM_SUBMIT_DIR=/shared \
      TANDEM_DRY_RUN=1 bash "$1" configs/rotten-tomatoes.toml > "$tmp/slurm.txt" &&
    "$py" - "$bin_dir" "$tmp/slurm.txt" <<'PY'
import re, subprocess, sys
bin_dir, printed = sys.argv[1], sys.argv[2]
bad, seen = [], 0
for line in open(printed):
    words = line.split()
    for i, w in enumerate(words):
        exe = w.rsplit("/", 1)[-1]
        if words[0] == "srun" and exe in ("coordinator", "worker"):
            h = subprocess.run([f"{bin_dir}/{exe}", "--help"], check=True, capture_output=True, text=True).stdout
            for a in words[i + 1:]:
                if a.startswith("--"):
                    seen += 1
                    if not re.search(r"(^|\s)" + re.escape(a.split("=", 1)[0]) + r"([\s,=<]|$)", h, re.M):
                        bad.append(f"{exe}: {a} is not in `{exe} --help`")
            break
if bad or seen == 0:
    print("\n".join(bad) or "no coordinator or worker command in the dry run", file=sys.stderr)
    sys.exit(1)
print(f"check-deploy: the Slurm script's {seen} flags are in the binaries' --help")
PY
}
check_slurm deploy/slurm/tandem.sbatch
sed 's/--nproc-per-node /--no-such-flag /' deploy/slurm/tandem.sbatch > "$tmp/unknown.sbatch"
if check_slurm "$tmp/unknown.sbatch" >/dev/null 2>&1; then
  echo "check-deploy: a Slurm script passing --no-such-flag passed the --help check" >&2; exit 1
fi

echo "check-deploy: ok (a schema error and an unknown flag are caught, in the manifests and the Slurm script)"

//! deploy/ checked without a cluster: scripts/check-deploy.sh builds every kustomize overlay,
//! validates it against the Kubernetes API schemas offline, and checks that every flag and
//! environment variable the manifests pass is in the binaries' --help (and that each of these
//! checks can fail). `kubectl` (its built-in kustomize) is on the machines this runs on; where
//! it is not, the test says so and passes unless TANDEM_REQUIRE_KUBECTL=1 (.ci/run sets it).

use crate::distributed::bin;
use crate::support::repo_root;
use std::process::Command;

#[test]
fn every_overlay_builds_validates_and_passes_only_flags_the_binaries_have() {
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        assert!(std::env::var("TANDEM_REQUIRE_KUBECTL").as_deref() != Ok("1"), "kubectl is not installed");
        eprintln!("deploy: kubectl not found: the manifests are not checked here");
        return;
    }
    let bins = bin("coordinator").parent().unwrap().to_path_buf();
    let o = Command::new(repo_root().join("scripts/check-deploy.sh")).arg(&bins).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    for overlay in ["cpu", "gpu", "pretrain-cpu"] {
        assert!(out.contains(&format!("overlay {overlay} builds and validates")), "{out}");
    }
    eprintln!("{out}");
}

#[test]
fn the_manifests_job_config_is_a_valid_job() {
    let path = repo_root().join("deploy/k8s/common/job.toml");
    let job = job::config::JobConfig::load(Some(&path), &[]).unwrap();
    assert!(job.checkpoint.resume, "a restarted coordinator pod must resume");
    assert!(job.output.dir.starts_with("/var/lib/tandem"), "the output goes to the checkpoint volume");
    // The GPU overlay runs 4 workers: the global batch must divide among them.
    assert_eq!(job.train.batch_size % 4, 0);
    // The pretraining overlay's: a masked-LM job whose workers read the corpus volume.
    let path = repo_root().join("deploy/k8s/overlays/pretrain-cpu/job.toml");
    let job = job::config::JobConfig::load(Some(&path), &[]).unwrap();
    assert_eq!(job.train.task, job::config::Task::Mlm);
    assert!(job.data.shared_storage && job.data.train.starts_with("/data/corpus"), "{:?}", job.data);
    assert!(job.checkpoint.resume && job.output.dir.starts_with("/var/lib/tandem"));
}

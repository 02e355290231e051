//! `worker --nproc-per-node N`: one launcher per node, as torchrun's `--nproc-per-node` is. It
//! starts N workers on this node with this process's own arguments, each with its local index
//! (`--gpu i` with `--device cuda`; an equal share of the cores on CPU), a rank hint of
//! `node_rank * N + i` when the node's rank is known, and its own ring port when one was given;
//! replaces a worker that dies of a signal (a crash, the OOM killer), as `coordinator
//! --spawn-local` does; forwards SIGTERM and SIGINT to them; and exits when they have, with the
//! first failure's status.
//!
//! The rank variables a scheduler sets for one process of a node (torchrun's, Slurm's,
//! Kubernetes') are removed from the workers' environment: the launcher gives each its own.

use anyhow::Context;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

/// What the launcher starts.
pub struct Launch {
    pub nproc: usize,
    /// This node's index among the nodes, when known: the workers' rank hints follow from it.
    pub node_rank: Option<usize>,
    pub cuda: bool,
    /// The ring address flags given to the launcher: worker i listens on (and announces) port + i.
    pub ring_listen: SocketAddr,
    pub ring_advertise: Option<String>,
}

/// Workers replaced after a crash, over the launcher's life.
const MAX_REPLACEMENTS: usize = 16;

/// Variables that name one process's rank, which a worker would otherwise read as its own.
pub const RANK_VARIABLES: &[&str] = &[
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "JOB_COMPLETION_INDEX",
];

impl Launch {
    /// Worker `i`'s arguments after this process's own (the later occurrence of a flag wins).
    fn child_args(&self, i: usize) -> Vec<String> {
        let mut a = vec!["--nproc-per-node".to_string(), "1".into()];
        if let Some(node) = self.node_rank {
            a.extend(["--rank-hint".into(), (node * self.nproc + i).to_string()]);
        }
        if self.cuda {
            a.extend(["--gpu".into(), i.to_string()]);
        }
        if self.ring_listen.port() != 0 {
            let mut listen = self.ring_listen;
            listen.set_port(listen.port() + i as u16);
            a.extend(["--ring-listen".into(), listen.to_string()]);
        }
        if let Some((host, port)) = self.ring_advertise.as_deref().and_then(|a| a.rsplit_once(':')) {
            if let Ok(port) = port.parse::<u16>() {
                a.extend(["--ring-advertise".into(), format!("{host}:{}", port + i as u16)]);
            }
        }
        a
    }

    fn spawn(&self, i: usize, threads: &str) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("this program's path")?;
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1)).args(self.child_args(i));
        for v in RANK_VARIABLES {
            cmd.env_remove(v);
        }
        cmd.env_remove("TANDEM_NPROC_PER_NODE");
        if !self.cuda && std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", threads);
        }
        cmd.spawn().with_context(|| format!("starting worker {i} ({})", exe.display()))
    }

    /// Starts the workers and waits for them.
    pub fn run(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.nproc >= 2, "--nproc-per-node {} starts no launcher: give 2 or more", self.nproc);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / self.nproc).max(1).to_string();
        tracing::info!(nproc = self.nproc, node_rank = self.node_rank, "starting the workers of this node");
        let mut children: Vec<Option<Child>> =
            (0..self.nproc).map(|i| self.spawn(i, &threads).map(Some)).collect::<anyhow::Result<_>>()?;
        let mut statuses: Vec<Option<ExitStatus>> = vec![None; self.nproc];
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut signals = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            anyhow::Ok((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
        })?;
        let (mut replaced, mut stopping) = (0usize, false);
        loop {
            let signalled = rt.block_on(async {
                tokio::select! {
                    _ = signals.0.recv() => Some("SIGTERM"),
                    _ = signals.1.recv() => Some("SIGINT"),
                    () = tokio::time::sleep(Duration::from_millis(100)) => None,
                }
            });
            if let Some(sig) = signalled {
                tracing::warn!(signal = sig, "forwarding to the workers of this node");
                stopping = true;
                for c in children.iter().flatten() {
                    let _ = Command::new("kill").args([&format!("-{}", &sig[3..]), &c.id().to_string()]).status();
                }
            }
            for i in 0..self.nproc {
                let Some(c) = children[i].as_mut() else { continue };
                let Some(status) = c.try_wait()? else { continue };
                children[i] = None;
                let crashed = status.signal().is_some_and(|s| s != 15 && s != 2);
                if crashed && !stopping && replaced < MAX_REPLACEMENTS {
                    replaced += 1;
                    tracing::warn!(worker = i, %status, "a worker of this node died; starting a replacement");
                    children[i] = Some(self.spawn(i, &threads)?);
                    continue;
                }
                statuses[i] = Some(status);
                if !status.success() && !stopping {
                    // The job failed for this worker, or it was refused: the others stop too.
                    tracing::error!(worker = i, %status, "a worker of this node failed; stopping the others");
                    stopping = true;
                    for c in children.iter().flatten() {
                        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
                    }
                }
            }
            if children.iter().all(Option::is_none) {
                break;
            }
        }
        match statuses.iter().flatten().find(|s| !s.success()) {
            None => Ok(()),
            Some(s) => {
                let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
                tracing::error!(%s, "a worker of this node failed");
                std::process::exit(code);
            }
        }
    }
}

/// The first of `names` set in the environment to a number, with its name.
pub fn env_number(names: &[&'static str]) -> Option<(&'static str, usize)> {
    names.iter().find_map(|n| Some((*n, std::env::var(n).ok()?.trim().parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_gets_its_rank_device_and_ring_port() {
        let l = Launch {
            nproc: 4,
            node_rank: Some(2),
            cuda: true,
            ring_listen: "0.0.0.0:29500".parse().unwrap(),
            ring_advertise: Some("10.1.2.3:29500".into()),
        };
        assert_eq!(
            l.child_args(3),
            [
                "--nproc-per-node",
                "1",
                "--rank-hint",
                "11",
                "--gpu",
                "3",
                "--ring-listen",
                "0.0.0.0:29503",
                "--ring-advertise",
                "10.1.2.3:29503"
            ]
        );
        let cpu = Launch {
            node_rank: None,
            cuda: false,
            ring_listen: "127.0.0.1:0".parse().unwrap(),
            ring_advertise: None,
            ..l
        };
        assert_eq!(cpu.child_args(1), ["--nproc-per-node", "1"], "no hint, no device, any port");
    }
}

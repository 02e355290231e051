//! A watchdog for calls that can block forever without telling anyone: NCCL's communicator
//! setup and its collectives wait inside the library for peers that may be gone, and no
//! timeout of theirs returns control. [`Watchdog::arm`] starts a timer for one such call; the
//! guard it returns disarms it when dropped (the call returned). If the call is still running
//! when the timer fires, the watchdog runs its `on_expire` action, by default [`abort_process`]:
//! log a clear error naming the call and exit. The process's heartbeat stream closes with it,
//! so the coordinator declares the rank failed at once and restarts the job from its last
//! checkpoint; a communicator stuck in a collective cannot be reused anyway (PyTorch's NCCL
//! watchdog tears the process down the same way).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the watchdog does when a call outlives its deadline (given the call's name).
pub type OnExpire = Arc<dyn Fn(&str, Duration) + Send + Sync>;

/// The default action: an error line on stderr, then exit status 1.
pub fn abort_process() -> OnExpire {
    Arc::new(|what: &str, after: Duration| {
        eprintln!(
            "error: {what} did not finish within {after:?} (elastic.collective_timeout_s): aborting this worker; the \
             coordinator restarts the job from its last checkpoint"
        );
        std::process::exit(1);
    })
}

#[derive(Clone)]
pub struct Watchdog {
    timeout: Duration,
    on_expire: OnExpire,
}

/// A running timer; dropping it disarms the watchdog.
pub struct Armed {
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Drop for Armed {
    fn drop(&mut self) {
        let (lock, cv) = &*self.done;
        *lock.lock().expect("watchdog lock") = true;
        cv.notify_all();
    }
}

impl Watchdog {
    pub fn new(timeout: Duration, on_expire: OnExpire) -> Self {
        Watchdog { timeout, on_expire }
    }

    /// Starts the timer for the call `what`.
    pub fn arm(&self, what: &str) -> Armed {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let (flag, timeout, on_expire, what) =
            (Arc::clone(&done), self.timeout, Arc::clone(&self.on_expire), what.to_string());
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let deadline = Instant::now() + timeout;
                let (lock, cv) = &*flag;
                let mut finished = lock.lock().expect("watchdog lock");
                while !*finished {
                    let now = Instant::now();
                    if now >= deadline {
                        drop(finished);
                        on_expire(&what, timeout);
                        return;
                    }
                    finished = cv.wait_timeout(finished, deadline - now).expect("watchdog lock").0;
                }
            })
            .expect("starting the watchdog thread");
        Armed { done }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting() -> (OnExpire, Arc<AtomicUsize>, Arc<Mutex<String>>) {
        let (n, name) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(String::new())));
        let (n2, name2) = (Arc::clone(&n), Arc::clone(&name));
        let f: OnExpire = Arc::new(move |what: &str, _| {
            n2.fetch_add(1, Ordering::SeqCst);
            *name2.lock().unwrap() = what.to_string();
        });
        (f, n, name)
    }

    #[test]
    fn a_call_that_returns_in_time_never_fires() {
        let (f, n, _) = counting();
        let w = Watchdog::new(Duration::from_millis(300), f);
        for _ in 0..5 {
            let _armed = w.arm("quick");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_call_that_hangs_fires_once_with_its_name() {
        let (f, n, name) = counting();
        let w = Watchdog::new(Duration::from_millis(100), f);
        let armed = w.arm("NCCL all-reduce of 42 floats");
        std::thread::sleep(Duration::from_millis(400));
        drop(armed);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(*name.lock().unwrap(), "NCCL all-reduce of 42 floats");
    }
}

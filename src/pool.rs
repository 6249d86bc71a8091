//! A pool of blocking workers for the steps that take a core for milliseconds or more (a
//! photo's conversion, the face check): never on the threads that serve requests, at most
//! `workers` at once, at most `queue` more waiting, and a request waits at most `timeout` for
//! its turn and its job together. A job past its timeout runs to its end on its worker (a
//! decoder cannot be stopped half way), and its worker stays taken until then: the pool bounds
//! the CPU and the memory its jobs take, whatever their clients do.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

pub struct Pool {
    /// One permit per worker: a job holds one until it is done.
    workers: Arc<Semaphore>,
    /// One permit per job running or waiting for a worker.
    places: Arc<Semaphore>,
    timeout: Duration,
}

/// Why a job gave no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every worker and every place in the queue is taken.
    Full,
    /// Its turn and its run took longer than the timeout.
    TimedOut,
    /// The job panicked, or the pool is gone: a fault of the gateway's.
    Failed,
}

impl Pool {
    pub fn new(workers: usize, queue: usize, timeout: Duration) -> Pool {
        Pool {
            workers: Arc::new(Semaphore::new(workers)),
            places: Arc::new(Semaphore::new(workers + queue)),
            timeout,
        }
    }

    /// `job`'s result once a worker has run it.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refused> {
        let Ok(_place) = self.places.clone().try_acquire_owned() else {
            return Err(Refused::Full);
        };
        let workers = self.workers.clone();
        let done = async move {
            let worker = workers.acquire_owned().await.ok()?;
            tokio::task::spawn_blocking(move || {
                let _worker = worker;
                job()
            })
            .await
            .ok()
        };
        match tokio::time::timeout(self.timeout, done).await {
            Ok(Some(out)) => Ok(out),
            Ok(None) => Err(Refused::Failed),
            Err(_) => Err(Refused::TimedOut),
        }
    }
}

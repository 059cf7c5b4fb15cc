//! What every controller in the agent shares: a trigger channel, coalescing of bursts,
//! a periodic full resync (and, for controllers that ask, a cheaper periodic check),
//! and retries with backoff after a failed run. A controller only says how to
//! reconcile once.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

/// Why a run happens. Startup and Resync ask for a full run (re-read the kernel, redo
/// everything); events ask for the cheap path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    /// Something the controller watches changed (the datastore, a Service, ...).
    Source,
    /// The kernel lost something the controller owns.
    Kernel,
    /// A periodic look at whether the kernel still holds what was written, cheaper
    /// than a resync: the controller decides whether a full run is needed.
    Check,
    Resync,
}

impl Trigger {
    pub fn is_full(self) -> bool {
        matches!(self, Trigger::Startup | Trigger::Resync)
    }
}

/// A reconcile loop's body.
pub trait Controller: Send + 'static {
    fn name(&self) -> &'static str;

    /// One run; says whether it succeeded (a failed run is retried after a backoff).
    fn reconcile(&mut self, trigger: Trigger, full: bool) -> impl Future<Output = bool> + Send;
}

/// The sending side of a controller's triggers; cheap to clone into watchers.
#[derive(Clone)]
pub struct Triggers(mpsc::UnboundedSender<Trigger>);

impl Triggers {
    pub fn channel() -> (Triggers, mpsc::UnboundedReceiver<Trigger>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Triggers(tx), rx)
    }

    /// False once the controller is gone.
    pub fn fire(&self, trigger: Trigger) -> bool {
        self.0.send(trigger).is_ok()
    }
}

/// When a controller runs without being triggered.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// A full run every so often.
    pub resync: Duration,
    /// A `Check` run every so often, if the controller has a cheap check.
    pub check: Option<Duration>,
    /// How long a burst of triggers is gathered into one run (a controller whose
    /// source already hands over only the latest state needs none).
    pub coalesce: Duration,
}

impl Schedule {
    /// A full run every `every`; bursts gathered for 10 ms.
    pub fn resync(every: Duration) -> Schedule {
        Schedule {
            resync: every,
            check: None,
            coalesce: Duration::from_millis(10),
        }
    }

    /// The longest wait between retries of a failing run: the shorter period.
    fn backoff_cap(&self) -> Duration {
        self.check.map_or(self.resync, |c| c.min(self.resync))
    }
}

/// Fires `trigger` every `period` (not at once) until the controller is gone.
fn tick(triggers: Triggers, period: Duration, trigger: Trigger) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !triggers.fire(trigger) {
                return;
            }
        }
    });
}

/// Runs `controller` until its trigger channel closes: a Startup run at once, a full
/// run every `schedule.resync`, a Check run every `schedule.check`, a run on each
/// burst of triggers, retries after failures.
pub async fn run<C: Controller>(
    mut controller: C,
    triggers: Triggers,
    mut rx: mpsc::UnboundedReceiver<Trigger>,
    schedule: Schedule,
) {
    tick(triggers.clone(), schedule.resync, Trigger::Resync);
    if let Some(check) = schedule.check {
        tick(triggers.clone(), check, Trigger::Check);
    }
    triggers.fire(Trigger::Startup);
    drop(triggers);
    // A failed run, retried after its backoff whether or not anything else triggers.
    let mut retry: Option<(Trigger, bool)> = None;
    let mut failures = 0u32;
    loop {
        let wait = failure_backoff(failures, schedule.backoff_cap());
        let (mut trigger, mut full) = tokio::select! {
            t = rx.recv(), if retry.is_none() => match t {
                Some(t) => (t, t.is_full()),
                None => return,
            },
            _ = tokio::time::sleep(wait), if retry.is_some() => retry.take().expect("set"),
        };
        // Coalesce a burst of triggers (and what came in during a backoff: a failing
        // run's own kernel events among them) into one run; full if any asked for it,
        // and a check if any asked for one (a check run handles events too).
        if !schedule.coalesce.is_zero() {
            tokio::time::sleep(schedule.coalesce).await;
        }
        while let Ok(t) = rx.try_recv() {
            full |= t.is_full();
            if t == Trigger::Check {
                trigger = t;
            }
        }
        if controller.reconcile(trigger, full).await {
            failures = 0;
        } else {
            failures += 1;
            tracing::debug!(controller = controller.name(), failures, "run failed");
            retry = Some((trigger, full));
        }
    }
}

/// How long to wait before retrying after `failures` failed runs in a row: 200 ms,
/// doubling, at most `cap` (the shorter periodic interval), so a run that keeps failing (and
/// keeps waking itself through its own kernel events) does not spin.
pub fn failure_backoff(failures: u32, cap: Duration) -> Duration {
    let wait = Duration::from_millis(200).saturating_mul(1 << failures.saturating_sub(1).min(16));
    wait.min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn failures_back_off_doubling_up_to_the_resync_interval() {
        let cap = Duration::from_secs(10);
        let waits: Vec<u128> = (1..=8)
            .map(|n| failure_backoff(n, cap).as_millis())
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert_eq!(failure_backoff(1000, cap), cap);
    }

    struct Recorder {
        runs: Arc<Mutex<Vec<(Trigger, bool)>>>,
        fail_first: bool,
    }

    impl Controller for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        async fn reconcile(&mut self, trigger: Trigger, full: bool) -> bool {
            self.runs.lock().unwrap().push((trigger, full));
            !std::mem::take(&mut self.fail_first)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checks_come_between_resyncs_on_their_own_period() {
        let runs = Arc::new(Mutex::new(Vec::new()));
        let (triggers, rx) = Triggers::channel();
        let controller = Recorder {
            runs: runs.clone(),
            fail_first: false,
        };
        let schedule = Schedule {
            resync: Duration::from_secs(10),
            check: Some(Duration::from_secs(3)),
            coalesce: Duration::ZERO,
        };
        let handle = tokio::spawn(run(controller, triggers, rx, schedule));
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        assert_eq!(
            *runs.lock().unwrap(),
            [
                (Trigger::Startup, true),
                (Trigger::Check, false),
                (Trigger::Check, false),
                (Trigger::Check, false),
                (Trigger::Resync, true),
            ]
        );
        handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_run_and_a_failure_is_retried_without_a_trigger() {
        let runs = Arc::new(Mutex::new(Vec::new()));
        let (triggers, rx) = Triggers::channel();
        let controller = Recorder {
            runs: runs.clone(),
            fail_first: true,
        };
        let handle = tokio::spawn(run(
            controller,
            triggers.clone(),
            rx,
            Schedule::resync(Duration::from_secs(60)),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Startup failed; its retry comes after 200 ms with no trigger at all.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            *runs.lock().unwrap(),
            [(Trigger::Startup, true), (Trigger::Startup, true)]
        );
        for _ in 0..5 {
            triggers.fire(Trigger::Source);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.lock().unwrap().len(), 3, "five triggers, one run");
        assert_eq!(runs.lock().unwrap()[2], (Trigger::Source, false));
        handle.abort();
    }
}

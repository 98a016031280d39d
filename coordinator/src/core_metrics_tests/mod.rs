//! The core (`guildhall-core`) with the coordinator's real metrics, on
//! virtual time, driven by the core's one test driver
//! ([`crate::core::test_support::Sim`]): what the core hands over as data
//! shows in the `/metrics` text under the exported names, and snapshots
//! carry those counters (their bytes are pinned here, with the names they
//! hold).
//!
//! # Layout
//!
//! - [`fleet`]: workers, tasks and stages as the exposition shows them;
//! - [`snapshot`]: snapshots of a busy core, the pinned layout, damage.

mod fleet;
mod snapshot;

use crate::core::CoreConfig;
use crate::core::test_support::Sim;
use crate::metrics::Metrics;

/// A caught-up core on `config`, handing its metrics to a fresh
/// [`Metrics`] (per-worker series on).
fn metered(config: CoreConfig) -> (Sim, Metrics) {
    let m = Metrics::new(true);
    (Sim::with_telemetry(config, m.clone(), true), m)
}

/// The `/metrics` text of `sim`'s core on `m`, as of its clock.
fn metrics_of(sim: &mut Sim, m: &Metrics) -> String {
    m.text_of(&mut sim.core, sim.now)
}

//! Queueing formulas: Erlang C for M/M/c, the Allen-Cunneen approximation
//! for G/G/c, and sizing a stage for a wait-time target.
//!
//! Notation: λ arrivals per second, s the mean service time, a = λ·s the
//! offered load (in Erlangs, i.e. busy servers on average), c servers,
//! ρ = a/c the utilisation. A queue is stable only when a < c.
//!
//! - **Erlang C** (probability that an arrival waits, M/M/c) is computed from
//!   the Erlang B recursion `B(0) = 1, B(k) = a·B(k−1) / (k + a·B(k−1))` and
//!   `C = c·B / (c − a·(1 − B))`: no factorials or powers, so it stays exact
//!   for thousands of servers.
//! - **M/M/c waits**: mean `Wq = C·s / (c − a)`; tail
//!   `P(W > t) = C·exp(−(c − a)·t / s)`.
//! - **Allen-Cunneen** (G/G/c): `Wq ≈ Wq(M/M/c)·(ca² + cs²)/2`, with ca² and cs²
//!   the squared coefficients of variation of inter-arrival and service times.
//!   It corrects the mean only. For the tail we keep the M/M/c probability of
//!   waiting C and the exponential shape of the conditional wait, and stretch
//!   its decay so that its mean matches Allen-Cunneen:
//!   `P(W > t) ≈ C·exp(−t·C / Wq) = C·exp(−(c − a)·t / (s·k))`, k = (ca² + cs²)/2.
//!   With ca² = cs² = 1 (Poisson arrivals, exponential service) this is
//!   exactly M/M/c; with k → 0 (clockwork arrivals and service) no one waits.

/// Erlang B: the probability that all `servers` are busy in an M/M/c/c
/// loss system with `load` Erlangs offered. Stable for any `servers`.
pub fn erlang_b(servers: u32, load: f64) -> f64 {
    if load.is_nan() || load <= 0.0 {
        return if servers == 0 { 1.0 } else { 0.0 };
    }
    let mut b = 1.0;
    for k in 1..=servers {
        b = load * b / (f64::from(k) + load * b);
    }
    b
}

/// Erlang C from Erlang B for `c` servers and load `a < c`.
fn c_from_b(c: f64, a: f64, b: f64) -> f64 {
    (c * b / (c - a * (1.0 - b))).clamp(0.0, 1.0)
}

/// Erlang C: the probability that an arrival has to wait in an M/M/c queue
/// with `servers` servers and `load` Erlangs. 1 when the queue is unstable
/// (load ≥ servers) and there is any load; 0 with no load.
pub fn erlang_c(servers: u32, load: f64) -> f64 {
    if load.is_nan() || load <= 0.0 {
        return 0.0;
    }
    let c = f64::from(servers);
    if load.is_nan() || load >= c {
        return 1.0;
    }
    c_from_b(c, load, erlang_b(servers, load))
}

/// The Allen-Cunneen factor (ca² + cs²)/2, with non-finite or negative
/// inputs taken as 1 (Poisson/exponential).
fn variability(ca2: f64, cs2: f64) -> f64 {
    let clean = |x: f64| if x.is_finite() && x >= 0.0 { x } else { 1.0 };
    (clean(ca2) + clean(cs2)) / 2.0
}

/// Whether the inputs describe a load: a positive finite rate and service time.
fn has_load(arrival_rate_per_s: f64, service_mean_ms: f64) -> bool {
    arrival_rate_per_s.is_finite()
        && service_mean_ms.is_finite()
        && arrival_rate_per_s > 0.0
        && service_mean_ms > 0.0
}

/// Mean queue wait (ms) in an M/M/c queue; `None` when unstable.
pub fn mmc_wait_ms(arrival_rate_per_s: f64, service_mean_ms: f64, servers: u32) -> Option<f64> {
    expected_wait_ms(arrival_rate_per_s, service_mean_ms, 1.0, 1.0, servers)
}

/// Mean queue wait (ms) in a G/G/c queue by Allen-Cunneen: the M/M/c wait
/// scaled by (ca² + cs²)/2. `None` when unstable (load ≥ servers). No load
/// means no wait.
pub fn expected_wait_ms(
    arrival_rate_per_s: f64,
    service_mean_ms: f64,
    ca2: f64,
    cs2: f64,
    servers: u32,
) -> Option<f64> {
    if !has_load(arrival_rate_per_s, service_mean_ms) {
        return Some(0.0);
    }
    let a = arrival_rate_per_s * service_mean_ms / 1000.0;
    let c = f64::from(servers);
    if a.is_nan() || a >= c {
        return None;
    }
    let wq = erlang_c(servers, a) * service_mean_ms / (c - a);
    Some(wq * variability(ca2, cs2))
}

/// Tail of the queue wait, P(W > t), from the probability of waiting `pw`
/// and the decay rate per ms.
fn tail(pw: f64, decay_per_ms: f64, t_ms: f64) -> f64 {
    if t_ms <= 0.0 {
        return pw;
    }
    if !decay_per_ms.is_finite() {
        return 0.0;
    }
    pw * (-decay_per_ms * t_ms).exp()
}

/// Decay rate per ms of the conditional wait: (c − a)/(s·k), infinite when
/// k = 0 (no variability, no wait).
fn decay_per_ms(c: f64, a: f64, service_mean_ms: f64, k: f64) -> f64 {
    if k <= 1e-12 {
        f64::INFINITY
    } else {
        (c - a) / (service_mean_ms * k)
    }
}

/// P(queue wait > `t_ms`) in a G/G/c queue (see the module notes for the
/// approximation). 1 when unstable and loaded, 0 with no load.
pub fn p_wait_over(
    arrival_rate_per_s: f64,
    service_mean_ms: f64,
    ca2: f64,
    cs2: f64,
    servers: u32,
    t_ms: f64,
) -> f64 {
    if !has_load(arrival_rate_per_s, service_mean_ms) {
        return 0.0;
    }
    let a = arrival_rate_per_s * service_mean_ms / 1000.0;
    let c = f64::from(servers);
    if a.is_nan() || a >= c {
        return 1.0;
    }
    let k = variability(ca2, cs2);
    tail(
        erlang_c(servers, a),
        decay_per_ms(c, a, service_mean_ms, k),
        t_ms,
    )
}

/// The result of [`servers_for_target`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizing {
    /// Servers chosen: the smallest count meeting the target, or the maximum.
    pub servers: u32,
    /// Whether the target is met with that many (false: the maximum falls short).
    pub met: bool,
    /// P(wait > target) with that many servers.
    pub p_wait_over_target: f64,
}

/// The smallest server count c ≤ `max_servers` with utilisation below 1 and
/// P(wait > `target_ms`) ≤ `quantile`; `max_servers` (with `met: false`)
/// when none is enough. No load needs no server. One pass of the Erlang B
/// recursion: O(c).
pub fn servers_for_target(
    arrival_rate_per_s: f64,
    service_mean_ms: f64,
    ca2: f64,
    cs2: f64,
    target_ms: f64,
    quantile: f64,
    max_servers: u32,
) -> Sizing {
    if !has_load(arrival_rate_per_s, service_mean_ms) {
        return Sizing {
            servers: 0,
            met: true,
            p_wait_over_target: 0.0,
        };
    }
    let a = arrival_rate_per_s * service_mean_ms / 1000.0;
    let k = variability(ca2, cs2);
    let mut b = 1.0;
    let mut last_p = 1.0;
    for servers in 1..=max_servers {
        let c = f64::from(servers);
        b = a * b / (c + a * b);
        if a < c {
            let p = tail(
                c_from_b(c, a, b),
                decay_per_ms(c, a, service_mean_ms, k),
                target_ms,
            );
            last_p = p;
            if p <= quantile {
                return Sizing {
                    servers,
                    met: true,
                    p_wait_over_target: p,
                };
            }
        }
    }
    Sizing {
        servers: max_servers,
        met: false,
        p_wait_over_target: last_p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Erlang C by its textbook formula, for comparison:
    /// C = (a^c/c!)·(c/(c−a)) / (Σ_{k<c} a^k/k! + (a^c/c!)·(c/(c−a))).
    fn erlang_c_direct(c: u32, a: f64) -> f64 {
        let mut term = 1.0; // a^k / k!
        let mut sum = 0.0;
        for k in 0..c {
            sum += term;
            term *= a / f64::from(k + 1);
        }
        let top = term * f64::from(c) / (f64::from(c) - a);
        top / (sum + top)
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn erlang_c_matches_table_values() {
        // Hand-checkable values (e.g. Kleinrock, Queueing Systems vol. 1,
        // §3.5; any Erlang C table):
        // a = 2, c = 3: B = 4/19, C = 3·(4/19) / (3 − 2·15/19) = 4/9.
        assert!(close(erlang_c(3, 2.0), 4.0 / 9.0, 1e-12));
        // a = 1, c = 2: C = 1/3.
        assert!(close(erlang_c(2, 1.0), 1.0 / 3.0, 1e-12));
        // M/M/1: C = ρ.
        assert!(close(erlang_c(1, 0.7), 0.7, 1e-12));
        // The classic call-centre example: 10 Erlangs on 11 agents waits
        // with probability 0.6821 (Erlang C tables, 4 decimals).
        assert!(
            close(erlang_c(11, 10.0), 0.6821, 5e-5),
            "{}",
            erlang_c(11, 10.0)
        );
        // Erlang B: a = 2, c = 3 → 4/19.
        assert!(close(erlang_b(3, 2.0), 4.0 / 19.0, 1e-12));
        // The direct formula agrees where it does not overflow.
        for (c, a) in [(5, 3.2), (20, 17.5), (50, 45.0), (100, 90.0)] {
            assert!(
                close(erlang_c(c, a), erlang_c_direct(c, a), 1e-9),
                "{c} {a}"
            );
        }
        // Edges.
        assert_eq!(erlang_c(3, 3.0), 1.0);
        assert_eq!(erlang_c(0, 1.0), 1.0);
        assert_eq!(erlang_c(3, 0.0), 0.0);
    }

    #[test]
    fn erlang_c_is_stable_for_large_c() {
        // a^c/c! overflows f64 far below these sizes; the recursion does not.
        for (c, a) in [(1_000, 950.0), (10_000, 9_900.0), (100_000, 99_000.0)] {
            let v = erlang_c(c, a);
            assert!(v.is_finite() && v > 0.0 && v < 1.0, "{c}: {v}");
        }
        // More servers, less waiting.
        assert!(erlang_c(10_050, 9_900.0) < erlang_c(10_000, 9_900.0));
    }

    #[test]
    fn mmc_waits_and_tail() {
        // a = 2 (λ = 2/s, s = 1 s), c = 3: Wq = C·s/(c − a) = 4/9 s.
        let wq = mmc_wait_ms(2.0, 1000.0, 3).unwrap();
        assert!(close(wq, 4000.0 / 9.0, 1e-9), "{wq}");
        // P(W > 1 s) = C·e^{−(c − a)·t/s} = 4/9 · e^{−1}.
        let p = p_wait_over(2.0, 1000.0, 1.0, 1.0, 3, 1000.0);
        assert!(close(p, 4.0 / 9.0 * (-1.0f64).exp(), 1e-12), "{p}");
        // P(W > 0) is the probability of waiting.
        assert!(close(
            p_wait_over(2.0, 1000.0, 1.0, 1.0, 3, 0.0),
            4.0 / 9.0,
            1e-12
        ));
        // Unstable: no mean wait, everyone waits too long.
        assert_eq!(mmc_wait_ms(3.0, 1000.0, 3), None);
        assert_eq!(p_wait_over(3.0, 1000.0, 1.0, 1.0, 3, 1e9), 1.0);
        // No load: no wait.
        assert_eq!(expected_wait_ms(0.0, 1000.0, 1.0, 1.0, 0), Some(0.0));
        assert_eq!(p_wait_over(0.0, 1000.0, 1.0, 1.0, 0, 0.0), 0.0);
    }

    #[test]
    fn allen_cunneen_reduces_to_mmc_and_scales_with_variability() {
        for (rate, s, c) in [(2.0, 1000.0, 3), (17.0, 1000.0, 20), (0.5, 4000.0, 3)] {
            let mmc = mmc_wait_ms(rate, s, c).unwrap();
            let ac = expected_wait_ms(rate, s, 1.0, 1.0, c).unwrap();
            assert!(close(mmc, ac, 1e-12));
            // M/D/c (cs² = 0): half the wait; ca² = cs² = 2: twice.
            assert!(close(
                expected_wait_ms(rate, s, 1.0, 0.0, c).unwrap(),
                mmc / 2.0,
                1e-9
            ));
            assert!(close(
                expected_wait_ms(rate, s, 2.0, 2.0, c).unwrap(),
                mmc * 2.0,
                1e-9
            ));
            // The tail keeps P(wait) and matches the scaled mean:
            // ∫ C·e^{−t·C/Wq} dt = Wq.
            let k = 0.5;
            let wq = expected_wait_ms(rate, s, 0.5, 0.5, c).unwrap();
            let pw = erlang_c(c, rate * s / 1000.0);
            let t = 1234.0;
            let p = p_wait_over(rate, s, 0.5, 0.5, c, t);
            assert!(close(p, pw * (-t * pw / wq).exp(), 1e-12), "{k} {p}");
        }
        // No variability at all: nobody waits longer than 0.
        assert_eq!(p_wait_over(2.0, 1000.0, 0.0, 0.0, 3, 1.0), 0.0);
    }

    #[test]
    fn sizing_is_the_smallest_count_meeting_the_target() {
        // λ = 10/s, s = 1 s (a = 10), wait target 5 s at 5%.
        let sizing = servers_for_target(10.0, 1000.0, 1.0, 1.0, 5000.0, 0.05, 1000);
        assert!(sizing.met);
        let c = sizing.servers;
        assert!(p_wait_over(10.0, 1000.0, 1.0, 1.0, c, 5000.0) <= 0.05);
        assert!(p_wait_over(10.0, 1000.0, 1.0, 1.0, c - 1, 5000.0) > 0.05);
        assert!(close(
            sizing.p_wait_over_target,
            p_wait_over(10.0, 1000.0, 1.0, 1.0, c, 5000.0),
            1e-12
        ));
        // Never at or over utilisation 1, even with a lenient target.
        let lenient = servers_for_target(10.0, 1000.0, 1.0, 1.0, 1e9, 0.99, 1000);
        assert_eq!(lenient.servers, 11);
        // The cap.
        let capped = servers_for_target(10.0, 1000.0, 1.0, 1.0, 5000.0, 0.05, 5);
        assert_eq!((capped.servers, capped.met), (5, false));
        // No load, no server.
        assert_eq!(
            servers_for_target(0.0, 1000.0, 1.0, 1.0, 5000.0, 0.05, 10).servers,
            0
        );
    }

    #[test]
    fn sizing_is_monotone() {
        let size = |rate: f64, s: f64, k: f64, target: f64, q: f64| {
            servers_for_target(rate, s, k, k, target, q, 100_000).servers
        };
        let mut last = 0;
        for i in 1..200 {
            let c = size(f64::from(i) * 0.5, 2000.0, 1.0, 10_000.0, 0.05);
            assert!(c >= last, "more load, fewer servers at {i}");
            last = c;
        }
        // Stricter quantile, shorter target, slower service, burstier
        // arrivals: never fewer servers.
        let base = size(20.0, 1000.0, 1.0, 5000.0, 0.05);
        assert!(size(20.0, 1000.0, 1.0, 5000.0, 0.01) >= base);
        assert!(size(20.0, 1000.0, 1.0, 1000.0, 0.05) >= base);
        assert!(size(20.0, 1500.0, 1.0, 5000.0, 0.05) >= base);
        assert!(size(20.0, 1000.0, 3.0, 5000.0, 0.05) >= base);
        assert!(size(20.0, 1000.0, 0.2, 5000.0, 0.05) <= base);
        // Large systems are cheap and sane: ≈ a + a few √a.
        let big = size(5_000.0, 1000.0, 1.0, 1000.0, 0.05);
        assert!((5_001..5_300).contains(&big), "{big}");
    }
}

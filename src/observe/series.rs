//! A labelled metric family whose series each thread resolves once.
//!
//! Prometheus finds a series by hashing its label values (FNV, a byte at a time), then takes
//! a read lock and clones the series' handle. Every API call records into six such series
//! (request count and duration, upstream time to first byte and duration, llm-edge's own
//! time, tokens), which cost about 1,700 instructions of a 108k-instruction stream
//! (callgrind, S3 API). A worker thread sees the same few label sets over and over (one per
//! configured model and upstream), so it keeps the handles it has resolved and finds them
//! again by comparing the label values.
//!
//! Handles stay valid because these families never remove a series: a removed one would
//! keep counting in the handles, unseen by the registry.

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use std::cell::RefCell;
use thread_local::ThreadLocal;

/// Most label sets a thread keeps per family; past that, series are looked up each time
/// (label values are bounded, see [`super::metrics`], but client ids can be many).
const MAX_KEPT: usize = 64;

/// The series a thread has resolved: label values and handle.
type Kept<M> = Vec<(Box<[Box<str>]>, M)>;

/// A labelled family: its series by label values.
pub trait Family {
    /// A series' handle.
    type Series: Send;
    /// The series of `labels`, made if new.
    fn series(&self, labels: &[&str]) -> prometheus::Result<Self::Series>;
}

impl Family for IntCounterVec {
    type Series = IntCounter;
    fn series(&self, labels: &[&str]) -> prometheus::Result<IntCounter> {
        self.get_metric_with_label_values(labels)
    }
}

impl Family for HistogramVec {
    type Series = Histogram;
    fn series(&self, labels: &[&str]) -> prometheus::Result<Histogram> {
        self.get_metric_with_label_values(labels)
    }
}

/// A labelled family with a per-thread cache of its series.
pub struct CachedVec<V: Family> {
    vec: V,
    kept: ThreadLocal<RefCell<Kept<V::Series>>>,
}

impl<V: Family> CachedVec<V> {
    /// Wraps `vec` (already registered).
    pub fn new(vec: V) -> Self {
        Self {
            vec,
            kept: ThreadLocal::new(),
        }
    }

    /// The family itself (its series looked up without the cache).
    pub fn family(&self) -> &V {
        &self.vec
    }

    /// Runs `f` on the series of `labels`. A label-count mismatch is a bug in the caller;
    /// metrics must never take the proxy down for it, so the series is skipped instead of
    /// panicking as `with_label_values` would.
    pub fn with(&self, labels: &[&str], f: impl FnOnce(&V::Series)) {
        let Ok(mut kept) = self.kept.get_or_default().try_borrow_mut() else {
            // Not reachable (`f` records, it never calls back in); look it up instead.
            if let Ok(m) = self.vec.series(labels) {
                f(&m);
            }
            return;
        };
        let same = |values: &[Box<str>]| {
            values.len() == labels.len() && values.iter().zip(labels).all(|(v, l)| **v == **l)
        };
        if let Some((_, m)) = kept.iter().find(|(values, _)| same(values)) {
            f(m);
            return;
        }
        let Ok(m) = self.vec.series(labels) else {
            return;
        };
        f(&m);
        if kept.len() < MAX_KEPT {
            kept.push((labels.iter().map(|&l| l.into()).collect(), m));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, Opts};

    #[test]
    fn kept_series_are_the_registry_series_from_every_thread() {
        let vec = IntCounterVec::new(Opts::new("t_total", "t"), &["a", "b"]).unwrap();
        let cached = CachedVec::new(vec.clone());
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for i in 0..100u64 {
                        let b = (i % 3).to_string();
                        cached.with(&["x", &b], |c| c.inc());
                    }
                    // More label sets than a thread keeps: all still counted.
                    for i in 0..(MAX_KEPT as u64 + 10) {
                        cached.with(&["many", &i.to_string()], |c| c.inc_by(2));
                    }
                });
            }
        });
        assert_eq!(vec.with_label_values(&["x", "0"]).get(), 3 * 34);
        assert_eq!(vec.with_label_values(&["x", "1"]).get(), 3 * 33);
        assert_eq!(vec.with_label_values(&["x", "2"]).get(), 3 * 33);
        assert_eq!(vec.with_label_values(&["many", "70"]).get(), 6);
        // A prefix or a longer set of the same values is another series, and a wrong count
        // of labels records nothing.
        cached.with(&["x"], |c| c.inc());
        cached.with(&["x", "0", "y"], |c| c.inc());
        cached.with(&["x", "00"], |c| c.inc());
        assert_eq!(vec.with_label_values(&["x", "0"]).get(), 3 * 34);
        assert_eq!(vec.with_label_values(&["x", "00"]).get(), 1);

        let h = HistogramVec::new(HistogramOpts::new("t_seconds", "t"), &["u"]).unwrap();
        let cached = CachedVec::new(h.clone());
        for v in [0.5, 1.5] {
            cached.with(&["up"], |m| m.observe(v));
        }
        let m = h.with_label_values(&["up"]);
        assert_eq!((m.get_sample_count(), m.get_sample_sum()), (2, 2.0));
    }
}

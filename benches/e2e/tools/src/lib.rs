//! Shared helpers of the end-to-end benchmark tools: flag parsing, percentiles, URLs.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

/// `--name value` flags (repeatable) and bare `--switch`es, parsed by hand to keep the tools
/// free of a CLI dependency.
#[derive(Debug, Default)]
pub struct Flags {
    values: HashMap<String, Vec<String>>,
}

impl Flags {
    /// Parses `std::env::args()`; `switches` lists the flags that take no value.
    pub fn from_env(switches: &[&str]) -> Result<Self, String> {
        Self::parse(std::env::args().skip(1), switches)
    }

    /// Parses flags from an iterator of arguments.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        switches: &[&str],
    ) -> Result<Self, String> {
        let mut flags = Self::default();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None if switches.contains(&name) => (name.to_string(), "true".to_string()),
                None => {
                    let v = args
                        .next()
                        .ok_or_else(|| format!("--{name} needs a value"))?;
                    (name.to_string(), v)
                }
            };
            flags.values.entry(name).or_default().push(value);
        }
        Ok(flags)
    }

    /// The last value of a flag.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    /// Every value of a repeatable flag.
    pub fn all(&self, name: &str) -> &[String] {
        self.values.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether a switch was given.
    pub fn has(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// A flag parsed as `T`, `default` when absent.
    pub fn parsed<T: FromStr>(&self, name: &str, default: T) -> Result<T, String>
    where
        T::Err: Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| format!("--{name} {v:?}: {e}")),
        }
    }

    /// A flag that must be present.
    pub fn required(&self, name: &str) -> Result<&str, String> {
        self.get(name)
            .ok_or_else(|| format!("--{name} is required"))
    }
}

/// Nearest-rank percentile (`q` in 0..=100) of sorted samples; 0 when there are none.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50/p90/p99/max of microsecond samples, in milliseconds, as a JSON object.
pub fn summary_ms(samples: &mut [u64]) -> serde_json::Value {
    samples.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    serde_json::json!({
        "count": samples.len(),
        "p50": ms(percentile(samples, 50.0)),
        "p90": ms(percentile(samples, 90.0)),
        "p99": ms(percentile(samples, 99.0)),
        "max": ms(samples.last().copied().unwrap_or(0)),
    })
}

/// A parsed `http://host:port/path?query` URL (plain HTTP only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port`, for connecting and for the `Host` header.
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path_and_query: String,
}

impl FromStr for HttpUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| format!("{s:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if !authority.contains(':') {
            return Err(format!("{s:?}: the URL needs an explicit port"));
        }
        Ok(Self {
            authority: authority.to_string(),
            path_and_query: path.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&s, 50.0), 50);
        assert_eq!(percentile(&s, 99.0), 99);
        assert_eq!(percentile(&s, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn flags_and_urls() {
        let args = ["--a", "1", "--h", "x: y", "--h=z: w", "--quick"].map(String::from);
        let f = Flags::parse(args, &["quick"]).unwrap();
        assert_eq!(f.parsed("a", 0u32).unwrap(), 1);
        assert_eq!(f.all("h"), ["x: y", "z: w"]);
        assert!(f.has("quick"));
        let u: HttpUrl = "http://127.0.0.1:9/v1/x?chunks=2".parse().unwrap();
        assert_eq!(u.authority, "127.0.0.1:9");
        assert_eq!(u.path_and_query, "/v1/x?chunks=2");
        assert!("https://a:1/".parse::<HttpUrl>().is_err());
    }
}

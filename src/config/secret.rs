//! Secrets in config: `os.environ/NAME` (LiteLLM convention) or `${NAME}` references.

use std::fmt;

/// A secret value that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a resolved secret.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The raw value, for the one place that sends it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A masked form safe for logs and admin output: `sk-…abcd`.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

/// Masks a secret, keeping a short prefix and the last four characters when it is long enough.
pub fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let prefix: String = chars.iter().take(3).collect();
    let suffix: String = chars[chars.len() - 4..].iter().collect();
    format!("{prefix}…{suffix}")
}

/// Resolves `os.environ/NAME` or any `${NAME}` inside `raw` with `lookup`.
/// Errors name the missing variable.
pub fn resolve(raw: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if let Some(name) = raw.strip_prefix("os.environ/") {
        let name = name.trim();
        if name.is_empty() {
            return Err("empty environment variable name after os.environ/".to_string());
        }
        return lookup(name).ok_or_else(|| format!("environment variable {name} is not set"));
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${ in value".to_string())?;
        let name = after[..end].trim();
        if name.is_empty() {
            return Err("empty ${} reference".to_string());
        }
        let value =
            lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "K").then(|| "sk-secret-value-1234".to_string())
    }

    #[test]
    fn resolves_both_forms() {
        assert_eq!(
            resolve("os.environ/K", &env).unwrap(),
            "sk-secret-value-1234"
        );
        assert_eq!(resolve("${K}", &env).unwrap(), "sk-secret-value-1234");
        assert_eq!(
            resolve("Bearer ${K}", &env).unwrap(),
            "Bearer sk-secret-value-1234"
        );
        assert_eq!(resolve("plain", &env).unwrap(), "plain");
    }

    #[test]
    fn missing_variable_is_named() {
        let e = resolve("os.environ/NOPE", &env).unwrap_err();
        assert!(e.contains("NOPE"), "{e}");
        let e = resolve("${ALSO_NOPE}", &env).unwrap_err();
        assert!(e.contains("ALSO_NOPE"), "{e}");
    }

    #[test]
    fn masking_hides_the_middle() {
        let s = Secret::new("sk-secret-value-1234".into());
        assert_eq!(s.masked(), "sk-…1234");
        assert!(!format!("{s:?}").contains("secret-value"));
        assert_eq!(mask("short"), "…");
    }
}

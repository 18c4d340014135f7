//! Helpers shared by the fuzz targets.

use serde_json::{Map, Value};

/// JSON equality with floats allowed one unit in the last place apart.
///
/// The library parses and re-serialises small objects (slug metadata, `metadata.*` and
/// `stream_options.*` in request bodies). Without its `float_roundtrip` feature, which the
/// library does not enable, serde_json does not always read a float it wrote back as the same
/// float: `26666666666666666666666666` comes back 1 ULP off (docs/fuzzing.md, findings).
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(fx), Some(fy)) if x.is_f64() && y.is_f64() => {
                fx.to_bits().abs_diff(fy.to_bits()) <= 1
            }
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => same_map(x, y),
        _ => a == b,
    }
}

/// [`same_json`] for objects (serde_json's `Map` iterates in key order).
pub fn same_map(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && same_json(va, vb))
}

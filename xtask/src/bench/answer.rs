//! What `mp-client` answers in a job container (one JSON object per run),
//! read once into types: a key it lacks, or a figure that is not a
//! number, is an error here rather than a NaN in the report. Its keys are
//! named in this file only.

use serde_json::Value;

/// A loop's percentiles, in microseconds: none where no request of the
/// loop succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
}

impl Percentiles {
    pub fn read(v: &Value) -> anyhow::Result<Self> {
        Ok(Self {
            p50_us: optional(v, "p50_us")?,
            p90_us: optional(v, "p90_us")?,
            p99_us: optional(v, "p99_us")?,
        })
    }

    /// As mp-client writes them, for `latency_runs` in `--json`.
    pub fn to_json(self, failed: u64) -> Value {
        serde_json::json!({
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "failed": failed,
        })
    }
}

/// One target of an `interleave` run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetRun {
    pub percentiles: Percentiles,
    pub failed: u64,
}

/// `mp-client interleave`: each target's run, in the order given, once
/// every request succeeded.
pub fn interleave(v: &Value) -> anyhow::Result<Vec<TargetRun>> {
    ensure_ok(v, "latency")?;
    v.get("targets")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow::anyhow!("latency: no targets in {v}"))?
        .iter()
        .map(|t| {
            Ok(TargetRun {
                percentiles: Percentiles::read(t)?,
                failed: count(t, "failed")?,
            })
        })
        .collect()
}

/// `mp-client throughput`: requests per second, once none failed.
pub fn per_second(v: &Value, what: &str) -> anyhow::Result<f64> {
    anyhow::ensure!(count(v, "failed")? == 0, "throughput {what}: {v}");
    number(v, "per_second")
}

/// `mp-client download` and `upload`: what moved, and how fast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub mib_per_s: f64,
    pub seconds: f64,
}

impl Rate {
    pub fn read(v: &Value) -> anyhow::Result<Self> {
        Ok(Self {
            mib_per_s: number(v, "mib_per_s")?,
            seconds: number(v, "seconds")?,
        })
    }
}

/// That mp-client (or the bed) says the run went through.
pub fn ensure_ok(v: &Value, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(v.get("ok") == Some(&Value::Bool(true)), "{what}: {v}");
    Ok(())
}

/// An answer from the bed's IMDS client: its status and body.
pub fn imds_body<'v>(v: &'v Value, what: &str) -> anyhow::Result<&'v str> {
    anyhow::ensure!(
        v.get("status").and_then(Value::as_u64) == Some(200),
        "{what}: {v}"
    );
    v.get("body")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow::anyhow!("{what}: no body in {v}"))
}

fn number(v: &Value, key: &str) -> anyhow::Result<f64> {
    optional(v, key)?.ok_or_else(|| anyhow::anyhow!("{key} is null in {v}"))
}

fn optional(v: &Value, key: &str) -> anyhow::Result<Option<f64>> {
    match v.get(key) {
        None => anyhow::bail!("no {key} in {v}"),
        Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("{key} is not a number in {v}")),
    }
}

fn count(v: &Value, key: &str) -> anyhow::Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow::anyhow!("no count {key} in {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_missing_figure_is_an_error_and_a_null_one_is_none() {
        let run = json!({ "ok": true, "n": 2, "p50_us": 12.5, "p90_us": null, "p99_us": 30.0 });
        let p = Percentiles::read(&run).unwrap();
        assert_eq!(p.p50_us, Some(12.5));
        assert_eq!(p.p90_us, None);
        assert!(Percentiles::read(&json!({ "p50_us": 1.0 })).is_err());
        assert!(Rate::read(&json!({ "ok": true, "mib_per_s": 1.0 })).is_err());
        assert!(per_second(&json!({ "failed": 1, "per_second": 5.0 }), "x").is_err());
        assert!(ensure_ok(&json!({ "ok": false }), "x").is_err());
        let runs = interleave(&json!({ "ok": true, "n": 1, "targets": [
            { "p50_us": 1.0, "p90_us": 2.0, "p99_us": 3.0, "failed": 0 }
        ] }))
        .unwrap();
        assert_eq!(
            runs[0].percentiles.to_json(runs[0].failed),
            json!({ "p50_us": 1.0, "p90_us": 2.0, "p99_us": 3.0, "failed": 0 })
        );
    }
}

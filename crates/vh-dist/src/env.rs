//! The torchrun environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.

use crate::error::{DistError, Result};
use std::time::Duration;

/// Default timeout of rendezvous and collectives when `VH_DIST_TIMEOUT_S` is not set. Shorter
/// than torch's 30 minutes so that a dead rank surfaces quickly; long steps can raise it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Where this process sits in the job, as torchrun (or `cargo xtask launch`) describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank within this machine (selects the GPU).
    pub local_rank: usize,
    /// Host of rank 0's TCPStore.
    pub master_addr: String,
    /// Port of rank 0's TCPStore.
    pub master_port: u16,
    /// Timeout of rendezvous and of every collective (`VH_DIST_TIMEOUT_S`, else [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
}

impl DistEnv {
    /// Reads the torchrun variables of this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let req = |name: &'static str| get(name).ok_or(DistError::MissingEnv(name));
        let world_size: usize = parse("WORLD_SIZE", &req("WORLD_SIZE")?)?;
        let rank: usize = parse("RANK", &req("RANK")?)?;
        // torchrun always sets LOCAL_RANK; a hand-written single-node launch may not, and then
        // the global rank is the local one.
        let local_rank: usize = match get("LOCAL_RANK") {
            Some(v) => parse("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = req("MASTER_ADDR")?;
        let master_port: u16 = parse("MASTER_PORT", &req("MASTER_PORT")?)?;
        let timeout = match get("VH_DIST_TIMEOUT_S") {
            Some(v) => {
                let secs: f64 = parse("VH_DIST_TIMEOUT_S", &v)?;
                if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
                    return Err(invalid("VH_DIST_TIMEOUT_S", &v, "must be a positive number of seconds"));
                }
                Duration::from_secs_f64(secs)
            }
            None => DEFAULT_TIMEOUT,
        };
        let env = Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            timeout,
        };
        env.validate()?;
        Ok(env)
    }

    /// A single-process "job" on a local port (tests, and code that runs with or without a launcher).
    pub fn single(master_port: u16) -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".to_owned(),
            master_port,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Checks the fields against each other, with errors that name the variable.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.world_size > i32::MAX as usize {
            return Err(invalid(
                "WORLD_SIZE",
                &self.world_size.to_string(),
                "must be in 1..=2^31-1",
            ));
        }
        if self.rank >= self.world_size {
            return Err(invalid(
                "RANK",
                &self.rank.to_string(),
                &format!("must be below WORLD_SIZE={}", self.world_size),
            ));
        }
        if self.local_rank >= self.world_size {
            return Err(invalid(
                "LOCAL_RANK",
                &self.local_rank.to_string(),
                &format!("must be below WORLD_SIZE={}", self.world_size),
            ));
        }
        if self.master_addr.trim().is_empty() || self.master_addr.contains('\0') {
            return Err(invalid(
                "MASTER_ADDR",
                &self.master_addr,
                "must be a host name or address",
            ));
        }
        if self.master_port == 0 {
            return Err(invalid("MASTER_PORT", "0", "must be a port in 1..=65535"));
        }
        if self.timeout.is_zero() {
            return Err(invalid("VH_DIST_TIMEOUT_S", "0", "must be positive"));
        }
        Ok(())
    }
}

fn invalid(name: &'static str, value: &str, reason: &str) -> DistError {
    DistError::InvalidEnv {
        name,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

fn parse<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| invalid(name, value, &e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    const OK: [(&str, &str); 5] = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];

    #[test]
    fn parses_torchrun_variables() {
        let e = env(&OK).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.master_port), (1, 2, 1, 29500));
        assert_eq!(e.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn names_the_missing_variable() {
        for skip in ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"] {
            let pairs: Vec<_> = OK.iter().copied().filter(|(k, _)| *k != skip).collect();
            match env(&pairs) {
                Err(DistError::MissingEnv(name)) => assert_eq!(name, skip),
                other => panic!("{skip}: {other:?}"),
            }
        }
        let pairs: Vec<_> = OK.iter().copied().filter(|(k, _)| *k != "LOCAL_RANK").collect();
        assert_eq!(env(&pairs).unwrap().local_rank, 1);
    }

    #[test]
    fn refuses_invalid_values() {
        let cases = [
            ("RANK", "2"),
            ("RANK", "-1"),
            ("WORLD_SIZE", "0"),
            ("WORLD_SIZE", "two"),
            ("MASTER_PORT", "0"),
            ("MASTER_PORT", "70000"),
            ("MASTER_ADDR", " "),
            ("LOCAL_RANK", "5"),
            ("VH_DIST_TIMEOUT_S", "-3"),
            ("VH_DIST_TIMEOUT_S", "nan"),
        ];
        for (k, v) in cases {
            let mut pairs: Vec<_> = OK.iter().copied().filter(|(key, _)| *key != k).collect();
            pairs.push((k, v));
            match env(&pairs) {
                Err(DistError::InvalidEnv { name, .. }) => assert_eq!(name, k, "{k}={v}"),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
    }
}

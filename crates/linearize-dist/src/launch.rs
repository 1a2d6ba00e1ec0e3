//! Where this process stands in a data-parallel job, read from the environment that launchers
//! set: torchrun (and `linearize launch`) or SLURM's `srun`.
//!
//! | launcher | rank | world size | rank on the node | rendezvous |
//! |---|---|---|---|---|
//! | torchrun, `linearize launch` | `RANK` | `WORLD_SIZE` | `LOCAL_RANK` | `MASTER_ADDR`, `MASTER_PORT` |
//! | `srun` | `SLURM_PROCID` | `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`) | `SLURM_LOCALID` | `MASTER_ADDR` if set, else the first host of the step's node list; `MASTER_PORT` if set |
//!
//! torchrun's variables win when both are present (torchrun started inside a SLURM allocation).
//! Without either, or with a world of one, the job is a single process: no network, no NCCL.
//! `LINEARIZE_DIST=0` ignores the launch variables (one process inside a multi-task allocation).
use anyhow::{bail, ensure, Context, Result};
use std::process::Command;

/// The rendezvous port when `MASTER_PORT` is not set (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which environment described the launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchSource {
    /// No launcher: one process.
    Single,
    /// torchrun-style variables (`RANK`, `WORLD_SIZE`, ...), also set by `linearize launch`.
    Torchrun,
    /// SLURM task variables (`SLURM_PROCID`, ...).
    Slurm,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub source: LaunchSource,
    /// Global rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Index of this process on its node: picks its GPU.
    pub local_rank: usize,
    /// Host of rank 0's rendezvous socket (empty for a single process).
    pub master_addr: String,
    pub master_port: u16,
}

impl Launch {
    /// One process, no peers.
    pub fn single() -> Self {
        Self {
            source: LaunchSource::Single,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: String::new(),
            master_port: DEFAULT_MASTER_PORT,
        }
    }

    /// Reads the process environment (and runs `scontrol show hostnames` for a SLURM node list
    /// when it is available).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(&|name| std::env::var(name).ok(), &scontrol_first_host)
    }

    /// Like [`Launch::from_env`] with the variables from `var` and the SLURM node-list expansion
    /// from `first_host` (tests pass their own).
    pub fn from_vars(
        var: &dyn Fn(&str) -> Option<String>,
        first_host: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        if var("LINEARIZE_DIST").is_some_and(|v| matches!(v.trim(), "0" | "off" | "false")) {
            return Ok(Self::single());
        }
        let launch = if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            torchrun(var)?
        } else if var("SLURM_PROCID").is_some() && slurm_world_var(var).is_some() {
            slurm(var, first_host)?
        } else {
            return Ok(Self::single());
        };
        if launch.world_size == 1 {
            return Ok(Self::single());
        }
        Ok(launch)
    }

    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// `host:port` of rank 0's rendezvous socket.
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            // A bare IPv6 address.
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

fn torchrun(var: &dyn Fn(&str) -> Option<String>) -> Result<Launch> {
    let required = |name: &str| {
        var(name).with_context(|| {
            format!(
                "{name} is not set, but RANK/WORLD_SIZE are: a torchrun-style launch needs RANK, \
                 WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (`linearize launch` sets them)"
            )
        })
    };
    let world_size = parse_count("WORLD_SIZE", &required("WORLD_SIZE")?)?;
    let rank = parse_index("RANK", &required("RANK")?)?;
    ensure!(
        rank < world_size,
        "RANK={rank} is not below WORLD_SIZE={world_size}"
    );
    if world_size == 1 {
        return Ok(Launch::single());
    }
    let local_rank = parse_index("LOCAL_RANK", &required("LOCAL_RANK")?)?;
    if let Some(local_world) = var("LOCAL_WORLD_SIZE") {
        let local_world = parse_count("LOCAL_WORLD_SIZE", &local_world)?;
        ensure!(
            local_rank < local_world,
            "LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_world}"
        );
    }
    let master_addr = required("MASTER_ADDR")?;
    ensure!(!master_addr.trim().is_empty(), "MASTER_ADDR is empty");
    let mut port = master_port(var)?;
    if var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        // torchrun's agent already serves its own key-value store on MASTER_PORT (for
        // torch.distributed, which this is not): rendezvous on the next port.
        port = port.checked_add(1).with_context(|| {
            format!("MASTER_PORT={port} is the last port: no room for the rendezvous after it")
        })?;
    }
    Ok(Launch {
        source: LaunchSource::Torchrun,
        rank,
        world_size,
        local_rank,
        master_addr: master_addr.trim().to_owned(),
        master_port: port,
    })
}

fn slurm_world_var(var: &dyn Fn(&str) -> Option<String>) -> Option<(&'static str, String)> {
    // The step's task count: SLURM_NTASKS describes the allocation, which a step may not fill.
    ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]
        .into_iter()
        .find_map(|name| var(name).map(|v| (name, v)))
}

fn slurm(
    var: &dyn Fn(&str) -> Option<String>,
    first_host: &dyn Fn(&str) -> Option<String>,
) -> Result<Launch> {
    let (world_name, world) = slurm_world_var(var).expect("checked by the caller");
    let world_size = parse_count(world_name, &world)?;
    let rank = parse_index(
        "SLURM_PROCID",
        &var("SLURM_PROCID").expect("checked by the caller"),
    )?;
    ensure!(
        rank < world_size,
        "SLURM_PROCID={rank} is not below {world_name}={world_size}"
    );
    if world_size == 1 {
        return Ok(Launch::single());
    }
    let local_rank = parse_index(
        "SLURM_LOCALID",
        &var("SLURM_LOCALID").context("SLURM_LOCALID is not set, but SLURM_PROCID is")?,
    )?;
    let master_addr = match var("MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
        Some(addr) => addr.trim().to_owned(),
        None => {
            let (name, list) = ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]
                .into_iter()
                .find_map(|name| var(name).map(|v| (name, v)))
                .context(
                    "SLURM launch without MASTER_ADDR and without SLURM_STEP_NODELIST, \
                     SLURM_JOB_NODELIST or SLURM_NODELIST: cannot tell where rank 0 runs; export \
                     MASTER_ADDR (e.g. $(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1))",
                )?;
            match first_host(&list) {
                Some(host) => host,
                None => first_node(&list).with_context(|| format!("{name}={list:?}"))?,
            }
        }
    };
    Ok(Launch {
        source: LaunchSource::Slurm,
        rank,
        world_size,
        local_rank,
        master_addr,
        master_port: master_port(var)?,
    })
}

fn master_port(var: &dyn Fn(&str) -> Option<String>) -> Result<u16> {
    match var("MASTER_PORT") {
        None => Ok(DEFAULT_MASTER_PORT),
        Some(port) => match port.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => bail!("MASTER_PORT={port:?} is not a TCP port (1-65535)"),
        },
    }
}

fn parse_index(name: &str, value: &str) -> Result<usize> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .with_context(|| format!("{name}={value:?} is not a non-negative integer"))
}

fn parse_count(name: &str, value: &str) -> Result<usize> {
    match parse_index(name, value)? {
        0 => bail!("{name}=0: the job needs at least one process"),
        n => Ok(n),
    }
}

/// The first host of a SLURM node list as `scontrol show hostnames` expands it, when scontrol
/// exists and succeeds.
fn scontrol_first_host(list: &str) -> Option<String> {
    let output = Command::new("scontrol")
        .args(["show", "hostnames", list])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout)
        .ok()?
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// The first host of a SLURM node list in its compact forms, without scontrol: `node07`,
/// `node[03-06,9]`, `gpu-[001-004]-ib,login1` (the first range's first number, zero padding kept).
pub fn first_node(list: &str) -> Result<String> {
    let list = list.trim();
    ensure!(!list.is_empty(), "the SLURM node list is empty");
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0usize;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let entry = &list[..end];
    let Some(open) = entry.find('[') else {
        return Ok(entry.to_owned());
    };
    let close = entry[open..]
        .find(']')
        .map(|i| open + i)
        .with_context(|| format!("unbalanced '[' in the SLURM node list {list:?}"))?;
    let ranges = &entry[open + 1..close];
    let first = ranges
        .split(',')
        .next()
        .and_then(|r| r.split('-').next())
        .map(str::trim)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("cannot read the node range [{ranges}] of {list:?}"))?;
    ensure!(
        !entry[close + 1..].contains('['),
        "node lists with several bracket groups per name ({list:?}) need scontrol; export MASTER_ADDR"
    );
    Ok(format!("{}{first}{}", &entry[..open], &entry[close + 1..]))
}

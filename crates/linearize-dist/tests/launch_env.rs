//! Reading the launch environment: torchrun, SLURM, none, and bad values.
use linearize_dist::{first_node, Launch, LaunchSource, DEFAULT_MASTER_PORT};
use std::collections::HashMap;

fn launch(vars: &[(&str, &str)]) -> anyhow::Result<Launch> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Launch::from_vars(&|name| vars.get(name).cloned(), &|_| None)
}

fn error(vars: &[(&str, &str)]) -> String {
    format!("{:#}", launch(vars).unwrap_err())
}

#[test]
fn no_launcher_is_a_world_of_one() {
    let l = launch(&[("PATH", "/bin")]).unwrap();
    assert_eq!(l, Launch::single());
    assert!(!l.is_distributed() && l.is_main());
    // A world of one needs no rendezvous variables.
    let l = launch(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
    assert_eq!(l.source, LaunchSource::Single);
    // Explicitly off.
    let l = launch(&[("LINEARIZE_DIST", "0"), ("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap();
    assert_eq!(l, Launch::single());
}

#[test]
fn torchrun_variables() {
    let l = launch(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node01"),
        ("MASTER_PORT", "29611"),
    ])
    .unwrap();
    assert_eq!(l.source, LaunchSource::Torchrun);
    assert_eq!((l.rank, l.world_size, l.local_rank), (3, 8, 1));
    assert_eq!(l.master(), "node01:29611");
    // MASTER_PORT defaults to torchrun's.
    let l = launch(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "::1"),
    ])
    .unwrap();
    assert_eq!(l.master_port, DEFAULT_MASTER_PORT);
    assert_eq!(l.master(), "[::1]:29500");
    // Under torchrun's agent (which serves its own store on MASTER_PORT) the next port.
    let l = launch(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29400"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ])
    .unwrap();
    assert_eq!(l.master_port, 29401);
    // torchrun's variables win inside a SLURM allocation.
    let l = launch(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "0"),
    ])
    .unwrap();
    assert_eq!(
        (l.source, l.rank, l.world_size),
        (LaunchSource::Torchrun, 1, 2)
    );
}

#[test]
fn slurm_variables() {
    let base = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[007-008,011]"),
    ];
    let l = launch(&base).unwrap();
    assert_eq!(l.source, LaunchSource::Slurm);
    assert_eq!((l.rank, l.world_size, l.local_rank), (5, 8, 1));
    assert_eq!(l.master(), "gpu007:29500");
    // The step's own task count and node list win over the allocation's.
    let mut vars = base.to_vec();
    vars.extend([
        ("SLURM_STEP_NUM_TASKS", "6"),
        ("SLURM_STEP_NODELIST", "a100-n[3-4]"),
        ("MASTER_PORT", "4000"),
    ]);
    let l = launch(&vars).unwrap();
    assert_eq!((l.world_size, l.master().as_str()), (6, "a100-n3:4000"));
    // MASTER_ADDR set by the batch script wins over the node list.
    vars.push(("MASTER_ADDR", "10.0.0.7"));
    assert_eq!(launch(&vars).unwrap().master_addr, "10.0.0.7");
    // scontrol's expansion, when available, is used.
    let l = Launch::from_vars(
        &|name| {
            base.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        },
        &|list| (list == "gpu[007-008,011]").then(|| "gpu007.cluster".to_string()),
    )
    .unwrap();
    assert_eq!(l.master_addr, "gpu007.cluster");
    // A batch step of one task is a single process.
    let l = launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap();
    assert_eq!(l, Launch::single());
}

#[test]
fn bad_values_name_the_variable() {
    let e = error(&[("RANK", "one"), ("WORLD_SIZE", "2")]);
    assert!(
        e.contains("RANK=\"one\" is not a non-negative integer"),
        "{e}"
    );
    let e = error(&[("RANK", "2"), ("WORLD_SIZE", "2")]);
    assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
    let e = error(&[("RANK", "0"), ("WORLD_SIZE", "0")]);
    assert!(e.contains("WORLD_SIZE=0"), "{e}");
    let e = error(&[("RANK", "0")]);
    assert!(e.contains("WORLD_SIZE is not set"), "{e}");
    let e = error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]);
    assert!(e.contains("LOCAL_RANK is not set"), "{e}");
    let e = error(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("MASTER_ADDR is not set"), "{e}");
    let e = error(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "70000"),
    ]);
    assert!(e.contains("MASTER_PORT=\"70000\" is not a TCP port"), "{e}");
    let e = error(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "2"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
    ]);
    assert!(
        e.contains("LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
        "{e}"
    );
    let e = error(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")]);
    assert!(
        e.contains("SLURM_PROCID=4 is not below SLURM_NTASKS=4"),
        "{e}"
    );
    let e = error(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "1"),
    ]);
    assert!(e.contains("export MASTER_ADDR"), "{e}");
    let e = error(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "x"),
        ("SLURM_NODELIST", "n1"),
    ]);
    assert!(e.contains("SLURM_LOCALID=\"x\""), "{e}");
}

#[test]
fn compact_node_lists() {
    assert_eq!(first_node("node07").unwrap(), "node07");
    assert_eq!(first_node("node[03-06,9]").unwrap(), "node03");
    assert_eq!(first_node("gpu-[001-004]-ib,login1").unwrap(), "gpu-001-ib");
    assert_eq!(first_node("a1,b[2-3]").unwrap(), "a1");
    assert_eq!(first_node(" c[5] ").unwrap(), "c5");
    assert!(first_node("").is_err());
    assert!(first_node("n[1-2").is_err());
    assert!(first_node("n[x-y]").is_err());
}

//! The rendezvous and the CPU (TCP) backend, with the ranks as threads of one test process.
use linearize_dist::{Launch, LaunchSource, Options, ProcessGroup, ReduceOp};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn launch(rank: usize, world_size: usize, port: u16) -> Launch {
    Launch {
        source: LaunchSource::Torchrun,
        rank,
        world_size,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

fn options(fingerprint: &str, bootstrap_s: f64) -> Options {
    Options {
        bootstrap_timeout: Duration::from_secs_f64(bootstrap_s),
        timeout: Duration::from_secs(30),
        // Small buckets, so that several tensors share one and large ones get their own.
        bucket_bytes: 64,
        fingerprint: fingerprint.into(),
    }
}

/// Runs `body(group)` on `world` ranks (threads) and returns their results in rank order.
fn run_ranks<T: Send + 'static>(
    world: usize,
    fingerprints: &[&str],
    body: impl Fn(ProcessGroup) -> anyhow::Result<T> + Send + Sync + Clone + 'static,
) -> Vec<anyhow::Result<T>> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let body = body.clone();
            let fingerprint = fingerprints[rank.min(fingerprints.len() - 1)].to_string();
            std::thread::spawn(move || {
                let group = ProcessGroup::init(
                    &launch(rank, world, port),
                    Device::Cpu,
                    &options(&fingerprint, 20.0),
                )?;
                body(group)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn collectives_agree_across_three_ranks() {
    let results = run_ranks(3, &["job"], |group| {
        let r = group.rank() as f32;
        assert_eq!(group.backend_name(), "tcp");
        // Mixed dtypes and sizes, one non-contiguous tensor, one empty.
        let mut tensors = vec![
            Tensor::from_slice(&[r, 1.0, 2.0]),
            Tensor::from_slice(&[r as f64 * 10.0]),
            Tensor::arange(40, (Kind::Float, Device::Cpu)).f_add_scalar(r as f64)?,
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
                .view([2, 2])
                .transpose(0, 1),
            Tensor::zeros([0], (Kind::Float, Device::Cpu)),
        ];
        group.all_reduce(&mut tensors, ReduceOp::Sum)?;
        let mut mean = vec![Tensor::from_slice(&[r, 2.0 * r])];
        group.all_reduce_mean(&mut mean)?;
        let mut max = [r as f64, -(r as f64)];
        group.all_reduce_f64(&mut max, ReduceOp::Max)?;
        let mut shared = vec![Tensor::from_slice(&[r, r])];
        group.broadcast(&mut shared, 2)?;
        let bytes = group.broadcast_bytes(format!("from {}", group.rank()).as_bytes())?;
        let any = group.any(group.rank() == 1)?;
        let none = group.any(false)?;
        group.barrier("test end")?;
        Ok((tensors, mean, max, shared, bytes, any, none))
    });
    for result in results {
        let (tensors, mean, max, shared, bytes, any, none) = result.unwrap();
        assert_eq!(Vec::<f32>::try_from(&tensors[0]).unwrap(), [3.0, 3.0, 6.0]);
        assert_eq!(Vec::<f64>::try_from(&tensors[1]).unwrap(), [30.0]);
        let arange: Vec<f32> = (0..40).map(|i| 3.0 * i as f32 + 3.0).collect();
        assert_eq!(Vec::<f32>::try_from(&tensors[2]).unwrap(), arange);
        let t = Vec::<f32>::try_from(tensors[3].contiguous().view([-1])).unwrap();
        assert_eq!(t, [3.0, 9.0, 6.0, 12.0]);
        assert_eq!(Vec::<f32>::try_from(&mean[0]).unwrap(), [1.0, 2.0]);
        assert_eq!(max, [2.0, 0.0]);
        assert_eq!(Vec::<f32>::try_from(&shared[0]).unwrap(), [2.0, 2.0]);
        assert_eq!(bytes, b"from 0");
        assert!(any && !none);
    }
}

#[test]
fn ensure_same_names_the_rank_that_differs() {
    let results = run_ranks(3, &["job"], |group| {
        let value = if group.rank() == 2 { "other" } else { "same" };
        group.ensure_same("the initial trainable parameters", b"same")?;
        group.ensure_same("the initial trainable parameters", value.as_bytes())
    });
    for result in results {
        let e = format!("{:#}", result.unwrap_err());
        assert!(
            e.contains("the initial trainable parameters differs between ranks"),
            "{e}"
        );
        assert!(e.contains("rank 2 has") && !e.contains("rank 1 has"), "{e}");
    }
}

#[test]
fn a_different_job_is_refused_at_the_rendezvous() {
    let results = run_ranks(2, &["recipe-a", "recipe-b"], |_| Ok(()));
    for result in results {
        let e = format!("{:#}", result.unwrap_err());
        assert!(e.contains("rank 1 runs a different job than rank 0"), "{e}");
    }
}

/// The error of rank `rank` of `world` that meets no other rank, with a timeout of `secs`;
/// checks that it comes well within 10 s.
fn lone_rank_error(rank: usize, world: usize, secs: f64) -> String {
    let start = Instant::now();
    let e = ProcessGroup::init(
        &launch(rank, world, free_port()),
        Device::Cpu,
        &options("job", secs),
    )
    .err()
    .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    format!("{e:#}")
}

#[test]
fn a_missing_rank_is_an_error_within_the_timeout() {
    let e = lone_rank_error(0, 3, 1.5);
    assert!(
        e.contains("timed out after 1 s waiting for rank(s) [1, 2] of 3"),
        "{e}"
    );

    // A rank whose rank 0 never comes.
    let e = lone_rank_error(1, 2, 1.0);
    assert!(
        e.contains("rank 1: could not reach rank 0 at 127.0.0.1"),
        "{e}"
    );

    // Rank 1 arrives, rank 2 does not: rank 1 hears why from rank 0.
    let port = free_port();
    let zero = std::thread::spawn(move || {
        ProcessGroup::init(&launch(0, 3, port), Device::Cpu, &options("job", 2.0)).map(|_| ())
    });
    let one = ProcessGroup::init(&launch(1, 3, port), Device::Cpu, &options("job", 2.0));
    let e = format!("{:#}", one.err().unwrap());
    assert!(
        e.contains("refused by rank 0") && e.contains("rank(s) [2]"),
        "{e}"
    );
    assert!(zero.join().unwrap().is_err());
}

#[test]
fn a_failed_or_vanished_rank_stops_the_others_with_its_reason() {
    let results = run_ranks(3, &["job"], |group| {
        group.barrier("warm-up")?;
        match group.rank() {
            1 => {
                group.abort("CUDA out of memory (simulated)");
                Ok(())
            }
            _ => {
                let mut t = vec![Tensor::from_slice(&[1.0f32])];
                group.all_reduce(&mut t, ReduceOp::Sum)
            }
        }
    });
    let e0 = format!("{:#}", results[0].as_ref().unwrap_err());
    assert!(
        e0.contains("rank 1 failed") && e0.contains("simulated"),
        "{e0}"
    );
    // Rank 2 learns of it through rank 0 failing in turn (its link to rank 0 drops).
    assert!(results[2].is_err());

    let results = run_ranks(2, &["job"], |group| {
        group.barrier("warm-up")?;
        if group.rank() == 1 {
            // Dropping the group leaves the job (goodbye, links closed).
            drop(group);
            return Ok(());
        }
        let mut t = vec![Tensor::from_slice(&[1.0f32])];
        group.all_reduce(&mut t, ReduceOp::Sum)
    });
    let e = format!("{:#}", results[0].as_ref().unwrap_err());
    assert!(e.contains("rank 1 left the job"), "{e}");
}

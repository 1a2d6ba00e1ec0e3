//! The profiler on this machine's CPU: a real trace of real operators, read back.
use linearize_profile::summary::Summary;
use linearize_profile::{range, Profiler};
use tch::{Device, Kind, Tensor};

#[test]
fn a_cpu_trace_records_ranges_and_operators_and_one_profiler_runs_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("traces/cpu.json");
    let a = Tensor::randn([64, 64], (Kind::Float, Device::Cpu));
    let profiler = Profiler::start(false).unwrap();
    let e = Profiler::start(false).err().unwrap().to_string();
    assert!(e.contains("already running"), "{e}");
    for _ in 0..3 {
        let _update = range("update");
        {
            let _mm = range("matmuls");
            let _ = a.mm(&a).mm(&a);
        }
        let _ = a.sigmoid();
    }
    profiler.finish(&path).unwrap();

    let s = Summary::from_trace(&path, "update", 1).unwrap();
    assert_eq!((s.units, s.gpu), (2, false));
    let mm = s.by_op.iter().find(|r| r.name == "aten::mm").unwrap();
    assert_eq!(mm.calls_per_unit, 2.0);
    let matmuls = s.by_range.iter().find(|r| r.name == "matmuls").unwrap();
    assert!(matmuls.ms_per_unit >= mm.ms_per_unit, "{matmuls:?} {mm:?}");
    assert!(s.by_range.iter().any(|r| r.name == "(no range)"));
    assert!(s.busy_ms_per_unit > 0.0 && s.busy_ms_per_unit <= s.wall_ms_per_unit);

    // A new profile can start once the last one finished; an unfinished one is discarded.
    drop(Profiler::start(false).unwrap());
    let e = Summary::from_trace(&dir.path().join("none.json"), "update", 0).unwrap_err();
    assert!(format!("{e:#}").contains("none.json"), "{e:#}");
}

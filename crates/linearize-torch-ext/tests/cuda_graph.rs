//! CUDA graphs: a captured computation replays on new inputs copied into its input tensor; a
//! failing body reports its error; on a machine without a GPU the capture fails with an error,
//! not a crash. One test: a capture in progress must not meet another thread's CUDA work (its
//! random numbers, say).
use linearize_torch_ext::CudaGraph;
use tch::{Device, Kind, Tensor};

#[test]
fn replays_the_captured_work_reports_failures_or_explains_why_not() {
    if !tch::Cuda::is_available() {
        let mut ran = false;
        let err = CudaGraph::capture(0, || {
            ran = true;
            Ok(())
        })
        .err()
        .expect("no GPU: capturing must fail");
        assert!(!ran, "the body ran although no capture started");
        assert!(
            format!("{err:#}").contains("capturing a CUDA graph"),
            "{err:#}"
        );
        return;
    }
    let device = Device::Cuda(0);
    let mut input = Tensor::zeros([4, 8], (Kind::Float, device));
    let weight = Tensor::randn([8, 3], (Kind::Float, device));
    let mut output = Tensor::zeros([4, 3], (Kind::Float, device));
    // Eager once first: lazy set-up (cuBLAS handles) happens outside the capture.
    let _ = input.matmul(&weight).relu();
    let graph = CudaGraph::capture(0, || {
        output = input.matmul(&weight).relu();
        Ok(())
    })
    .unwrap();
    for round in 0..3 {
        let x = Tensor::randn([4, 8], (Kind::Float, device));
        input.copy_(&x);
        graph.replay().unwrap();
        let expected = x.matmul(&weight).relu();
        assert!(
            output.allclose(&expected, 1e-5, 1e-5, false),
            "round {round}: replay differs from eager"
        );
    }
    let err = CudaGraph::capture(0, || anyhow::bail!("body says no"))
        .err()
        .expect("the body failed");
    assert!(format!("{err:#}").contains("body says no"), "{err:#}");
}

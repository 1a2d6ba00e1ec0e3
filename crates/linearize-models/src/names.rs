//! Human names of libtorch's dtypes and devices, as reports, tables and logs print them (the
//! names `--dtype` and `--device` take, not tch's debug names).
use tch::{Device, Kind};

/// `f32`, `bf16`, `f16`, ... for a dtype.
pub fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "f32".into(),
        Kind::BFloat16 => "bf16".into(),
        Kind::Half => "f16".into(),
        Kind::Double => "f64".into(),
        Kind::Int64 => "i64".into(),
        Kind::Int => "i32".into(),
        Kind::Bool => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// `CPU`, `CUDA:0`, `MPS`, `Vulkan` for a device.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "CPU".into(),
        Device::Cuda(i) => format!("CUDA:{i}"),
        Device::Mps => "MPS".into(),
        Device::Vulkan => "Vulkan".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_command_line_spellings() {
        assert_eq!(dtype_name(Kind::Float), "f32");
        assert_eq!(dtype_name(Kind::BFloat16), "bf16");
        assert_eq!(device_name(Device::Cpu), "CPU");
        assert_eq!(device_name(Device::Cuda(1)), "CUDA:1");
    }
}

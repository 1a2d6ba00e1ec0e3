//! libtorch reports its errors (CUDA out of memory above all) through tch's panicking calls,
//! with the whole C++ stack in the message. Those are not bugs of linearize but conditions of
//! the machine: the binary says the first line of libtorch's message, with a hint for memory,
//! and ends with status 1 like any other error instead of a panic's status 101. Any other panic
//! keeps Rust's own report.
use linearize_torch_ext::torch_error::{libtorch_first_line, panic_message};
use std::any::Any;
use std::panic::PanicHookInfo;

/// Installs the hook that reports libtorch errors in one line (other panics as before).
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info: &PanicHookInfo| {
        match torch_error(info.payload()) {
            Some(line) => eprintln!("error: {line}"),
            None => default(info),
        }
    }));
}

/// Whether a caught panic was a libtorch error (already reported by the hook).
pub fn is_torch_error(payload: &(dyn Any + Send)) -> bool {
    torch_error(payload).is_some()
}

/// `libtorch: <first line of its message>` (and a hint when memory ran out), if the panic
/// carries a libtorch error.
fn torch_error(payload: &(dyn Any + Send)) -> Option<String> {
    let line = libtorch_first_line(panic_message(payload)?)?;
    let hint = if line.contains("out of memory") {
        " (lower data.batch_size or the stage's batch_size, set lora.activation_checkpointing, \
         or run fewer jobs on this device)"
    } else {
        ""
    };
    Some(format!("libtorch: {line}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libtorch_error_becomes_its_first_line() {
        let panic: Box<dyn Any + Send> = Box::new(String::from(
            "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to \
             allocate 8.00 GiB.\\nException raised from malloc at CUDACachingAllocator.cpp:1574 \
             (most recent call first):\\nframe #0: c10::Error::Error\")",
        ));
        let line = torch_error(panic.as_ref()).unwrap();
        assert!(
            line.starts_with("libtorch: CUDA out of memory. Tried to allocate 8.00 GiB. (lower"),
            "{line}"
        );
        assert!(!line.contains("frame") && !line.contains('\n'), "{line}");

        let short: Box<dyn Any + Send> = Box::new(String::from(
            "called `Result::unwrap()` on an `Err` value: Torch(\"shape mismatch\")",
        ));
        assert_eq!(
            torch_error(short.as_ref()).unwrap(),
            "libtorch: shape mismatch"
        );
    }

    #[test]
    fn other_panics_are_left_to_rust() {
        let bug: Box<dyn Any + Send> = Box::new("index out of bounds");
        assert!(torch_error(bug.as_ref()).is_none());
        assert!(!is_torch_error(bug.as_ref()));
        let odd: Box<dyn Any + Send> = Box::new(42u32);
        assert!(torch_error(odd.as_ref()).is_none());
    }
}

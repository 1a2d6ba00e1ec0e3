//! libtorch errors reach Rust as tch panics whose message is the `Debug` form of its error:
//! `... Torch("<what went wrong>\n<the whole C++ stack>")`. Users need the first line.
use std::any::Any;

/// The text of a panic's payload, if it is a string.
pub fn panic_message(payload: &(dyn Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// The first line of the libtorch error a panic message carries, if it carries one.
pub fn libtorch_first_line(message: &str) -> Option<&str> {
    let start = message.find("Torch(\"")? + "Torch(\"".len();
    let text = &message[start..];
    // The Debug form escapes the message's newlines.
    let end = ["\\n", "\")"]
        .iter()
        .filter_map(|stop| text.find(stop))
        .min()
        .unwrap_or(text.len());
    Some(text[..end].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_of_a_libtorch_error_without_its_frames() {
        let message = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA error: operation \
                       not permitted when stream is capturing\\nSearch for ...\\nframe #0: x\")";
        assert_eq!(
            libtorch_first_line(message),
            Some("CUDA error: operation not permitted when stream is capturing")
        );
        assert_eq!(libtorch_first_line("index out of bounds"), None);
        let payload: Box<dyn Any + Send> = Box::new(String::from("a"));
        assert_eq!(panic_message(payload.as_ref()), Some("a"));
        let odd: Box<dyn Any + Send> = Box::new(1u8);
        assert_eq!(panic_message(odd.as_ref()), None);
    }
}

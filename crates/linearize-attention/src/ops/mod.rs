//! Attention kernels, one module per method, each with `naive` (L x L reference), `chunked`
//! (training / prefill, takes and returns a state) and `recurrent` / `step` (decoding) forms.
pub mod gated_deltanet;
pub mod gdn_window;
pub mod gla;
pub mod liger;
pub mod linear_attn;
pub mod lizard;
pub mod lolcats;
pub mod swa;
pub mod window;

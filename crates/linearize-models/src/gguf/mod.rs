//! GGUF (llama.cpp's model format): reading, dequantisation, and import of llama-architecture
//! models into a transformers-layout directory (config, safetensors, tokenizer).
mod convert;
mod dequant;
mod ggml_type;
mod hparams;
mod reader;
mod tensor_map;
mod tokenizer;
mod value;

pub use convert::{import, Dtype, ImportSummary, IMPORT_FORMAT_VERSION, IMPORT_RECORD};
pub use dequant::dequantize;
pub use ggml_type::{GgmlType, DEQUANTIZABLE};
pub use hparams::{LlamaHparams, SUPPORTED_ARCHITECTURES};
pub use reader::{GgufFile, TensorInfo};
pub use tokenizer::{convert as convert_tokenizer, ConvertedTokenizer, RoleToken};
pub use value::Value;

//! Llama-family models on libtorch: HF configs and checkpoints, tokenizer and chat template,
//! hub resolution, GGUF import, KV cache and generation.
pub mod atomic;
pub mod chat_template;
pub mod config;
pub mod config_check;
pub mod generate;
pub mod gguf;
pub mod graph_decode;
pub mod http;
pub mod hub_dataset;
pub mod linear;
pub mod llama;
pub mod lm;
pub mod markdown_table;
pub mod mixer;
pub mod multimodal;
pub mod mutation;
pub mod names;
pub mod offline;
pub mod prompt_format;
pub mod relative_path;
pub mod rope;
pub mod source;
pub mod stop;
pub mod tokenizer;
pub mod weights;

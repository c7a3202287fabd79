//! The modelc runtime: executing compiled programs and the commands that do
//! it. `cpu` holds the CPU backend (Cranelift kernels, gemm, one memory
//! arena); `weights` initialisation and safetensors; `train` and `infer`
//! the commands of the same names.

pub mod budget;
pub mod build;
pub mod cli;
pub mod cpu;
pub mod embed;
pub mod examples;
pub mod flags;
pub mod forward;
pub mod gpu;
pub mod hnsw;
pub mod infer;
pub mod masking;
pub mod memory;
pub mod merge;
pub mod model;
pub mod pages;
pub mod plot;
pub mod profile;
pub mod quantize;
pub mod retrieval;
pub mod run_dir;
pub mod seq2seq;
pub mod tokenize;
pub mod train;
pub mod weights;

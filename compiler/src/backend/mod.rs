//! Backends: the kernel schedule and memory plan every backend shares,
//! Cranelift code generation for the CPU, and WGSL for the GPU.

pub mod clif;
pub mod plan;
pub mod rows;
pub mod schedule;
pub mod split;
pub mod vmath;
pub mod wgsl;

//! Backends: the kernel schedule and memory plan every backend shares, and
//! Cranelift code generation for the CPU.

pub mod clif;
pub mod plan;
pub mod schedule;

//! The modelc runtime: executing compiled programs. `cpu` holds the CPU
//! backend (Cranelift kernels, gemm, one memory arena).

pub mod cpu;

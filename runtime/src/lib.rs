//! The modelc runtime: tensors, buffers and the execution of compiled
//! programs. It is filled in as the IR, the interpreter and the backends land;
//! the front end (`modelc` crate) does not depend on it.

//! modelc: from declarative `.model` specs to checked, shape-inferred models.
//!
//! The pipeline starts here: [`syntax`] parses files into trees with spans,
//! [`check`] resolves imports and names, elaborates a model with concrete
//! hyperparameters and infers every tensor shape, reporting [`diag`]nostics.

pub mod backend;
pub mod check;
pub mod diag;
pub mod draw;
pub mod draw_plan;
pub mod ir;
pub mod opt;
pub mod peft;
pub mod scalar;
pub mod source;
pub mod spec;
pub mod syntax;
pub mod types;

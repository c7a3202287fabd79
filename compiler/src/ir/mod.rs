//! The tensor IR and what works on it: lowering from the checker, the
//! reference interpreter, reverse-mode autodiff and the training program.

pub mod attention;
pub mod conv;
pub mod experts;
pub mod grad;
pub mod graph;
pub mod hoist;
pub mod interp;
pub mod last_position;
pub mod lower;
pub mod parse;
pub mod print;
pub mod prune;
pub mod signature;
pub mod topk;
pub mod train;
pub mod verify;

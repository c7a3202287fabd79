//! Syntax: the grammar, the tree, the parser, the canonical printer and the
//! span-free tree dump.

pub mod ast;
mod dump;
mod parse;
mod print;

pub use dump::dump_module;
pub use parse::{parse, parse_expr};
pub use print::{float_text, print_expr, print_module};

//! Typed indices into the checker's tables: a layer instance
//! (`Checked::instances`) and a weight (`Checked::params`), so that one
//! cannot be used for the other or for a plain count.

use std::fmt;

macro_rules! id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("Index of ", $what, ".")]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(u32);

        impl $name {
            /// The id of the entry at `index`; tables stay far below 2^32 entries
            /// (`MAX_INSTANCES` bounds them).
            pub fn new(index: usize) -> $name {
                $name(u32::try_from(index).expect("bug: a checker table past 2^32 entries"))
            }

            pub fn index(self) -> usize {
                self.0 as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id!(InstId, "a layer instance");
id!(ParamId, "a weight");

//! What each named input and output of a program is for. Names remain the
//! interface (a training state file holds `m:NAME`; a decoder feeds
//! `past.0.key`), but they are spelt and read here only: `Role::name` makes
//! one, `Role::of` decodes one, so no pass or command matches on prefixes.

/// The role of a program input or output, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role<'a> {
    /// A weight, a data input (`input_ids`) or a model output (`logits`, `loss`).
    Plain(&'a str),
    /// The training program's updated value of a weight.
    Updated(&'a str),
    /// AdamW's first moment of a weight (optimiser state, saved with the weights).
    FirstMoment(&'a str),
    /// AdamW's second moment of a weight.
    SecondMoment(&'a str),
    /// SGD's momentum buffer of a weight.
    Momentum(&'a str),
    /// The gradient of the loss with respect to a weight.
    Gradient(&'a str),
    /// A decoder's key/value cache of a layer (`kind` is `key` or `value`), as
    /// the program reads it.
    CacheIn { layer: usize, kind: &'a str },
    /// The same cache with the new positions written, as the program returns it.
    CacheOut { layer: usize, kind: &'a str },
    /// A layer call's output, `PATH (Layer)`, kept for diagnosis.
    Trace(&'a str),
    /// A value the training program reports beside the loss: a mixture's
    /// tokens per expert (`expert_load.0`, `expert_load.1`, ...; layer order)
    /// and the weighted sum of auxiliary losses (`aux_loss`).
    Metric(&'a str),
    /// A value computed once for many runs of a program that reads it
    /// (`ir::hoist`: an encoder's output and its cross-attention keys
    /// while a decoder generates), by number.
    Hoisted(&'a str),
}

const UPDATED: &str = "new:";
const FIRST_MOMENT: &str = "m:";
const SECOND_MOMENT: &str = "v:";
const MOMENTUM: &str = "momentum:";
const GRADIENT: &str = "grad:";
const TRACE: &str = "trace:";
const METRIC: &str = "metric:";
const HOISTED: &str = "hoisted:";
/// The metric a mixture's tokens per expert is reported as, with its number.
pub const EXPERT_LOAD: &str = "expert_load.";
const CACHE_IN: &str = "past.";
const CACHE_OUT: &str = "present.";

impl<'a> Role<'a> {
    /// The role a name spells.
    pub fn of(name: &'a str) -> Role<'a> {
        type Named<'a> = fn(&'a str) -> Role<'a>;
        let prefixed: [(&str, Named<'a>); 8] = [
            (UPDATED, Role::Updated),
            (FIRST_MOMENT, Role::FirstMoment),
            (SECOND_MOMENT, Role::SecondMoment),
            (MOMENTUM, Role::Momentum),
            (GRADIENT, Role::Gradient),
            (TRACE, Role::Trace),
            (METRIC, Role::Metric),
            (HOISTED, Role::Hoisted),
        ];
        for (prefix, role) in prefixed {
            if let Some(rest) = name.strip_prefix(prefix) {
                return role(rest);
            }
        }
        for (prefix, output) in [(CACHE_IN, false), (CACHE_OUT, true)] {
            let cache = name.strip_prefix(prefix).and_then(|rest| rest.split_once('.'));
            if let Some((layer, kind)) = cache
                && let Ok(layer) = layer.parse()
            {
                return if output { Role::CacheOut { layer, kind } } else { Role::CacheIn { layer, kind } };
            }
        }
        Role::Plain(name)
    }

    /// The name that spells this role.
    pub fn name(&self) -> String {
        match self {
            Role::Plain(n) => n.to_string(),
            Role::Updated(w) => format!("{UPDATED}{w}"),
            Role::FirstMoment(w) => format!("{FIRST_MOMENT}{w}"),
            Role::SecondMoment(w) => format!("{SECOND_MOMENT}{w}"),
            Role::Momentum(w) => format!("{MOMENTUM}{w}"),
            Role::Gradient(w) => format!("{GRADIENT}{w}"),
            Role::Trace(t) => format!("{TRACE}{t}"),
            Role::Metric(m) => format!("{METRIC}{m}"),
            Role::Hoisted(h) => format!("{HOISTED}{h}"),
            Role::CacheIn { layer, kind } => format!("{CACHE_IN}{layer}.{kind}"),
            Role::CacheOut { layer, kind } => format!("{CACHE_OUT}{layer}.{kind}"),
        }
    }

    /// Optimiser state: kept and saved with the weights, never a weight itself.
    pub fn is_optimizer_state(&self) -> bool {
        matches!(self, Role::FirstMoment(_) | Role::SecondMoment(_) | Role::Momentum(_))
    }

    /// The mixture (in layer order) whose tokens per expert this metric is.
    pub fn expert_load(&self) -> Option<usize> {
        match *self {
            Role::Metric(m) => m.strip_prefix(EXPERT_LOAD)?.parse().ok(),
            _ => None,
        }
    }

    /// The input whose next value an output of this name is: a training
    /// step's new weight replaces the weight, new optimiser state the state
    /// of the same name. A program may write such an output over that input
    /// (`backend::plan`): the caller keeps one copy of the training state.
    pub fn replaces(&self) -> Option<String> {
        match *self {
            Role::Updated(w) => Some(w.to_string()),
            ref state if state.is_optimizer_state() => Some(state.name()),
            _ => None,
        }
    }

    /// The input a cache output is written back to (`None` for other roles).
    pub fn cache_input(&self) -> Option<String> {
        match *self {
            Role::CacheOut { layer, kind } => Some(Role::CacheIn { layer, kind }.name()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn every_role_reads_back_from_its_name() {
        let roles = [
            Role::Plain("model.embed_tokens.weight"),
            Role::Updated("lm_head.weight"),
            Role::FirstMoment("a.b"),
            Role::SecondMoment("a.b"),
            Role::Momentum("a.b"),
            Role::Gradient("a.b"),
            Role::Trace("layers.0 (Block)"),
            Role::Metric("expert_load.1"),
            Role::Hoisted("3"),
            Role::CacheIn { layer: 3, kind: "key" },
            Role::CacheOut { layer: 11, kind: "value" },
        ];
        for role in roles {
            assert_eq!(Role::of(&role.name()), role);
        }
        // A weight whose name merely starts like a cache is a weight.
        assert_eq!(Role::of("past.weight"), Role::Plain("past.weight"));
    }
}

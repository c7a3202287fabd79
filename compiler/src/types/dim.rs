//! Symbolic dimensions: polynomials over named sizes such as `B` and `T`, so
//! that `merge` gives `B*T` and a KV cache gives `S + T`, and two shapes can be
//! compared exactly. Coefficients saturate rather than wrap: a size past
//! 2^63 is refused later (parameters, memory plans), never silently small.

use std::collections::BTreeMap;
use std::fmt;

/// A dimension: sum of integer-weighted products of symbols.
/// The constant term is the monomial with no symbols.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    terms: BTreeMap<Vec<String>, i64>,
}

impl Dim {
    pub fn constant(v: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if v != 0 {
            terms.insert(Vec::new(), v);
        }
        Dim { terms }
    }

    pub fn symbol(name: &str) -> Dim {
        Dim { terms: BTreeMap::from([(vec![name.to_string()], 1)]) }
    }

    /// The value when the dimension has no symbols.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    /// Whether every coefficient is at least 0: then the value is at least
    /// 0 at all non-negative sizes (`a.sub(b)` so: a >= b everywhere).
    pub fn nonnegative(&self) -> bool {
        self.terms.values().all(|c| *c >= 0)
    }

    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.keys().flatten().map(String::as_str)
    }

    pub fn add(&self, other: &Dim) -> Dim {
        let mut terms = self.terms.clone();
        for (m, c) in &other.terms {
            let t = terms.entry(m.clone()).or_insert(0);
            *t = t.saturating_add(*c);
        }
        terms.retain(|_, c| *c != 0);
        Dim { terms }
    }

    pub fn neg(&self) -> Dim {
        Dim { terms: self.terms.iter().map(|(m, c)| (m.clone(), c.saturating_neg())).collect() }
    }

    pub fn sub(&self, other: &Dim) -> Dim {
        self.add(&other.neg())
    }

    pub fn mul(&self, other: &Dim) -> Dim {
        let mut terms: BTreeMap<Vec<String>, i64> = BTreeMap::new();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &other.terms {
                let mut m: Vec<String> = ma.iter().chain(mb).cloned().collect();
                m.sort();
                let t = terms.entry(m).or_insert(0);
                *t = t.saturating_add(ca.saturating_mul(*cb));
            }
        }
        terms.retain(|_, c| *c != 0);
        Dim { terms }
    }

    /// Exact division; `None` when the quotient is not a polynomial.
    pub fn div(&self, other: &Dim) -> Option<Dim> {
        if let Some(d) = other.as_const() {
            if d == 0 || self.terms.values().any(|c| c.checked_rem(d) != Some(0)) {
                return None;
            }
            return Some(Dim { terms: self.terms.iter().map(|(m, c)| (m.clone(), c / d)).collect() });
        }
        // Divide by a single monomial (e.g. B*T / T).
        if other.terms.len() == 1 {
            let (om, oc) = other.terms.iter().next().expect("one term");
            let mut terms = BTreeMap::new();
            for (m, c) in &self.terms {
                if c.checked_rem(*oc) != Some(0) {
                    return None;
                }
                let mut rest = m.clone();
                for s in om {
                    let i = rest.iter().position(|r| r == s)?;
                    rest.remove(i);
                }
                terms.insert(rest, c / oc);
            }
            return Some(Dim { terms });
        }
        (self == other).then(|| Dim::constant(1))
    }

    /// Replaces symbols by dimensions.
    pub fn substitute(&self, map: &dyn Fn(&str) -> Option<Dim>) -> Dim {
        let mut out = Dim::constant(0);
        for (m, c) in &self.terms {
            let mut term = Dim::constant(*c);
            for s in m {
                term = term.mul(&map(s).unwrap_or_else(|| Dim::symbol(s)));
            }
            out = out.add(&term);
        }
        out
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Dim {
        Dim::constant(v)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // Highest-degree terms first, constants last: `S + T + 1`.
        let mut terms: Vec<_> = self.terms.iter().collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        for (i, (m, c)) in terms.into_iter().enumerate() {
            let (sign, mag) = if *c < 0 { ("-", -c) } else { ("+", *c) };
            if i == 0 {
                if sign == "-" {
                    f.write_str("-")?;
                }
            } else {
                write!(f, " {sign} ")?;
            }
            if m.is_empty() {
                write!(f, "{mag}")?;
            } else {
                if mag != 1 {
                    write!(f, "{mag}*")?;
                }
                f.write_str(&m.join("*"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_exact() {
        let b = Dim::symbol("B");
        let t = Dim::symbol("T");
        let bt = b.mul(&t);
        assert_eq!(bt.to_string(), "B*T");
        assert_eq!(bt.div(&t), Some(b.clone()));
        assert_eq!(t.add(&Dim::constant(1)).to_string(), "T + 1");
        assert_eq!(t.sub(&t).as_const(), Some(0));
        assert_eq!(Dim::constant(12).div(&Dim::constant(5)), None);
        assert_eq!(Dim::constant(12).div(&Dim::constant(4)), Some(Dim::constant(3)));
        assert_eq!(t.mul(&Dim::constant(2)).to_string(), "2*T");
        assert_eq!(t.div(&b), None);
    }
}

//! Hyperparameters from outside the spec: a Hugging Face `config.json`
//! (through the model's `from hf(...)` mapping) and `--set key=value`.

use super::elaborate::{coerce, type_text};
use super::value::Value;
use crate::diag::{Diagnostic, suggest};
use crate::syntax::ast::Def;

/// Values for the model's hyperparameters found in `config`. A key may be
/// dotted (`rope_parameters.rope_theta`); the first present key wins; a key
/// that is absent leaves the default in place, `null` means `none`.
pub fn from_config(
    def: &Def,
    config: &serde_json::Value,
    config_name: &str,
) -> Result<Vec<(String, Value)>, Vec<Diagnostic>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    if !config.is_object() {
        return Err(vec![Diagnostic::new("E0501", format!("{config_name}: expected a JSON object at the top level"))]);
    }
    for entry in &def.hf {
        let Some(h) = def.hparams.iter().find(|h| h.name.text == entry.name.text) else {
            let d = Diagnostic::at(
                "E0502",
                entry.name.span,
                format!("`from hf` maps `{}`, which is not a hyperparameter of `{}`", entry.name.text, def.name.text),
            );
            let d = match suggest(&entry.name.text, def.hparams.iter().map(|h| h.name.text.as_str())) {
                Some(s) => d.help(s),
                None => d,
            };
            errors.push(d);
            continue;
        };
        let found = entry.keys.iter().find_map(|k| lookup(config, &k.text).map(|v| (k, v)));
        let Some((key, json)) = found else { continue };
        // An int taken from an object or list counts its entries: `classes:
        // id2label` is the label count (transformers' `num_labels`).
        let count = match json {
            serde_json::Value::Object(o) => Some(o.len()),
            serde_json::Value::Array(a) => Some(a.len()),
            _ => None,
        };
        let value = match (count, h.ty.word, json_value(json)) {
            (Some(n), crate::syntax::ast::HTypeWord::Int, _) => Value::Int(n as i64),
            (_, _, Some(v)) => v,
            (_, _, None) => {
                errors.push(
                    Diagnostic::new(
                        "E0502",
                        format!(
                            "{config_name}: key `{}` holds {}, which is not a number, bool, string or null",
                            key.text,
                            brief(json)
                        ),
                    )
                    .label(key.span, "mapped here")
                    .help(format!(
                        "an int hyperparameter mapped to it takes its number of entries ({})",
                        count.unwrap_or(0)
                    )),
                );
                continue;
            }
        };
        match coerce(&value, h.ty) {
            Some(v) => out.push((h.name.text.clone(), v)),
            None => errors.push(
                Diagnostic::new(
                    "E0502",
                    format!(
                        "{config_name}: key `{}` is {}, but hyperparameter `{}` needs {}",
                        key.text,
                        brief(json),
                        h.name.text,
                        type_text(h.ty)
                    ),
                )
                .label(key.span, "mapped here"),
            ),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// A JSON value as an error quotes it: in full when short, else by its kind
/// and size (an `id2label` of 1,000 labels is 19 KB).
fn brief(v: &serde_json::Value) -> String {
    let text = v.to_string();
    match v {
        _ if text.len() <= 60 => text,
        serde_json::Value::Object(o) => format!("an object of {} entries", o.len()),
        serde_json::Value::Array(a) => format!("a list of {} items", a.len()),
        _ => format!("{}...", text.chars().take(57).collect::<String>()),
    }
}

fn lookup<'a>(config: &'a serde_json::Value, dotted: &str) -> Option<&'a serde_json::Value> {
    dotted.split('.').try_fold(config, |v, k| v.get(k))
}

fn json_value(v: &serde_json::Value) -> Option<Value> {
    Some(match v {
        serde_json::Value::Null => Value::None,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Array(items) => Value::List(items.iter().map(json_value).collect::<Option<_>>()?),
        serde_json::Value::Object(_) => return None,
    })
}

/// `--set key=value`: the value is an int, a float, `true`/`false`, `none` or a string.
pub fn from_set(def: &Def, key: &str, text: &str) -> Result<(String, Value), Diagnostic> {
    let Some(h) = def.hparams.iter().find(|h| h.name.text == key) else {
        let d =
            Diagnostic::new("E0502", format!("--set {key}={text}: `{}` has no hyperparameter `{key}`", def.name.text));
        let names: Vec<&str> = def.hparams.iter().map(|h| h.name.text.as_str()).collect();
        return Err(d.help(
            suggest(key, names.iter().copied())
                .unwrap_or_else(|| format!("the hyperparameters are: {}", names.join(", "))),
        ));
    };
    let t = text.trim();
    let value = if let Ok(i) = t.replace('_', "").parse::<i64>() {
        Value::Int(i)
    } else if let Ok(f) = t.parse::<f64>() {
        Value::Float(f)
    } else {
        match t {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            "none" => Value::None,
            _ => Value::Str(t.trim_matches('"').to_string()),
        }
    };
    coerce(&value, h.ty).map(|v| (key.to_string(), v)).ok_or_else(|| {
        Diagnostic::new(
            "E0502",
            format!("--set {key}={text}: `{key}` needs {}, found {} `{value}`", type_text(h.ty), value.kind()),
        )
    })
}

/// A `config.json` for the model: `base` (the config it was built from, if
/// any) with every `from hf(...)` key set to the hyperparameter's value. A
/// key present in `base` is updated where it is (`rope_parameters.rope_theta`
/// stays nested); otherwise the first key of the mapping is written.
pub fn to_config(def: &Def, hparams: &[(String, Value)], base: Option<&serde_json::Value>) -> serde_json::Value {
    let mut config = base.filter(|b| b.is_object()).cloned().unwrap_or_else(|| serde_json::json!({}));
    for entry in &def.hf {
        let Some((_, value)) = hparams.iter().find(|(n, _)| *n == entry.name.text) else { continue };
        let json = match value {
            Value::Int(i) => serde_json::json!(i),
            Value::Float(f) => serde_json::json!(f),
            Value::Bool(b) => serde_json::json!(b),
            Value::Str(s) => serde_json::json!(s),
            Value::None => serde_json::Value::Null,
            _ => continue,
        };
        let Some(first) = entry.keys.first() else { continue };
        let key = entry.keys.iter().find(|k| lookup(&config, &k.text).is_some()).unwrap_or(first);
        let mut slot = &mut config;
        for part in key.text.split('.') {
            if !slot.is_object() {
                *slot = serde_json::json!({});
            }
            slot = slot.as_object_mut().expect("an object").entry(part).or_insert(serde_json::Value::Null);
        }
        *slot = json;
    }
    config
}

//! PEFT adapters: `adapter_config.json` as the `peft` library writes it,
//! turned into the language's `adapt` clause, and written back for adapters
//! trained by modelc. Weight names in `adapter_model.safetensors` are the
//! model's own with the prefix `base_model.model.`.

use serde_json::Value as Json;
use std::path::Path;

/// Prefix PEFT puts before the model's weight names.
pub const PREFIX: &str = "base_model.model.";

/// A LoRA or DoRA adapter's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// `DoRA` when `use_dora`, else `LoRA` (the stdlib layer names).
    pub layer: String,
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
}

impl AdapterConfig {
    /// Reads `DIR/adapter_config.json`; settings modelc does not implement are errors.
    pub fn read(dir: &Path) -> Result<AdapterConfig, String> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let json: Json =
            serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
        Self::from_json(&json).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_json(json: &Json) -> Result<AdapterConfig, String> {
        let peft_type = json.get("peft_type").and_then(Json::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(format!("peft_type {peft_type} is not supported (LORA, with use_dora for DoRA, is)"));
        }
        let unsupported = [
            ("use_rslora", json.get("use_rslora").and_then(Json::as_bool) == Some(true)),
            ("fan_in_fan_out", json.get("fan_in_fan_out").and_then(Json::as_bool) == Some(true)),
            ("bias", json.get("bias").and_then(Json::as_str).is_some_and(|b| b != "none")),
            ("rank_pattern", json.get("rank_pattern").and_then(Json::as_object).is_some_and(|m| !m.is_empty())),
            ("alpha_pattern", json.get("alpha_pattern").and_then(Json::as_object).is_some_and(|m| !m.is_empty())),
            ("modules_to_save", json.get("modules_to_save").is_some_and(|m| !m.is_null())),
            ("layers_to_transform", json.get("layers_to_transform").is_some_and(|m| !m.is_null())),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(format!("`{key}` is set, which modelc's adapters do not support"));
        }
        let targets = match json.get("target_modules") {
            Some(Json::Array(items)) => {
                let mut t: Vec<String> = items.iter().filter_map(|i| i.as_str().map(String::from)).collect();
                t.sort();
                t
            }
            Some(Json::String(s)) => {
                return Err(format!("target_modules is the pattern \"{s}\"; give a list of names"));
            }
            _ => return Err("no target_modules list".into()),
        };
        if targets.is_empty() {
            return Err("target_modules is empty".into());
        }
        let dora = json.get("use_dora").and_then(Json::as_bool).unwrap_or(false);
        Ok(AdapterConfig {
            layer: if dora { "DoRA" } else { "LoRA" }.into(),
            rank: json.get("r").and_then(Json::as_i64).ok_or("no rank `r`")?,
            alpha: json.get("lora_alpha").and_then(Json::as_f64).ok_or("no `lora_alpha`")?,
            dropout: json.get("lora_dropout").and_then(Json::as_f64).unwrap_or(0.0),
            targets,
        })
    }

    /// The spec text that adapts `model`, defined in the file `import`.
    pub fn spec(&self, model: &str, import: &str) -> String {
        format!(
            "import std.adapters\nimport \"{import}\"\n\nmodel {model}{} = adapt {model} with {}(rank: {}, alpha: {:?}, lora_dropout: {:?}) on {}\n",
            self.layer,
            self.layer,
            self.rank,
            self.alpha,
            self.dropout,
            self.targets.join(", ")
        )
    }

    /// `adapter_config.json` as PEFT writes it.
    pub fn to_json(&self, task: &str) -> Json {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": task,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "use_dora": self.layer == "DoRA",
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "inference_mode": true,
            "base_model_name_or_path": null,
        })
    }
}

/// The adapter a checked model carries (its LoRA or DoRA layers), if any.
pub fn adapter_of(p: &crate::check::load::Program, checked: &crate::check::Checked) -> Option<AdapterConfig> {
    let mut found: Option<AdapterConfig> = None;
    for inst in &checked.instances {
        let layer = p.item_name(inst.def);
        if layer != "LoRA" && layer != "DoRA" {
            continue;
        }
        let number = |k: &str| inst.env.get(k).and_then(|v| v.as_f64());
        let target = inst.path.rsplit('.').next().unwrap_or_default().to_string();
        let cfg = found.get_or_insert_with(|| AdapterConfig {
            layer: layer.to_string(),
            rank: number("rank").unwrap_or(8.0) as i64,
            alpha: number("alpha").unwrap_or(8.0),
            dropout: number("lora_dropout").unwrap_or(0.0),
            targets: Vec::new(),
        });
        if !cfg.targets.contains(&target) {
            cfg.targets.push(target);
        }
    }
    if let Some(c) = found.as_mut() {
        c.targets.sort();
    }
    found
}

//! Which offered linears a config targets, by PEFT's rules (`check_target_module_exists`), and
//! which offered tensors `modules_to_save` trains in full (`_set_trainable`), so a recipe written
//! for PEFT adapts the same modules here; stricter in one way: every list entry, regex or
//! `modules_to_save` entry must match something, so a typo is an error instead of a silently
//! smaller adapter.

use regex::Regex;

use crate::{Error, LoraConfig, TargetModules};

/// For each offered module name, whether `cfg` puts an adapter on it.
///
/// A list entry matches a name equal to it or ending in `.` + entry; a regex must match the whole
/// name; all-linear matches every name. Names matched by `modules_to_save` (PEFT's
/// `(^|.*\.)NAME($|\..*)`) are never targets. An entry, regex or all-linear that matches no
/// name is [`Error::NoMatch`], listing the names offered.
pub fn select(names: &[String], cfg: &LoraConfig) -> Result<Vec<bool>, Error> {
    let saved: Vec<Regex> = cfg
        .modules_to_save
        .iter()
        .map(|m| {
            let pattern = format!(r"^(?:^|.*\.){m}(?:$|\..*)");
            Regex::new(&pattern).map_err(|source| Error::Regex {
                field: "modules_to_save",
                pattern: m.clone(),
                source: Box::new(source),
            })
        })
        .collect::<Result<_, _>>()?;
    let candidate = |name: &str| !saved.iter().any(|re| re.is_match(name));
    let no_match = |target: String| Error::NoMatch { target, offered: names.to_vec() };
    match &cfg.target_modules {
        TargetModules::List(keys) => {
            let hit = |name: &str, key: &str| {
                name == key
                    || (name.len() > key.len()
                        && name.ends_with(key)
                        && name[..name.len() - key.len()].ends_with('.'))
            };
            for key in keys {
                if !names.iter().any(|n| candidate(n) && hit(n, key)) {
                    return Err(no_match(format!("entry `{key}`")));
                }
            }
            Ok(names.iter().map(|n| candidate(n) && keys.iter().any(|k| hit(n, k))).collect())
        }
        TargetModules::Regex(pattern) => {
            let re = Regex::new(&format!("^(?:{pattern})$")).map_err(|source| Error::Regex {
                field: "target_modules",
                pattern: pattern.clone(),
                source: Box::new(source),
            })?;
            let selected: Vec<bool> = names.iter().map(|n| candidate(n) && re.is_match(n)).collect();
            if !selected.contains(&true) {
                return Err(no_match(format!("regex `{pattern}`")));
            }
            Ok(selected)
        }
        TargetModules::AllLinear => {
            let selected: Vec<bool> = names.iter().map(|n| candidate(n)).collect();
            if !selected.contains(&true) {
                return Err(no_match("all-linear".to_owned()));
            }
            Ok(selected)
        }
    }
}

/// The module a parameter belongs to: its name without the last `.`-part (`lm_head.weight` ->
/// `lm_head`).
pub(crate) fn module_of(parameter: &str) -> &str {
    parameter.rsplit_once('.').map_or(parameter, |(m, _)| m)
}

/// For each offered tensor (by parameter name), whether `cfg.modules_to_save` trains it in full:
/// its module's name ends with an entry, PEFT's plain `str.endswith` (`embed_tokens` matches
/// `model.embed_tokens`). An entry that matches no tensor's module is
/// [`Error::NoModuleToSave`]; one that matches a linear is [`Error::Unsupported`] (a linear,
/// 4-bit perhaps, has no trainable full copy here).
pub(crate) fn select_saved(
    linears: &[String],
    tensors: &[String],
    cfg: &LoraConfig,
) -> Result<Vec<bool>, Error> {
    let mut selected = vec![false; tensors.len()];
    for entry in &cfg.modules_to_save {
        let on_linears: Vec<&str> =
            linears.iter().filter(|n| n.ends_with(entry.as_str())).map(String::as_str).collect();
        if !on_linears.is_empty() {
            return Err(Error::Unsupported(format!(
                "modules_to_save entry `{entry}` on linear layers ({}): training a linear in full",
                on_linears.join(", ")
            )));
        }
        let mut hit = false;
        for (sel, name) in selected.iter_mut().zip(tensors) {
            if module_of(name).ends_with(entry.as_str()) {
                *sel = true;
                hit = true;
            }
        }
        if !hit {
            let mut offered: Vec<String> = Vec::new();
            for name in tensors {
                let m = module_of(name).to_owned();
                if !offered.contains(&m) {
                    offered.push(m);
                }
            }
            return Err(Error::NoModuleToSave { entry: entry.clone(), offered });
        }
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        let mut v = Vec::new();
        for l in 0..2 {
            for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
                v.push(format!("model.layers.{l}.{m}"));
            }
            for m in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
                v.push(format!("model.layers.{l}.{m}"));
            }
        }
        v
    }

    fn picked(targets: TargetModules) -> Result<Vec<String>, Error> {
        let n = names();
        let cfg = LoraConfig::new(4, 8.0, targets);
        let sel = select(&n, &cfg)?;
        Ok(n.into_iter().zip(sel).filter(|(_, s)| *s).map(|(n, _)| n).collect())
    }

    fn list(keys: &[&str]) -> TargetModules {
        TargetModules::List(keys.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn list_entries_match_whole_name_or_dot_suffix() {
        let got = picked(list(&["q_proj", "mlp.down_proj"])).expect("match");
        assert_eq!(
            got,
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.mlp.down_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.mlp.down_proj"
            ]
        );
        let got = picked(list(&["model.layers.1.self_attn.v_proj"])).expect("full name");
        assert_eq!(got, ["model.layers.1.self_attn.v_proj"]);
    }

    #[test]
    fn partial_names_do_not_match() {
        // `proj` is the end of `q_proj` but not after a dot; `self_attn` is a parent, not a linear.
        for key in ["proj", "_proj", "self_attn", "layers.0", "q_pro"] {
            let err = picked(list(&[key])).expect_err(key);
            assert!(
                matches!(&err, Error::NoMatch { target, .. } if target == &format!("entry `{key}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn regex_must_match_the_whole_name() {
        let got = picked(TargetModules::Regex(r".*\.1\..*_proj".into())).expect("match");
        assert_eq!(got.len(), 7);
        assert!(got.iter().all(|n| n.starts_with("model.layers.1.")));
        // re.fullmatch: a pattern matching only a part of the name selects nothing.
        assert!(picked(TargetModules::Regex("q_proj".into())).is_err());
        assert!(picked(TargetModules::Regex(r"model\.layers\.0".into())).is_err());
        let got =
            picked(TargetModules::Regex(r"model\.layers\.0\.self_attn\.(q|v)_proj".into())).expect("match");
        assert_eq!(got, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]);
    }

    #[test]
    fn all_linear_takes_every_offered_linear() {
        assert_eq!(picked(TargetModules::AllLinear).expect("all"), names());
    }

    #[test]
    fn a_target_matching_nothing_lists_the_offered_modules() {
        let err = picked(list(&["q_proj", "qkv_proj"])).expect_err("no qkv_proj").to_string();
        assert!(
            err.starts_with("target_modules entry `qkv_proj` matches none of the 14 linear layers offered: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj"),
            "{err}"
        );
        assert!(err.ends_with("model.layers.1.mlp.down_proj"), "{err}");
        let err = select(&[], &LoraConfig::new(4, 8.0, TargetModules::AllLinear)).expect_err("none offered");
        assert_eq!(
            err.to_string(),
            "target_modules all-linear matches none of the 0 linear layers offered: (none)"
        );
        let err = picked(TargetModules::Regex("(".into())).expect_err("bad regex").to_string();
        assert!(err.starts_with("target_modules regex `(` does not compile"), "{err}");
    }

    #[test]
    fn modules_to_save_select_whole_modules_by_suffix() {
        let linears = names();
        let tensors: Vec<String> =
            ["model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"].map(String::from).to_vec();
        let mut cfg = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        assert_eq!(select_saved(&linears, &tensors, &cfg).expect("none"), [false, false, false]);
        cfg.modules_to_save = vec!["lm_head".into()];
        assert_eq!(select_saved(&linears, &tensors, &cfg).expect("head"), [false, true, true]);
        cfg.modules_to_save = vec!["embed_tokens".into(), "lm_head".into()];
        assert_eq!(select_saved(&linears, &tensors, &cfg).expect("both"), [true, true, true]);
        cfg.modules_to_save = vec!["norm".into()];
        let err = select_saved(&linears, &tensors, &cfg).expect_err("no norm offered").to_string();
        assert_eq!(
            err,
            "modules_to_save entry `norm` matches none of the modules offered for full training: model.embed_tokens, lm_head"
        );
        cfg.modules_to_save = vec!["down_proj".into()];
        let err = select_saved(&linears, &tensors, &cfg).expect_err("a linear").to_string();
        assert!(err.starts_with("modules_to_save entry `down_proj` on linear layers (model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj)"), "{err}");
        assert!(err.ends_with("is not supported yet"), "{err}");
    }

    #[test]
    fn modules_to_save_are_never_targets() {
        let n = names();
        let mut cfg = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        cfg.modules_to_save = vec!["down_proj".into()];
        let sel = select(&n, &cfg).expect("match");
        assert_eq!(sel.iter().filter(|s| **s).count(), 12);
        assert!(n.iter().zip(&sel).all(|(n, s)| *s != n.ends_with("down_proj")));
        cfg.target_modules = list(&["down_proj"]);
        assert!(select(&n, &cfg).is_err());
    }
}

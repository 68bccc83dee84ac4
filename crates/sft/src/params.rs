//! Adapters on parameters rather than linears (PEFT's `target_parameters`): the glue between
//! model-loader, which offers a mixture of experts' router and expert banks and computes with
//! their updates, and lora, which makes, trains and files those updates. Neither crate knows the
//! other, so the shapes cross here.

use model_loader::CausalLm;

/// The parameters of `model` that PEFT's `target_parameters` can adapt, as lora takes them.
pub fn slots(model: &CausalLm) -> Vec<lora::ParamSlot> {
    convert(model.param_slots())
}

/// [`slots`] from config.json alone (on the CPU), for an adapter file read without the model.
pub fn slots_of(cfg: &model_loader::HfConfig) -> Vec<lora::ParamSlot> {
    convert(model_loader::param_slots_of(cfg))
}

fn convert(slots: Vec<model_loader::ParamSlotInfo>) -> Vec<lora::ParamSlot> {
    slots
        .into_iter()
        .map(|s| lora::ParamSlot {
            module: s.module,
            param: s.param,
            experts: s.experts,
            in_features: s.in_features,
            out_features: s.out_features,
            device: s.device,
        })
        .collect()
}

/// Put parameter adapters (from [`lora::Adapters::add_params`] or
/// [`lora::inject_from_with_params`]) on `model`, which then computes with them.
pub fn install(model: &mut CausalLm, made: Vec<lora::ParamAdapter>) -> Result<(), model_loader::Error> {
    for p in made {
        let lora = model_loader::ParamLora {
            a: p.lora_a,
            b: p.lora_b,
            scaling: p.scaling,
            experts: p.slot.experts,
            enabled: p.enabled,
        };
        model.set_param_lora(&p.slot.module, &p.slot.param, lora)?;
    }
    Ok(())
}

//! Where each part of a model lives and computes: a device map ([`device_map::Plan`]) applied to
//! the modules [`super::CausalLm`] is made of.

use tch::Device;

use crate::Error;

/// One decoder layer's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPlacement {
    /// Where the layer's linear weights are stored.
    pub weights: Device,
    /// Where the layer computes (its norms, biases and adapters live there too): the weights'
    /// device, or a GPU for a 4-bit layer offloaded to host memory, whose codes are streamed to
    /// the GPU for each product.
    pub compute: Device,
}

/// A device for every module, in forward order; the forward moves hidden states from one to the
/// next where they differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The token embedding (where input ids go).
    pub embed: Device,
    /// Each decoder layer.
    pub layers: Vec<LayerPlacement>,
    /// The final norm.
    pub norm: Device,
    /// The output head (where logits come out).
    pub head: Device,
}

impl Placement {
    /// Everything on one device (transformers' `{"": device}`).
    pub fn single(device: Device, layers: usize) -> Self {
        Placement {
            embed: device,
            layers: vec![LayerPlacement { weights: device, compute: device }; layers],
            norm: device,
            head: device,
        }
    }

    /// Apply a plan over transformers module names (`model.embed_tokens`, `model.layers.N`,
    /// `model.norm`, `lm_head`) for a model of `layers` decoder layers, on a machine where
    /// libtorch sees `cuda_devices` GPUs.
    ///
    /// A decoder layer the plan puts on the CPU while other modules are on GPUs is offloaded as
    /// accelerate offloads: with `stream_offloaded` (4-bit models) its weights stay in host memory
    /// and it computes on the plan's first GPU, the codes copied over for each product;
    /// otherwise it computes on the CPU, and the hidden states move there and back.
    pub fn from_plan(
        plan: &device_map::Plan,
        layers: usize,
        cuda_devices: usize,
        stream_offloaded: bool,
    ) -> Result<Self, Error> {
        let on = |name: &str, d: device_map::Device| -> Result<Device, Error> {
            match d {
                device_map::Device::Cpu => Ok(Device::Cpu),
                device_map::Device::Cuda(i) if (i as usize) < cuda_devices => Ok(Device::Cuda(i as usize)),
                device_map::Device::Cuda(i) => Err(Error::BadOption(format!(
                    "the device map places `{name}` on cuda:{i}, but libtorch sees {cuda_devices} GPU(s)"
                ))),
            }
        };
        let placed = |name: &str| -> Result<device_map::Device, Error> {
            plan.device_of(name).ok_or_else(|| {
                Error::BadOption(format!("the device map places no device for module `{name}`"))
            })
        };
        let device = |name: &str| on(name, placed(name)?);
        let layers = (0..layers)
            .map(|l| {
                let name = format!("model.layers.{l}");
                let d = placed(&name)?;
                Ok(LayerPlacement {
                    weights: on(&name, d)?,
                    compute: on(&name, plan.compute_device(d, stream_offloaded))?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Placement {
            embed: device("model.embed_tokens")?,
            layers,
            norm: device("model.norm")?,
            head: device("lm_head")?,
        })
    }

    /// The devices the decoder layers compute on, each once, in forward order.
    pub fn compute_devices(&self) -> Vec<Device> {
        let mut out: Vec<Device> = Vec::new();
        for l in &self.layers {
            if !out.contains(&l.compute) {
                out.push(l.compute);
            }
        }
        out
    }

    /// Whether any module is on another device than the embedding (the forward then moves
    /// hidden states between devices).
    pub fn spans_devices(&self) -> bool {
        self.layers.iter().any(|l| l.weights != self.embed || l.compute != self.embed)
            || self.norm != self.embed
            || self.head != self.embed
    }

    /// A short description for logs: `embed cpu, layers 0-11 cuda:0, 12-15 cpu->cuda:0, ...`.
    pub fn describe(&self) -> String {
        let name = |d: Device| match d {
            Device::Cpu => "cpu".to_owned(),
            Device::Cuda(i) => format!("cuda:{i}"),
            other => format!("{other:?}"),
        };
        let mut runs: Vec<(usize, usize, LayerPlacement)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            match runs.last_mut() {
                Some((_, end, p)) if *p == *l => *end = i,
                _ => runs.push((i, i, *l)),
            }
        }
        let layers: Vec<String> = runs
            .iter()
            .map(|(a, b, p)| {
                let span = if a == b { format!("{a}") } else { format!("{a}-{b}") };
                if p.weights == p.compute {
                    format!("{span} {}", name(p.compute))
                } else {
                    format!("{span} {} (offloaded, computed on {})", name(p.weights), name(p.compute))
                }
            })
            .collect();
        format!(
            "embed {}, layers {}, norm {}, head {}",
            name(self.embed),
            layers.join(", "),
            name(self.norm),
            name(self.head)
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn plan(layers: &[device_map::Device], ends: device_map::Device) -> device_map::Plan {
        let mut p = vec![("model.embed_tokens".to_owned(), ends)];
        p.extend(layers.iter().enumerate().map(|(i, d)| (format!("model.layers.{i}"), *d)));
        p.push(("model.norm".to_owned(), ends));
        p.push(("lm_head".to_owned(), ends));
        device_map::Plan { placements: p }
    }

    #[test]
    fn cpu_layers_of_a_gpu_plan_are_offloaded_to_the_first_gpu_when_streamed() {
        use device_map::Device::{Cpu, Cuda};
        let p = plan(&[Cuda(1), Cuda(1), Cpu], Cuda(1));
        let streamed = Placement::from_plan(&p, 3, 2, true).unwrap();
        assert_eq!(streamed.layers[2], LayerPlacement { weights: Device::Cpu, compute: Device::Cuda(1) });
        assert_eq!(streamed.compute_devices(), vec![Device::Cuda(1)]);
        assert!(streamed.spans_devices());
        assert!(
            streamed.describe().contains("2 cpu (offloaded, computed on cuda:1)"),
            "{}",
            streamed.describe()
        );
        let on_cpu = Placement::from_plan(&p, 3, 2, false).unwrap();
        assert_eq!(on_cpu.layers[2], LayerPlacement { weights: Device::Cpu, compute: Device::Cpu });
        assert_eq!(on_cpu.compute_devices(), vec![Device::Cuda(1), Device::Cpu]);
    }

    #[test]
    fn an_all_cpu_plan_is_single() {
        let p = plan(&[device_map::Device::Cpu; 4], device_map::Device::Cpu);
        let placed = Placement::from_plan(&p, 4, 0, true).unwrap();
        assert_eq!(placed, Placement::single(Device::Cpu, 4));
        assert!(!placed.spans_devices());
        assert_eq!(placed.describe(), "embed cpu, layers 0-3 cpu, norm cpu, head cpu");
    }

    #[test]
    fn missing_gpus_and_modules_are_errors_naming_them() {
        use device_map::Device::{Cpu, Cuda};
        let p = plan(&[Cuda(0), Cuda(1)], Cuda(0));
        let e = Placement::from_plan(&p, 2, 1, true).unwrap_err().to_string();
        assert!(e.contains("model.layers.1") && e.contains("cuda:1") && e.contains("1 GPU"), "{e}");
        let e = Placement::from_plan(&plan(&[Cpu], Cpu), 2, 0, true).unwrap_err().to_string();
        assert!(e.contains("model.layers.1"), "{e}");
    }
}

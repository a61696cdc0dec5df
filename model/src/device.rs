//! Where the model runs: `--device auto|cpu|cuda[:N]` for the trainer, the engine and the
//! benches.

use std::fmt;
use std::str::FromStr;

use crate::cuda::{CudaBackend, missing_libraries, require_libraries};
use crate::error::{ModelError, Result};

/// A device as asked for on the command line or in a config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The first GPU when CUDA is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// GPU `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for Device {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            ModelError::InvalidInput(format!(
                "`{s}` is not a device: use auto, cpu, cuda or cuda:N (N the GPU's index)"
            ))
        };
        match s.trim() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// In configs, a device is its command-line spelling (`device = "cuda:1"`).
impl serde::Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Device {
    /// The device to run on (`Cpu` or `Cuda(n)`, never `Auto`) and why, for the log. `auto`
    /// takes GPU 0 when the CUDA libraries load and the driver sees a GPU, else the CPU;
    /// `cuda:N` is an error unless GPU N is there and usable.
    pub fn resolve(self) -> Result<(Device, String)> {
        match self {
            Device::Cpu => Ok((Device::Cpu, "asked for".into())),
            Device::Cuda(n) => {
                require_libraries(&format!("--device {self}"))?;
                let count = CudaBackend::device_count();
                if n >= count {
                    return Err(ModelError::Backend(format!(
                        "--device {self}: the driver sees {count} GPU(s)"
                    )));
                }
                Ok((self, "asked for".into()))
            }
            Device::Auto => {
                let missing = missing_libraries();
                if !missing.is_empty() {
                    return Ok((
                        Device::Cpu,
                        format!("auto: {} not found", missing.join(", ")),
                    ));
                }
                match CudaBackend::device_count() {
                    0 => Ok((Device::Cpu, "auto: the CUDA driver sees no GPU".into())),
                    n => Ok((
                        Device::Cuda(0),
                        format!("auto: the CUDA driver sees {n} GPU(s)"),
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for (text, device) in [
            ("auto", Device::Auto),
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(text.parse::<Device>().unwrap(), device);
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(
                err.contains("use auto, cpu, cuda or cuda:N"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn configs_spell_devices_as_the_command_line_does() {
        let d: Device = serde_json::from_str(r#""cuda:1""#).unwrap();
        assert_eq!(d, Device::Cuda(1));
        assert_eq!(serde_json::to_string(&Device::Cpu).unwrap(), r#""cpu""#);
        let err = serde_json::from_str::<Device>(r#""tpu""#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("use auto, cpu, cuda or cuda:N"), "{err}");
    }

    #[test]
    fn auto_resolves_to_a_concrete_device_and_says_why() {
        let (device, why) = Device::Auto.resolve().unwrap();
        assert_ne!(device, Device::Auto);
        assert!(why.starts_with("auto: "), "{why}");
        assert_eq!(Device::Cpu.resolve().unwrap().0, Device::Cpu);
    }

    #[test]
    fn a_gpu_that_is_not_there_is_a_clear_error() {
        let err = Device::Cuda(1000).resolve().unwrap_err().to_string();
        assert!(err.contains("--device cuda:1000"), "{err}");
    }
}
